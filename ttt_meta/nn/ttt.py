"""Test-Time Training layers (Sun et al. 2024, arXiv 2407.04620): TTT-Linear and TTT-MLP.

The hidden state of a TTT layer is the weight W of a small inner model f, trained while the sequence is read.
Per head (width D), for token t with views q_t, k_t, v_t ([D] rows) and inner learning rate eta_t >= 0:

    f(z; W)  = z + LN(f_res(z; W))               LN per head, learnable weight and bias
    f_res    = z W + b                           (TTT-Linear)
             = gelu(z W1 + b1) W2 + b2           (TTT-MLP, gelu with the tanh approximation)
    l_t(W)   = 0.5 * || f(k_t; W) - v_t ||^2      self-supervised inner loss
    W_t      = W_s - sum_{j <= t, j in mini-batch} eta_j grad l_j(W_s)    (every bias alike)
    z_t      = f(q_t; W_t)

W_s is the state where token t's mini-batch starts; the next mini-batch starts from its last W_t. A token with
eta 0 reads the state and leaves it unchanged (queries of a few-shot episode are such read-only tokens).

Three forms compute the same thing:
- ``primal``: the readable reference. Per mini-batch it materialises every token's gradient, takes their causal
  cumulative sum and evaluates f at each token's own W_t.
- ``dual``: matrix form. With dZ the gradient of the losses with respect to the pre-LN activations at W_s,
  ``q W_t + b_t = q W_s + b_s - tril(eta_j (q_t . k_j + 1)) dZ`` and ``W_end = W_s - (eta * k)^T dZ``: only
  matrix products, no per-token weight copies. Trailing read-only tokens all read the final state, so they are
  evaluated in one batched product after the scan.
- ``compiled``: the dual form with its step through ``torch.compile``, 8 mini-batches per call (fused small ops,
  fewer calls; the first call of each shape compiles, seconds on CPU). Where no compiler is at hand (Triton on
  CUDA, C++ on CPU) it falls back to ``dual`` with a one-line notice.

Inner gradients are closed form (no autograd in the forward), so both forms run under
``torch.inference_mode()`` and the outer loop differentiates through them. ``writers`` (an int the caller knows,
so no value is read back from the device) says that only the first `writers` tokens may write (the rest have
eta 0): the dual form then scans up to the end of the mini-batch of the last writer and evaluates the trailing
read-only tokens at once; their eta is the constant 0 there (no gradient to it), where the primal form gives the
one-sided derivative of a token that starts writing.

``ttt_readout`` is the TTT layer as a few-shot classifier (``ttt_meta.learners.readout``): a linear inner model,
no LN and no residual, whose targets are the supports' one-hot labels, trained by batch gradient descent over all
supports (one mini-batch, ``epochs`` passes) from W_0 = 0, and read by the queries:

    l(W)     = sum_j eta_j * 0.5 * || k_j W - y_j ||^2          k_j [D], y_j one-hot [N], W [D, N]
    W_{e+1}  = W_e - sum_j eta_j k_j^T (k_j W_e - y_j)           e = 0 .. epochs - 1
    logits_q = q W_epochs                                        [N]


After one pass ``logits_q[n] = sum_{j in class n} eta_j q . k_j``: linear attention over the supports (Sun et al.,
Theorem 1), with unit keys and equal eta a cosine prototype classifier; each further pass is a delta-rule
correction towards the least-squares fit of the labels, so a support the model already explains adds less.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import shutil
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

FORMS = ("primal", "dual", "compiled")
_EPS = 1e-6
_GROUP = 8  # mini-batches per call of the compiled step: fewer calls, each a larger fused graph
_GELU_C = math.sqrt(2.0 / math.pi)


# ----------------------------------------------------------------------------------------------- inner pieces
def _ln(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Layer norm over the last dim (eps 1e-6). z [B, H, T, D], weight/bias [H, 1, D] (per head)."""
    return torch.addcmul(bias, F.layer_norm(z, z.shape[-1:], eps=_EPS), weight)


