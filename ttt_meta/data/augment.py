"""Training augmentation of natural images, batched on uint8 tensors and drawn from a given generator.

Each image independently: random crop after zero padding by size // 8 pixels (10 at 84x84, 4 at 32x32), a
horizontal flip with probability 1/2, and colour jitter (brightness, contrast, saturation factors uniform in
[0.6, 1.4], applied in that order; torchvision's ColorJitter(0.4, 0.4, 0.4) draws the same factors in a
random order). The generator makes a training batch a function of its seed alone, so a resumed run sees the
same augmented images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

JITTER = 0.4


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """uint8 [..., C, H, W] -> uint8 [..., C, H, W], each image cropped, flipped and colour-jittered at random."""
    shape = images.shape
    x = images.reshape(-1, *shape[-3:])
    n, c, h, w = x.shape
    pad = max(1, h // 8)
    top = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    brightness, contrast, saturation = (1 + JITTER * (2 * torch.rand(3, n, 1, 1, 1, generator=generator) - 1))
    # the crop: rows, then columns (read backwards when flipped) gathered from the zero-padded image
    rows = top + torch.arange(h)  # [n, h]
    cols = left + torch.where(flip, torch.arange(w - 1, -1, -1), torch.arange(w))  # [n, w]
    x = F.pad(x, (pad, pad, pad, pad))
    x = x.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * pad))
    x = x.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w)).float()
    # colour jitter, in place; clamped after each step, as torchvision does
    x.mul_(brightness).clamp_(0, 255)
    mean = _gray(x.mean((-2, -1), keepdim=True))  # [n, 1, 1, 1], the mean luma
    x.sub_(mean).mul_(contrast).add_(mean).clamp_(0, 255)
    if c == 3:
        gray = _gray(x)
        x.sub_(gray).mul_(saturation).add_(gray)
    return x.round_().clamp_(0, 255).to(torch.uint8).view(shape)


def _gray(x: Tensor) -> Tensor:
    """Luma of [n, C, H, W] (ITU-R 601 weights for RGB, the image itself for one channel): [n, 1, H, W]."""
    if x.shape[1] == 1:
        return x
    return (x[:, 0:1] * 0.299).add_(x[:, 1:2], alpha=0.587).add_(x[:, 2:3], alpha=0.114)
