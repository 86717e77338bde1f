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
    padded = F.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator)
    flip = torch.rand(n, 1, 1, generator=generator) < 0.5
    cols = torch.arange(w).view(1, 1, w)
    rows = (top + torch.arange(h).view(1, h, 1)).expand(n, h, w)
    cols = left + torch.where(flip, w - 1 - cols, cols)  # [n, 1, w]: a flip reads the columns backwards
    x = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows.unsqueeze(1),
               cols.expand(n, h, w).unsqueeze(1)].float()
    brightness, contrast, saturation = (1 + JITTER * (2 * torch.rand(3, n, 1, 1, 1, generator=generator) - 1))
    x = (x * brightness).clamp_(0, 255)  # clamped after each step, as torchvision does
    gray = _gray(x)  # [n, 1, h, w]
    mean = gray.mean((-2, -1), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp_(0, 255)
    if c == 3:
        gray = _gray(x)
        x = (x - gray) * saturation + gray
    return x.round_().clamp_(0, 255).to(torch.uint8).view(shape)


def _gray(x: Tensor) -> Tensor:
    """Luma of [n, C, H, W] (ITU-R 601 weights for RGB, the image itself for one channel): [n, 1, H, W]."""
    if x.shape[1] == 1:
        return x
    return (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