def ln_l2_grad(z: Tensor, target: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Gradient with respect to z of ``0.5 * ||LN(z) - target||^2``, in closed form. Shapes as `_ln`."""
    return _ln_l2_grad(z, (bias - target) * weight, weight.square())


def _ln_l2_grad(z: Tensor, c: Tensor, w2: Tensor) -> Tensor:
    """`ln_l2_grad` with the target folded in: c = (bias - target) * weight, w2 = weight^2. With g = dLoss/dLN(z)
    * weight = z_hat w2 + c: (g - mean(g) - z_hat mean(g z_hat)) / std. The scans fold every chunk's c at once."""
    zc = z - z.mean(-1, keepdim=True)
    rstd = torch.rsqrt(zc.square().mean(-1, keepdim=True) + _EPS)
    z_hat = zc * rstd
    g = torch.addcmul(c, z_hat, w2)
    return (g - g.mean(-1, keepdim=True) - z_hat * (g * z_hat).mean(-1, keepdim=True)) * rstd


def _gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_grad(x: Tensor) -> Tensor:
    """d/dx of the tanh-approximated gelu."""
    t = torch.tanh(_GELU_C * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * x * x)


@functools.cache
def _compiled(chunks):
    """A scan step of the dual form through torch.compile (inductor fuses its small ops into a few kernels; on
    CPU it needs a C++ compiler). Compiled once per shape, then with dynamic shapes after a second shape."""
    return torch.compile(chunks)


@functools.cache
def _can_compile(device_type: str) -> bool:
    """Whether torch.compile can build kernels for `device_type` here: Triton on CUDA, a C++ compiler on CPU.
    When it cannot, a one-line notice (once per device type) says that the dual form runs instead."""
    if device_type == "cuda":
        missing = None if importlib.util.find_spec("triton") else "Triton (pip install triton)"
    else:
        missing = None if shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") else "a C++ compiler"
    if missing:
        warnings.warn(f"form=compiled needs {missing} on {device_type}; the TTT layers run the dual form instead "
                      f"(the same numbers)", stacklevel=3)
    return missing is None


def _scan(chunks, form: str, device: torch.device) -> tuple:
    """(scan step, mini-batches per call) of a dual form: the eager step one at a time, or compiled, _GROUP."""
    return (_compiled(chunks), _GROUP) if form == "compiled" and _can_compile(device.type) else (chunks, 1)


def _batched(p: Tensor, B: int, per_head_dims: int) -> Tensor:
    """Expand a per-head parameter [H, ...] to [B, H, ...]; a tensor that already has B is returned as is."""
    return p if p.dim() == per_head_dims + 2 else p.expand(B, *p.shape)


def _check(q: Tensor, eta: Tensor, mini_batch_size: int, form: str, writers: int | None) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
    if q.dim() != 4 or eta.shape != q.shape[:3]:
        raise ValueError(f"expected q, k, v [B, H, T, D] and eta [B, H, T]; got q {tuple(q.shape)}, eta {tuple(eta.shape)}")
    if writers is not None and not 0 <= writers <= q.shape[2]:
        raise ValueError(f"writers must be in 0..T={q.shape[2]}, got {writers}")


def _scan_length(writers: int | None, T: int, m: int) -> int:
    """Tokens up to the end of the mini-batch holding the last of the first `writers` tokens (None: T); the rest
    only read the end state."""
    return T if writers is None else min(T, -(-writers // m) * m)


def _pad_chunks(x: Tensor, n: int, m: int) -> Tensor:
    """[B, H, n_tokens, ...] -> [B, H, nc, m, ...], zero-padding the tokens to n = nc * m."""
    pad = n - x.shape[2]
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2)
    return x.reshape(*x.shape[:2], n // m, m, *x.shape[3:])


# ----------------------------------------------------------------------------------------------- TTT-Linear
def ttt_linear(q, k, v, eta, W0, b0, ln_weight, ln_bias, mini_batch_size: int, form: str = "dual",
               writers: int | None = None):
    """TTT-Linear over a sequence.

    q, k, v [B, H, T, D]; eta [B, H, T] (>= 0, and 0 from token `writers` on when given); W0 [H, D, D] or
    [B, H, D, D]; b0 [H, D] or [B, H, D]; ln_weight, ln_bias [H, D].
    Returns (z [B, H, T, D], W_last [B, H, D, D], b_last [B, H, D]).
    """
    _check(q, eta, mini_batch_size, form, writers)
    B, H, T, D = q.shape
    W, b = _batched(W0, B, 2), _batched(b0, B, 1).unsqueeze(2)  # b [B, H, 1, D]
    lw, lb = ln_weight.unsqueeze(1), ln_bias.unsqueeze(1)
    target = v - k
    if form == "primal":
        return _linear_primal(q, k, target, eta, W, b, lw, lb, mini_batch_size)
    n = _scan_length(writers, q.shape[2], mini_batch_size)
    return _linear_dual(q, k, target, eta, W, b, lw, lb, mini_batch_size, n, *_scan(_linear_chunks, form, q.device))


def _linear_primal(q, k, target, eta, W, b, lw, lb, m):
    outs = []
    for qc, kc, tc, ec in zip(*(x.split(m, dim=2) for x in (q, k, target, eta))):
        dZ = ln_l2_grad(kc @ W + b, tc, lw, lb)  # [B, H, m, D]
        grad_W = kc.unsqueeze(-1) * dZ.unsqueeze(-2)  # per-token gradients [B, H, m, D, D]
        W_t = W.unsqueeze(2) - torch.cumsum(ec[..., None, None] * grad_W, dim=2)
        b_t = b - torch.cumsum(ec[..., None] * dZ, dim=2)  # [B, H, m, D]
        Zq = (qc.unsqueeze(-2) @ W_t).squeeze(-2) + b_t
        outs.append(qc + _ln(Zq, lw, lb))
        W, b = W_t[:, :, -1], b_t[:, :, -1:]
    return torch.cat(outs, dim=2), W, b.squeeze(2)


def _linear_chunks(kq1: Tensor, c: Tensor, AE: Tensor, Wb: Tensor, w2: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """G consecutive mini-batches of the dual form, two matrix products each. kq1 [B, H, G, 2m, D+1]: the keys then
    the queries, with a column of ones; Wb [B, H, D+1, D]: W with b as its last row; c [B, H, G, m, D] as
    `_ln_l2_grad`; AE [B, H, G, m+D+1, m]: A (A[t, j] = eta_j (q_t . k_j + 1), j <= t) over (eta k, eta)^T.
    Returns (the queries' pre-LN outputs q W_t + b_t [B, H, G*m, D], Wb after the G mini-batches)."""
    Zq = []
    for kq1_i, c_i, AE_i in zip(kq1.unbind(2), c.unbind(2), AE.unbind(2)):
        Zkq = kq1_i @ Wb
        U = AE_i @ _ln_l2_grad(Zkq[:, :, :m], c_i, w2)
        Zq.append(Zkq[:, :, m:] - U[:, :, :m])
        Wb = Wb - U[:, :, m:]
    return torch.cat(Zq, dim=2), Wb


def _linear_dual(q, k, target, eta, W, b, lw, lb, m, n, chunks=_linear_chunks, group=1):
    T = q.shape[2]
    Wb = torch.cat([W, b], dim=2)  # [B, H, D+1, D]
    Zs = []
    if n:
        g = min(group, -(-n // m))
        nc = -(-n // (g * m)) * g  # whole groups of g mini-batches; padding tokens have eta 0 and change nothing
        qc, kc, tc = (_pad_chunks(x[:, :, :n], nc * m, m) for x in (q, k, target))
        ec = _pad_chunks(eta[:, :, :n], nc * m, m).unsqueeze(-1)  # [B, H, nc, m, 1]
        ones = torch.ones_like(ec)
        k1, q1 = torch.cat([kc, ones], dim=-1), torch.cat([qc, ones], dim=-1)
        ek1T = (ec * k1).transpose(-1, -2)  # [B, H, nc, D+1, m]: (eta k, eta)^T
        AE = torch.cat([torch.tril(q1 @ ek1T), ek1T], dim=3)  # q1 . (eta k, eta)_j = eta_j (q . k_j + 1)
        kq1 = torch.cat([k1, q1], dim=3)
        c = (lb.unsqueeze(2) - tc) * lw.unsqueeze(2)  # every chunk's c at once
        w2 = lw.square()
        # split/unbind, not indexing: the backward of x[:, :, i] writes a zero tensor of x's size per chunk (O(T^2))
        for parts in zip(kq1.split(g, dim=2), c.split(g, dim=2), AE.split(g, dim=2)):
            Zq, Wb = chunks(*parts, Wb, w2, m)
            Zs.append(Zq)
        Zs = [torch.cat(Zs, dim=2)[:, :, :n]]
    W, b = Wb[:, :, :-1], Wb[:, :, -1:]
    if n < T:
        Zs.append(q[:, :, n:] @ W + b)
    Z = torch.cat(Zs, dim=2)
    return q + _ln(Z, lw, lb), W, b.squeeze(2)


# ----------------------------------------------------------------------------------------------- TTT-MLP
def ttt_mlp(q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, mini_batch_size: int, form: str = "dual",
            writers: int | None = None):
    """TTT-MLP over a sequence: f_res(z) = gelu(z W1 + b1) W2 + b2 (tanh gelu), hidden width F = W1.shape[-1].

    q, k, v [B, H, T, D]; eta [B, H, T] (0 from token `writers` on when given); W1 [(B,) H, D, F]; b1 [(B,) H, F]; W2 [(B,) H, F, D]; b2 [(B,) H, D];
    ln_weight, ln_bias [H, D]. Returns (z [B, H, T, D], (W1, b1, W2, b2) at the end, each with the batch dim).
    """
    _check(q, eta, mini_batch_size, form, writers)
    B = q.shape[0]
    state = (_batched(W1, B, 2), _batched(b1, B, 1).unsqueeze(2), _batched(W2, B, 2), _batched(b2, B, 1).unsqueeze(2))
    lw, lb = ln_weight.unsqueeze(1), ln_bias.unsqueeze(1)
    if form == "primal":
        z, (W1, b1, W2, b2) = _mlp_primal(q, k, v - k, eta, state, lw, lb, mini_batch_size)
    else:
        n = _scan_length(writers, q.shape[2], mini_batch_size)
        z, (W1, b1, W2, b2) = _mlp_dual(q, k, v - k, eta, state, lw, lb, mini_batch_size, n,
                                        *_scan(_mlp_chunks, form, q.device))
    return z, (W1, b1.squeeze(2), W2, b2.squeeze(2))


def _mlp_grads(kc, target, W1, b1, W2, b2, lw, lb):
    """Pre-activation gradients of the inner loss at the mini-batch start: (dZ1 [.., m, F], X2 [.., m, F], dZ2 [.., m, D])."""
    Z1 = kc @ W1 + b1
    X2 = _gelu(Z1)
    dZ2 = ln_l2_grad(X2 @ W2 + b2, target, lw, lb)
    dZ1 = (dZ2 @ W2.transpose(-1, -2)) * _gelu_grad(Z1)
    return dZ1, X2, dZ2


def _mlp_primal(q, k, target, eta, state, lw, lb, m):
    W1, b1, W2, b2 = state
    outs = []
    for qc, kc, tc, ec in zip(*(x.split(m, dim=2) for x in (q, k, target, eta))):
        dZ1, X2, dZ2 = _mlp_grads(kc, tc, W1, b1, W2, b2, lw, lb)
        e2, e1 = ec[..., None, None], ec[..., None]
        W1_t = W1.unsqueeze(2) - torch.cumsum(e2 * kc.unsqueeze(-1) * dZ1.unsqueeze(-2), dim=2)  # [B, H, m, D, F]
        W2_t = W2.unsqueeze(2) - torch.cumsum(e2 * X2.unsqueeze(-1) * dZ2.unsqueeze(-2), dim=2)  # [B, H, m, F, D]
        b1_t = b1 - torch.cumsum(e1 * dZ1, dim=2)
        b2_t = b2 - torch.cumsum(e1 * dZ2, dim=2)
        Xq = _gelu((qc.unsqueeze(-2) @ W1_t).squeeze(-2) + b1_t)
        Zq = (Xq.unsqueeze(-2) @ W2_t).squeeze(-2) + b2_t
        outs.append(qc + _ln(Zq, lw, lb))
        W1, b1, W2, b2 = W1_t[:, :, -1], b1_t[:, :, -1:], W2_t[:, :, -1], b2_t[:, :, -1:]
    return torch.cat(outs, dim=2), (W1, b1, W2, b2)


def _mlp_chunks(kq, c, A1, ekT, e, W1, b1, W2, b2, w2, m: int):
    """G consecutive mini-batches of the TTT-MLP dual form. kq [B, H, G, 2m, D] (keys then queries), c and w2 as
    `_ln_l2_grad`, A1 [B, H, G, m, m] (eta_j (q_t . k_j + 1), j <= t), ekT [B, H, G, D, m] = (eta k)^T,
    e [B, H, G, 1, m] = eta. Returns (the queries' pre-LN outputs [B, H, G*m, D], W1, b1, W2, b2 after them)."""
    Zq = []
    for kq_i, c_i, A1_i, ekT_i, e_i in zip(*(x.unbind(2) for x in (kq, c, A1, ekT, e))):
        Z1 = kq_i @ W1 + b1
        Z1k = Z1[:, :, :m]
        X2k = _gelu(Z1k)
        dZ2 = _ln_l2_grad(X2k @ W2 + b2, c_i, w2)
        dZ1 = (dZ2 @ W2.transpose(-1, -2)) * _gelu_grad(Z1k)
        X2q = _gelu(Z1[:, :, m:] - A1_i @ dZ1)
        A2 = torch.tril(X2q @ X2k.transpose(-1, -2) + 1) * e_i
        Zq.append(X2q @ W2 + b2 - A2 @ dZ2)
        W1, b1 = W1 - ekT_i @ dZ1, b1 - e_i @ dZ1
        W2, b2 = W2 - (e_i.transpose(-1, -2) * X2k).transpose(-1, -2) @ dZ2, b2 - e_i @ dZ2
    return torch.cat(Zq, dim=2), W1, b1, W2, b2


def _mlp_dual(q, k, target, eta, state, lw, lb, m, n, chunks=_mlp_chunks, group=1):
    W1, b1, W2, b2 = state
    T = q.shape[2]
    Zs = []
    if n:
        g = min(group, -(-n // m))
        nc = -(-n // (g * m)) * g  # whole groups, as in _linear_dual
        qc, kc, tc = (_pad_chunks(x[:, :, :n], nc * m, m) for x in (q, k, target))
        ec = _pad_chunks(eta[:, :, :n], nc * m, m)
        kq = torch.cat([kc, qc], dim=3)
        A1 = torch.tril(qc @ kc.transpose(-1, -2) + 1) * ec.unsqueeze(-2)
        ekT = (ec.unsqueeze(-1) * kc).transpose(-1, -2)
        c = (lb.unsqueeze(2) - tc) * lw.unsqueeze(2)
        w2 = lw.square()
        for parts in zip(*(x.split(g, dim=2) for x in (kq, c, A1, ekT, ec.unsqueeze(-2)))):
            Zq, W1, b1, W2, b2 = chunks(*parts, W1, b1, W2, b2, w2, m)
            Zs.append(Zq)
        Zs = [torch.cat(Zs, dim=2)[:, :, :n]]
    if n < T:
        Zs.append(_gelu(q[:, :, n:] @ W1 + b1) @ W2 + b2)
    Z = torch.cat(Zs, dim=2)
    return q + _ln(Z, lw, lb), (W1, b1, W2, b2)


# ----------------------------------------------------------------------------------------------- TTT readout
def ttt_readout(q: Tensor, k: Tensor, y: Tensor, eta: Tensor, epochs: int) -> Tensor:
    """The TTT readout (module docstring): q [B, NQ, D], k [B, NK, D], one-hot targets y [B, NK, N], eta [B, NK]
    -> logits q W_epochs [B, NQ, N]."""
    return q @ ttt_readout_state(k, y, eta, epochs)


def ttt_readout_state(k: Tensor, y: Tensor, eta: Tensor, epochs: int) -> Tensor:
    """W_epochs [B, D, N] of `ttt_readout`: `epochs` batch gradient steps on sum_j eta_j 0.5 ||k_j W - y_j||^2
    from W_0 = 0."""
    weighted_kT = (eta.unsqueeze(-1) * k).transpose(1, 2)  # [B, D, NK]: (eta * k)^T, the same at every step
    W = weighted_kT @ y  # the first step, from 0
    for _ in range(epochs - 1):
        W = W - weighted_kT @ (k @ W - y)
    return W


# ----------------------------------------------------------------------------------------------- layers
class TTTLayer(nn.Module):
    """Shared shell of TTT-Linear and TTT-MLP: projections, learned inner lr, inner LN, output norm and theta_O.

    forward(x [B, T, width], writers: int or None) -> [B, T, width]: the first `writers` tokens write (None: all),
    the rest only read. Under autocast (trainer.precision bf16-mixed) the projections run in bf16 and the inner
    loop in the parameters' precision.
    Learned pieces, by name: ``theta_kv`` (and ``theta_q`` unless share_qk), ``theta_o``, ``eta_gate``
    (eta = eta_base * sigmoid(eta_gate(x)) / D per head), ``ln_weight``/``ln_bias`` (inner LN) and the
    initial state (``W0``, ``b0`` or ``W1``, ``b1``, ``W2``, ``b2``). After a forward, ``last_eta`` holds the
    inner learning rates used [B, H, T] (detached). With ``record = True`` a forward also keeps, detached,
    ``last_record = {"k", "v" [B, H, T, D], "eta" [B, H, T], "start", "end" (states)}`` for inspection
    (``inner_loss``); it costs no extra computation.
    """

    def __init__(self, width: int, num_heads: int, mini_batch_size: int = 16, eta_base: float = 1.0,
                 share_qk: bool = True, form: str = "dual"):
        super().__init__()
        if width % num_heads:
            raise UserError(f"width {width} is not divisible by num_heads {num_heads}. Set model.init_args.width to a "
                            f"multiple of model.init_args.num_heads")
        if mini_batch_size < 1:
            raise UserError(f"mini_batch_size must be >= 1, got {mini_batch_size}. Set model.init_args.mini_batch_size "
                            f"to 1 or more")
        if eta_base < 0:
            raise UserError(f"eta_base must be >= 0, got {eta_base}. Set model.init_args.eta_base to 0 or more")
        if form not in FORMS:
            raise UserError(f"form must be one of {FORMS}, got {form!r}. Set model.init_args.form to one of them")
        self.width, self.num_heads, self.head_dim = width, num_heads, width // num_heads
        self.mini_batch_size, self.eta_base, self.share_qk, self.form = mini_batch_size, eta_base, share_qk, form
        self.theta_kv = nn.Linear(width, 2 * width, bias=False)
        self.theta_q = None if share_qk else nn.Linear(width, width, bias=False)
        self.eta_gate = nn.Linear(width, num_heads)
        self.ln_weight = nn.Parameter(torch.ones(num_heads, self.head_dim))
        self.ln_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        self.post_norm = nn.LayerNorm(width)
        self.theta_o = nn.Linear(width, width, bias=False)
        nn.init.normal_(self.eta_gate.weight, std=0.02)
        nn.init.zeros_(self.eta_gate.bias)
        self.record, self.last_record = False, None

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def views(self, x: Tensor, writers: int | None = None, eta_scale: float = 1.0
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(q, k, v [B, H, T, D], eta [B, H, T]); eta is 0 from token `writers` on."""
        k, v = self.theta_kv(x).chunk(2, dim=-1)
        q = k if self.theta_q is None else self.theta_q(x)
        eta = eta_scale * self.eta_base / self.head_dim * torch.sigmoid(self.eta_gate(x)).transpose(1, 2)
        if writers is not None:
            eta = eta * (torch.arange(x.shape[1], device=x.device) < writers).to(eta.dtype)
        return self._heads(q), self._heads(k), self._heads(v), eta

    def initial_state(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def f_res(self, z: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        """The inner model's residual branch f_res(z; state): z [B, H, T, D] -> [B, H, T, D]."""
        raise NotImplementedError

    def inner_loss(self, k: Tensor, v: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        """Per-token inner loss 0.5 ||k + LN(f_res(k; state)) - v||^2: [B, H, T]."""
        y = _ln(self.f_res(k, state), self.ln_weight.unsqueeze(1), self.ln_bias.unsqueeze(1))
        return 0.5 * (k + y - v).square().sum(-1)

    def inner(self, q, k, v, eta, state, writers: int | None, mini_batch_size: int
              ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Run the inner model from `state` in mini-batches of `mini_batch_size` tokens (eta 0 from token `writers`
        on): (z [B, H, T, D], end state)."""
        raise NotImplementedError

    @torch.no_grad()
    def recorded_stats(self) -> dict[str, Tensor]:
        """From the last recorded forward: the writing tokens' inner loss under the initial and under the end state
        (and after / before), their inner learning rate (mean, min, max), ||end - initial state|| (mean over the
        batch). Empty without a record."""
        r = self.last_record
        if r is None:
            return {}
        writes = r["eta"] > 0
        before = self.inner_loss(r["k"], r["v"], r["start"])[writes].mean()
        after = self.inner_loss(r["k"], r["v"], r["end"])[writes].mean()
        eta = r["eta"][writes]
        change = sum((e - s).square().flatten(1).sum(1) for s, e in zip(r["start"], r["end"], strict=True))
        return {"inner_loss_before": before, "inner_loss_after": after, "inner_loss_ratio": after / before,
                "eta_mean": eta.mean(), "eta_min": eta.min(), "eta_max": eta.max(),
                "state_change": change.sqrt().mean()}

    def forward(self, x: Tensor, writers: int | None = None, eta_scale: float = 1.0,
                mini_batch_size: int | None = None) -> Tensor:
        """x [B, T, width] -> [B, T, width]; eta scaled by `eta_scale`, inner mini-batches of `mini_batch_size`
        tokens (None: the layer's own)."""
        dtype = self.ln_weight.dtype
        q, k, v, eta = (t.to(dtype) for t in self.views(x, writers, eta_scale))  # float32 from an autocast region
        self.last_eta = eta.detach()  # [B, H, T], for logging
        start = self.initial_state()
        with torch.autocast(x.device.type, enabled=False):  # the inner loop and its state stay in full precision
            z, state = self.inner(q, k, v, eta, start, writers, mini_batch_size or self.mini_batch_size)
        if self.record:
            detach = lambda ts: tuple(t.detach() for t in ts)  # noqa: E731
            self.last_record = {"k": k.detach(), "v": v.detach(), "eta": self.last_eta, "start": detach(start),
                                "end": detach(state)}
        B, T, _ = x.shape
        return self.theta_o(self.post_norm(z.transpose(1, 2).reshape(B, T, self.width)))


class TTTLinear(TTTLayer):
    """TTT layer whose hidden state is a linear model per head: W0 [H, D, D], b0 [H, D]."""

    def __init__(self, width: int, num_heads: int, **options):
        super().__init__(width, num_heads, **options)
        self.W0 = nn.Parameter(torch.randn(num_heads, self.head_dim, self.head_dim) * 0.02)
        self.b0 = nn.Parameter(torch.zeros(num_heads, self.head_dim))

    def initial_state(self):
        return self.W0, self.b0

    def f_res(self, z, state):
        W, b = state
        return z @ W + b.unsqueeze(-2)

    def inner(self, q, k, v, eta, state, writers, mini_batch_size):
        z, W, b = ttt_linear(q, k, v, eta, *state, self.ln_weight, self.ln_bias, mini_batch_size, self.form, writers)
        return z, (W, b)


class TTTMLP(TTTLayer):
    """TTT layer whose hidden state is a 2-layer MLP per head (hidden 4 D): W1 [H, D, 4D], W2 [H, 4D, D]."""

    def __init__(self, width: int, num_heads: int, **options):
        super().__init__(width, num_heads, **options)
        D = self.head_dim
        # fan-in scale, not the 0.02 of TTT-Linear: each layer's inner gradient is scaled by the other layer's
        # weights, so a 0.02 init leaves the inner MLP almost unable to learn (a few-shot probe sat at chance)
        self.W1 = nn.Parameter(torch.randn(num_heads, D, 4 * D) * D**-0.5)
        self.b1 = nn.Parameter(torch.zeros(num_heads, 4 * D))
        self.W2 = nn.Parameter(torch.randn(num_heads, 4 * D, D) * (4 * D) ** -0.5)
        self.b2 = nn.Parameter(torch.zeros(num_heads, D))

    def initial_state(self):
        return self.W1, self.b1, self.W2, self.b2

    def f_res(self, z, state):
        W1, b1, W2, b2 = state
        return _gelu(z @ W1 + b1.unsqueeze(-2)) @ W2 + b2.unsqueeze(-2)

    def inner(self, q, k, v, eta, state, writers, mini_batch_size):
        return ttt_mlp(q, k, v, eta, *state, self.ln_weight, self.ln_bias, mini_batch_size, self.form, writers)
