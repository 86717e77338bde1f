"""TTTReadoutLearner: the encoder's features classified by a TTT layer whose inner model is the classifier.

    e         = encoder(image)                                     [B, T, F]   T = N*K + N*Q, supports first
    h         = e theta                                            theta [F, F], the identity at initialisation
    k_j, q    = unit(h - mu)                                       mu = mean of the supports' h   (per episode)
    eta_j     = eta_base * sigmoid(gate(h_j - mu)) / K              each class's K supports share eta_base at most
    logits    = scale * ttt_readout(q, k, onehot(y), eta, inner_epochs)                          [B, N*Q, N]

``ttt_readout`` (``ttt_meta.nn.ttt``) trains a linear map W [F, N] from 0 on the supports by inner_epochs batch
gradient steps of sum_j eta_j 0.5 ||k_j W - y_j||^2 inside the forward, and the queries read it. At one step and
initialisation it is a cosine prototype classifier; the outer loop learns the encoder, theta, the inner learning
rates and the scale. No parameter belongs to a class, so one model serves any number of ways and shots.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..nn.encoders import make_encoder
from ..nn.ttt import ttt_readout
from .base import EpisodicLearner
from .protonet import prototype_logits


class TTTReadoutLearner(EpisodicLearner):
    """Conv encoder, then the TTT readout (module docstring).

    Args:
        inner_epochs: batch gradient steps of the inner model over the supports (1: linear attention).
        eta_base: the largest inner learning rate a class's supports take together.
        encoder, encoder_channels, in_channels, image_size: the image encoder and the images it reads.
        lr, weight_decay, warmup_steps, lr_schedule: see EpisodicLearner.
    """

    def __init__(self, inner_epochs: int = 1, eta_base: float = 1.0, encoder: str = "conv4",
                 encoder_channels: int = 64, in_channels: int = 1, image_size: int = 28, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 200, lr_schedule: str = "cosine"):
        super().__init__(lr, weight_decay, warmup_steps, lr_schedule)
        if inner_epochs < 1:
            raise UserError(f"inner_epochs must be >= 1, got {inner_epochs}. Set model.init_args.inner_epochs to 1 "
                            f"or more")
        if eta_base <= 0:
            raise UserError(f"eta_base must be > 0, got {eta_base}. Set model.init_args.eta_base to a positive "
                            f"number")
        self.encoder = make_encoder(encoder, in_channels, encoder_channels, image_size)
        features = self.encoder.out_features
        self.theta = nn.Linear(features, features, bias=False)
        nn.init.eye_(self.theta.weight)
        self.gate = nn.Linear(features, 1)
        nn.init.normal_(self.gate.weight, std=0.02)
        nn.init.zeros_(self.gate.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, batch: dict) -> Tensor:
        return self.logit_terms(batch)[0]

    def logit_terms(self, batch: dict, prototype: bool = False) -> tuple[Tensor, Tensor | None]:
        """(the readout's logits [B, NQ, N], with `prototype` ProtoNets' logits of the encoder's features [B, NQ, N]
        else None), from one encoder pass (as ``SequenceMetaLearner.logit_terms``)."""
        support, query, labels, ways = (self.images(batch["support"]), self.images(batch["query"]),
                                        batch["support_labels"], batch["ways"])
        B, NK, NQ = support.shape[0], support.shape[1], query.shape[1]
        e = self.encoder(torch.cat([support, query], 1).flatten(0, 1)).view(B, NK + NQ, -1)
        h = self.theta(e)
        with torch.autocast(h.device.type, enabled=False):  # the inner loop in full precision
            h = h.float()
            h = h - h[:, :NK].mean(1, keepdim=True)
            keys = F.normalize(h, dim=-1)
            eta = self.hparams.eta_base * torch.sigmoid(self.gate(h[:, :NK])).squeeze(-1) * ways / NK  # [B, NK]
            y = F.one_hot(labels, ways).float()  # [B, NK, N]
            logits = self.log_scale.exp() * ttt_readout(keys[:, NK:], keys[:, :NK], y, eta, self.hparams.inner_epochs)
        return logits, prototype_logits(e[:, :NK], labels, e[:, NK:], ways) if prototype else None
