"""ProtoNetLearner (Snell et al. 2017): queries scored by squared Euclidean distance to the class means."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn.encoders import make_encoder
from .base import EpisodicLearner


def prototype_logits(support_features: Tensor, support_labels: Tensor, query_features: Tensor, ways: int) -> Tensor:
    """support_features [B, NK, F], support_labels [B, NK] in 0..ways-1, query_features [B, NQ, F] -> logits
    [B, NQ, ways] = -||e(query) - c_n||^2, with c_n the mean of the support features of class n."""
    onehot = F.one_hot(support_labels, ways).to(support_features.dtype)  # [B, NK, N]
    prototypes = onehot.transpose(1, 2) @ support_features / onehot.sum(1).unsqueeze(-1)  # [B, N, F]
    return -torch.cdist(query_features, prototypes).square()


class ProtoNetLearner(EpisodicLearner):
    """Prototype c = mean of the support embeddings of class c; logits = -||e(query) - prototype||^2
    (``prototype_logits``).

    Args:
        encoder, encoder_channels, in_channels, image_size: the image encoder and the images it reads.
        lr, weight_decay, warmup_steps, lr_schedule: see EpisodicLearner.
    """

    def __init__(self, encoder: str = "conv4", encoder_channels: int = 64, in_channels: int = 1,
                 image_size: int = 28, lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 200,
                 lr_schedule: str = "cosine"):
        super().__init__(lr, weight_decay, warmup_steps, lr_schedule)
        self.encoder = make_encoder(encoder, in_channels, encoder_channels, image_size)

    def forward(self, batch: dict) -> Tensor:
        support, query = self.images(batch["support"]), self.images(batch["query"])
        B, NK, NQ = support.shape[0], support.shape[1], query.shape[1]
        emb = self.encoder(torch.cat([support, query], 1).flatten(0, 1)).view(B, NK + NQ, -1)
        return prototype_logits(emb[:, :NK], batch["support_labels"], emb[:, NK:], batch["ways"])
