"""Image encoders: images [B, C, H, W] float -> features [B, F]."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Conv4(nn.Module):
    """The standard few-shot backbone (Vinyals et al. 2016): 4 x [conv3x3, BatchNorm, ReLU, maxpool 2].

    28x28 -> 1x1 (F = channels); 84x84 -> 5x5 (F = 25 * channels). With batch_stats, BatchNorm always
    normalises with the statistics of the batch it sees (MAML's per-task statistics) and keeps no running ones.
    """

    def __init__(self, in_channels: int = 1, channels: int = 64, image_size: int = 28, batch_stats: bool = False):
        super().__init__()
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"Conv4 halves the image 4 times: image_size {image_size} is too small (need >= 16)")
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1),
                       nn.BatchNorm2d(channels, track_running_stats=not batch_stats), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.out_features = channels * side * side
        self.to(memory_format=torch.channels_last)  # 1.5x faster convolutions on CPU (measured, 28x28, 64 ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last))


ENCODERS = {"conv4": Conv4}


def make_encoder(name: str, in_channels: int, channels: int, image_size: int, batch_stats: bool = False) -> nn.Module:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    return ENCODERS[name](in_channels=in_channels, channels=channels, image_size=image_size, batch_stats=batch_stats)
