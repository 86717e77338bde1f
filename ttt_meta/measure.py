"""Measurements, written once for the learners, the scripts and the tests.

- ``episode_accuracy(logits [B, NQ, N], labels [B, NQ]) -> [B]``: the fraction of each episode's queries scored
  right; ``confidence_interval(acc [n]) -> (mean, 1.96 * std / sqrt(n))``, the 95% interval reported everywhere.
"""

from __future__ import annotations

import math

from torch import Tensor


def episode_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-episode accuracy [B] of query logits [B, NQ, N] against query labels [B, NQ]."""
    return (logits.argmax(-1) == labels).float().mean(1)


def confidence_interval(acc: Tensor) -> tuple[float, float]:
    """Mean and 95% half-interval 1.96 * std / sqrt(n) of per-episode accuracies [n]."""
    n = acc.numel()
    std = acc.std().item() if n > 1 else 0.0
    return acc.mean().item(), 1.96 * std / math.sqrt(n)
