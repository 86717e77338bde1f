"""Sequence cores, one interface: ``core(x [B, T, d], writers: int | None) -> [B, T, d]``.

The first `writers` tokens (the supports of an episode) write; the rest (the queries) only read: no core lets a
query influence another token, so each query's output depends on the supports and itself alone. `writers` is a
Python int (the host knows it from the batch's shapes), so no core reads a value back from the device.
``writers=None`` is a stream: every token writes, in order, and each token's output depends on the tokens before
it and itself alone (causal).

- ``ttt_linear`` / ``ttt_mlp``: TTT layers (``ttt.py``); read-only tokens get inner learning rate 0.
- ``lstm``: an LSTM layer reads the supports once; every query then takes one LSTM step from the supports'
  final (h, c), all queries in parallel. Its hidden size gives the core about as many parameters as a
  TTT-Linear core of the same width; the model's blocks stack the layers.
- ``attention``: softmax self-attention; supports attend to supports, each query to the supports and itself
  (a stream: each token to the tokens before it and itself).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .ttt import TTTMLP, TTTLinear


class LSTMCore(nn.Module):
    """An ``nn.LSTM`` layer (cuDNN-capable) over the supports, then one step per query from the supports' state.

    The forget gate's bias starts at 1 (Jozefowicz et al. 2015), so the state is kept by default.
    hidden: the LSTM's size; None sizes it so the core has about `reference_params` parameters
    (4h(w + h) + 8h for the LSTM, h w for the projection back to the width w).
    """

    def __init__(self, width: int, hidden: int | None = None, reference_params: int = 0):
        super().__init__()
        if hidden is None:
            b = 5 * width + 8
            hidden = max(8, int((-b + math.sqrt(b * b + 16 * reference_params)) / 8)) if reference_params else width
        self.lstm = nn.LSTM(width, hidden, batch_first=True)
        with torch.no_grad():  # forget-gate bias 1 (gate order i, f, g, o): remember by default
            self.lstm.bias_ih_l0[hidden:2 * hidden].fill_(1.0)
            self.lstm.bias_hh_l0[hidden:2 * hidden].zero_()
        self.out = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor, writers: int | None = None) -> Tensor:
        B, T, d = x.shape
        n = T if writers is None else writers
        hs, (h, c) = self.lstm(x[:, :n])
        outs = [hs]
        if n < T:
            Q = T - n
            expand = lambda s: s.unsqueeze(2).expand(-1, -1, Q, -1).reshape(s.shape[0], B * Q, -1)  # noqa: E731
            hq, _ = self.lstm(x[:, n:].reshape(B * Q, 1, d), (expand(h), expand(c)))
            outs.append(hq.view(B, Q, -1))
        return self.out(torch.cat(outs, dim=1))


class AttentionCore(nn.Module):
    """Multi-head softmax self-attention (``scaled_dot_product_attention``) with the read-only mask."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise UserError(f"width {width} is not divisible by num_heads {num_heads}. Set model.init_args.width to a "
                            f"multiple of model.init_args.num_heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor, writers: int | None = None) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if writers is None:  # a stream: causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # allowed[i, j]: j writes, or j is i
            mask = (torch.arange(T, device=x.device) < writers) | torch.eye(T, dtype=torch.bool, device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, d))


CORES = ("ttt_linear", "ttt_mlp", "lstm", "attention")


def make_core(name: str, width: int, num_heads: int, mini_batch_size: int = 16, eta_base: float = 1.0,
              share_qk: bool = True, form: str = "dual", lstm_hidden: int | None = None) -> nn.Module:
    """Build core `name`; TTT options go to the TTT cores, the LSTM has `lstm_hidden` units (None: sized like a
    TTT-Linear core)."""
    ttt = dict(mini_batch_size=mini_batch_size, eta_base=eta_base, share_qk=share_qk, form=form)
    if name == "ttt_linear":
        return TTTLinear(width, num_heads, **ttt)
    if name == "ttt_mlp":
        return TTTMLP(width, num_heads, **ttt)
    if name == "lstm":
        if lstm_hidden is not None:
            return LSTMCore(width, hidden=lstm_hidden)
        reference = sum(p.numel() for p in TTTLinear(width, num_heads, **ttt).parameters())
        return LSTMCore(width, reference_params=reference)
    if name == "attention":
        return AttentionCore(width, num_heads)
    raise UserError(f"unknown core {name!r}. Set model.init_args.core to one of {list(CORES)}")
