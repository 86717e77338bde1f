"""TTTReadoutLearner: TTT layers over the episode, the last of which is the classifier.

    e         = encoder(image)                                     [B, T, F]   T = N*K + N*Q, supports first
    x         = e theta                                            theta [F, F], the identity at initialisation
    x         = x + C_l(LN(x))                                     l = 1 .. context_layers     (context layers)
    h         = x - mu ;  k_j, q = unit(h)                          mu = mean of the supports' h   (per episode)
    eta_j     = eta_base * sigmoid(gate(h_j)) / K                   each class's K supports share eta_base at most
    logits    = scale * ttt_readout(q, k, onehot(y), eta, inner_epochs)                          [B, N*Q, N]

A context layer C_l is a TTT-Linear layer (``ttt_meta.nn.ttt``) over the episode: its inner model is trained on
the supports, read inner_epochs times in a row, by one gradient step per context_mini_batch
consecutive tokens of that stream (0: one step per pass over all supports); then every token, support and query
alike, reads the end state. So a query depends on the supports and itself alone, and a support on all supports
(set-to-set adaptation of the features, as FEAT's). It runs as one TTT sequence: the supports once per pass as
writers, then every token as a reader:

    C_l(x) = TTT([x_S, ..., x_S, x_S, x_Q], writers = inner_epochs * N*K)[readers]

Its output projection starts at 0, so at initialisation the learner is the readout alone. (The issue-30 search
also screened TTT-MLP and readout context layers, label-carrying keys and a learned W0 with label-code targets;
none was adopted, and they left the code: results/search_omniglot_20w*.json name the commits that hold them.)

The last layer, ``ttt_readout``, trains a linear map W [F, N] from 0 on the supports by inner_epochs batch gradient
steps of sum_j eta_j 0.5 ||k_j W - y_j||^2 inside the forward, and the queries read it. At one step it is a cosine
prototype classifier with learned support weights. No parameter belongs to a class, so one model serves any
number of ways and shots.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..nn.encoders import make_encoder
from ..nn.ttt import TTTLayer, TTTLinear, ttt_readout_state
from .base import EpisodicLearner
from .protonet import prototype_logits

class ContextLayer(nn.Module):
    """x + TTT(LN(x)) with every token reading the state the supports wrote (module docstring)."""

    def __init__(self, width: int, num_heads: int, mini_batch_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        # mini_batch_size 0: all supports in one batch (set per forward)
        self.ttt = TTTLinear(width, num_heads, mini_batch_size=max(mini_batch_size, 1))
        self.all_supports = mini_batch_size == 0
        nn.init.zeros_(self.ttt.theta_o.weight)  # the identity at initialisation

    def forward(self, x: Tensor, NK: int, shots: int, epochs: int) -> Tensor:
        """x [B, T, F] (the NK supports first) -> [B, T, F]."""
        y = self.norm(x)
        sequence = torch.cat([y[:, :NK]] * epochs + [y], dim=1)
        out = self.ttt(sequence, writers=epochs * NK, eta_scale=1 / shots,
                       mini_batch_size=NK if self.all_supports else None)
        return x + out[:, epochs * NK:]


def readout_stats(record: dict) -> dict[str, Tensor]:
    """A readout's inner-loop scalars from its record {"k" [B, NK, F], "y" [B, NK, C], "eta" [B, NK], "start",
    "end" [B, F, C]}: the supports' inner loss 0.5 ||k_j W - y_j||^2 under the initial and the end state (and after /
    before), the inner learning rates (mean, min, max), ||W_end - W_start|| (mean over episodes)."""
    loss = lambda W: 0.5 * (record["k"] @ W - record["y"]).square().sum(-1).mean()  # noqa: E731
    before, after, eta = loss(record["start"]), loss(record["end"]), record["eta"]
    return {"inner_loss_before": before, "inner_loss_after": after, "inner_loss_ratio": after / before,
            "eta_mean": eta.mean(), "eta_min": eta.min(), "eta_max": eta.max(),
            "state_change": (record["end"] - record["start"]).flatten(1).norm(dim=1).mean()}


class TTTReadoutLearner(EpisodicLearner):
    """Conv encoder, context_layers TTT layers over the episode, then the TTT readout (module docstring).

    Args:
        inner_epochs: passes of every TTT layer's inner model over the supports (the readout's: batch gradient
            steps; 1: linear attention).
        eta_base: the largest inner learning rate a class's supports take together in the readout.
        context_layers: TTT-Linear layers over the episode before the readout (0: the readout alone).
        context_heads: heads of the context layers (the feature width must divide by it).
        context_mini_batch: supports per inner mini-batch of the context layers; 0: all supports at once.
        encoder, encoder_channels, in_channels, image_size: the image encoder and the images it reads.
        lr, weight_decay, warmup_steps, lr_schedule: see EpisodicLearner.
    """

    def __init__(self, inner_epochs: int = 1, eta_base: float = 1.0, context_layers: int = 0,
                 context_heads: int = 4, context_mini_batch: int = 0, encoder: str = "conv4",
                 encoder_channels: int = 64, in_channels: int = 1, image_size: int = 28, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 200, lr_schedule: str = "cosine"):
        super().__init__(lr, weight_decay, warmup_steps, lr_schedule)
        if inner_epochs < 1:
            raise UserError(f"inner_epochs must be >= 1, got {inner_epochs}. Set model.init_args.inner_epochs to 1 "
                            f"or more")
        if eta_base <= 0:
            raise UserError(f"eta_base must be > 0, got {eta_base}. Set model.init_args.eta_base to a positive "
                            f"number")
        for name, value in (("context_layers", context_layers), ("context_mini_batch", context_mini_batch)):
            if value < 0:
                raise UserError(f"{name} must be >= 0, got {value}. Set model.init_args.{name} to 0 or more")
        self.encoder = make_encoder(encoder, in_channels, encoder_channels, image_size)
        features = self.encoder.out_features
        self.theta = nn.Linear(features, features, bias=False)
        nn.init.eye_(self.theta.weight)
        self.context = nn.ModuleList(ContextLayer(features, context_heads, context_mini_batch)
                                     for _ in range(context_layers))
        self.gate = nn.Linear(features, 1)
        nn.init.normal_(self.gate.weight, std=0.02)
        nn.init.zeros_(self.gate.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.recording, self.last_record = False, None

    def ttt_layers(self) -> list[tuple[str, TTTLayer]]:
        """The context layers' TTT layers (each with record, last_record and recorded_stats)."""
        return [(f"context.{i}", layer.ttt) for i, layer in enumerate(self.context)]

    def forward(self, batch: dict) -> Tensor:
        return self.logit_terms(batch)[0]

    def logit_terms(self, batch: dict, prototype: bool = False) -> tuple[Tensor, Tensor | None]:
        """(the readout's logits [B, NQ, N], with `prototype` ProtoNets' logits of the encoder's features [B, NQ, N]
        else None), from one encoder pass (as ``SequenceMetaLearner.logit_terms``)."""
        support, query, labels, ways = (self.images(batch["support"]), self.images(batch["query"]),
                                        batch["support_labels"], batch["ways"])
        B, NK, NQ = support.shape[0], support.shape[1], query.shape[1]
        epochs = self.hparams.inner_epochs
        e = self.encoder(torch.cat([support, query], 1).flatten(0, 1)).view(B, NK + NQ, -1)
        x = self.theta(e)
        for layer in self.context:
            x = layer(x, NK, NK // ways, epochs)
        with torch.autocast(x.device.type, enabled=False):  # the inner loop in full precision
            h = x.to(self.gate.weight.dtype)  # float32 from an autocast region
            h = h - h[:, :NK].mean(1, keepdim=True)
            keys = F.normalize(h, dim=-1)
            eta = self.hparams.eta_base * torch.sigmoid(self.gate(h[:, :NK])).squeeze(-1) * ways / NK  # [B, NK]
            y = F.one_hot(labels, ways).to(h)  # [B, NK, N]
            W = ttt_readout_state(keys[:, :NK], y, eta, epochs)  # [B, F, N]
            logits = self.log_scale.exp() * (keys[:, NK:] @ W)
        if self.recording:
            self.last_record = {"k": keys[:, :NK].detach(), "y": y.detach(), "eta": eta.detach(),
                                "start": torch.zeros_like(W),
                                "end": W.detach()}
        return logits, prototype_logits(e[:, :NK], labels, e[:, NK:], ways) if prototype else None

    def record_inner_loop(self, on: bool) -> None:
        self.recording, self.last_record = on, None
        for _, layer in self.ttt_layers():
            layer.record, layer.last_record = on, None

    @torch.no_grad()
    def inner_loop_stats(self) -> dict[str, Tensor]:
        """Per context layer (``TTTLayer.recorded_stats``) and for the readout: the supports' inner loss
        0.5 ||k_j W - y_j||^2 under W0 and under W_end (and after / before), their inner learning rates (mean, min,
        max) and ||W_end - W0|| (mean over episodes), tagged ttt/<layer>/<quantity>."""
        stats = {f"ttt/{name}/{key}": value for name, layer in self.ttt_layers()
                 for key, value in layer.recorded_stats().items()}
        if self.last_record is not None:
            stats.update({f"ttt/readout/{k}": v for k, v in readout_stats(self.last_record).items()})
        return stats
