"""ProtoNetLearner (Snell et al. 2017): queries scored by squared Euclidean distance to the class means; and
OnlineProtoNetLearner, its form for a stream (running class means, a learned score for an unseen class)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def running_prototype_logits(features: Tensor, labels: Tensor, ways: int, unseen: Tensor) -> Tensor:
    """Step logits of a stream [B, T, ways] from its features [B, T, F] and labels [B, T]: at step t,
    -||e_t - c_n(t)||^2 with c_n(t) the mean of the features of the steps s < t of class n, and `unseen` (a
    scalar) for a class no step before t had."""
    onehot = F.one_hot(labels, ways).to(features.dtype)  # [B, T, N]
    before = onehot.cumsum(1) - onehot  # [B, T, N]: steps of class n before t
    sums = (onehot.unsqueeze(-1) * features.unsqueeze(2)).cumsum(1)  # [B, T, N, F], steps up to t
    sums = sums - onehot.unsqueeze(-1) * features.unsqueeze(2)  # steps before t
    prototypes = sums / before.clamp(min=1).unsqueeze(-1)
    distance = (features.unsqueeze(2) - prototypes).square().sum(-1)  # [B, T, N]
    return torch.where(before > 0, -distance, unseen.to(distance.dtype))


class OnlineProtoNetLearner(ProtoNetLearner):
    """ProtoNets on a stream (the online protocol): step t is scored against the running means of the classes
    seen before it (``running_prototype_logits``); a class not seen yet scores -beta, beta learned (the new-class
    threshold of Ren et al. 2020's online ProtoNet), so a first instance can be told apart as new. Batch
    episodes are scored as ProtoNetLearner's.

    Args:
        unseen_distance: beta at initialisation, a squared distance (default: the feature width, about the
            squared distance of two images' features at initialisation).
        encoder, encoder_channels, in_channels, image_size, lr, weight_decay, warmup_steps, lr_schedule: see
            ProtoNetLearner.
    """

    learns_online = True

    def __init__(self, unseen_distance: float | None = None, encoder: str = "conv4", encoder_channels: int = 64,
                 in_channels: int = 1, image_size: int = 28, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 200, lr_schedule: str = "cosine"):
        super().__init__(encoder, encoder_channels, in_channels, image_size, lr, weight_decay, warmup_steps,
                         lr_schedule)
        beta = unseen_distance or self.encoder.out_features
        self.log_unseen_distance = nn.Parameter(torch.tensor(math.log(beta)))

    def stream_logits(self, batch: dict) -> Tensor:
        stream = self.images(batch["stream"])
        features = self.encoder(stream.flatten(0, 1)).view(*stream.shape[:2], -1)
        return running_prototype_logits(features, batch["stream_labels"], batch["ways"],
                                        -self.log_unseen_distance.exp())
