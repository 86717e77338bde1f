"""Synthetic Omniglot-like glyphs rendered in-process from a seed."""

import math

import torch

from ..errors import UserError
from .episodes import SPLITS, ClassImages

_POINTS_PER_STROKE = 4  # cubic Bezier control points
_SEGMENTS_PER_STROKE = 8  # polyline segments a stroke is drawn with
_MAX_STROKES = 4
_CHUNK = 128  # images per rendering step: keeps the [n, H*W, segments] distance field small


def make_glyphs(num_classes: int, samples_per_class: int = 20, *, image_size: int, seed: int = 0) -> ClassImages:
    """Render `num_classes` random glyphs, each drawn `samples_per_class` times with jitter.

    A class is 2-4 cubic Bezier strokes; each sample moves the control points a little and applies a small
    random rotation, scale, shear, shift and stroke width. Returns images uint8 [C, S, 1, H, W] with
    H = W = image_size (28 natively: ``registry.DATASETS``), strokes 255 on a 0 background, names
    "glyph<seed>_<c>". The same arguments give the same bytes on every call.
    """
    if num_classes < 1 or samples_per_class < 1:
        raise UserError(f"need num_classes >= 1 and samples_per_class >= 1, got {num_classes} and {samples_per_class}")
    g = torch.Generator().manual_seed(seed)
    c, s, k, p = num_classes, samples_per_class, _MAX_STROKES, _POINTS_PER_STROKE

    # Class shape: control points [C, K, P, 2] in [-0.75, 0.75]; strokes beyond the class's 2-4 are unused.
    shape = torch.rand(c, k, p, 2, generator=g) * 1.5 - 0.75
    num_strokes = torch.randint(2, k + 1, (c,), generator=g)
    used = torch.arange(k) < num_strokes[:, None]  # [C, K]

    # Per-sample jitter: control point noise, then rotation, anisotropic scale, shear and shift.
    points = shape[:, None] + 0.08 * torch.randn(c, s, k, p, 2, generator=g)  # [C, S, K, P, 2]
    angle = (torch.rand(c, s, generator=g) - 0.5) * 0.5
    scale = 1 + (torch.rand(c, s, 2, generator=g) - 0.5) * 0.3
    shear = (torch.rand(c, s, generator=g) - 0.5) * 0.3
    shift = (torch.rand(c, s, 2, generator=g) - 0.5) * 0.2
    width = 0.045 + 0.03 * torch.rand(c, s, generator=g)  # stroke half-width, in [-1, 1] image units

    cos, sin = angle.cos(), angle.sin()
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [C, S, 2, 2]
    shear_m = torch.zeros(c, s, 2, 2)
    shear_m[..., 0, 0], shear_m[..., 0, 1], shear_m[..., 1, 1] = 1, shear, 1
    affine = rotation @ shear_m * scale[..., None, :]
    points = torch.einsum("csij,cskpj->cskpi", affine, points) + shift[:, :, None, None]

    # Bezier strokes -> polyline segments [C, S, K*L, 2] (start a, end b); unused strokes are masked out.
    t = torch.linspace(0, 1, _SEGMENTS_PER_STROKE + 1)
    basis = torch.stack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3], -1)  # [L+1, P]
    curve = torch.einsum("lp,cskpi->cskli", basis, points)
    a = curve[:, :, :, :-1].flatten(2, 3)
    b = curve[:, :, :, 1:].flatten(2, 3)
    segment_used = used.repeat_interleave(_SEGMENTS_PER_STROKE, 1)[:, None].expand(c, s, -1)

    images = _render(a.flatten(0, 1), b.flatten(0, 1), segment_used.flatten(0, 1), width.flatten(), image_size)
    names = [f"glyph{seed}_{i}" for i in range(c)]
    return ClassImages(images.view(c, s, 1, image_size, image_size), names)


def _render(a: torch.Tensor, b: torch.Tensor, used: torch.Tensor, width: torch.Tensor, size: int) -> torch.Tensor:
    """Draw segments a[n, m] -> b[n, m] (xy in [-1, 1]) where used[n, m], half-width width[n]: uint8 [N, size, size]."""
    coords = (torch.arange(size) + 0.5) / size * 2 - 1
    py, px = torch.meshgrid(coords, coords, indexing="ij")
    px, py = px.reshape(1, -1, 1), py.reshape(1, -1, 1)  # [1, HW, 1]
    ab = b - a
    inv_len2 = 1 / (ab * ab).sum(-1).clamp_min(1e-12)
    pixel_size = 2 / size
    out = torch.empty(a.shape[0], size * size, dtype=torch.uint8)
    for start in range(0, a.shape[0], _CHUNK):
        sl = slice(start, start + _CHUNK)
        ax, ay, abx, aby = (v[sl, None] for v in (a[..., 0], a[..., 1], ab[..., 0], ab[..., 1]))  # [n, 1, M]
        dx, dy = px - ax, py - ay  # pixel - segment start, [n, HW, M]
        t = ((dx * abx + dy * aby) * inv_len2[sl, None]).clamp_(0, 1)
        dx.sub_(t * abx).square_()
        dy.sub_(t * aby).square_()
        dist2 = dx.add_(dy).masked_fill_(~used[sl, None], math.inf).amin(-1)  # squared distance, [n, HW]
        # Linear anti-aliasing over one pixel around the stroke edge.
        ink = ((width[sl, None] - dist2.sqrt_()) / pixel_size + 0.5).clamp_(0, 1)
        out[sl] = (ink * 255).round_().to(torch.uint8)
    return out.view(-1, size, size)


def load_synthetic(
    num_classes: tuple[int, int, int] = (400, 100, 100),
    samples_per_class: int = 20,
    *,
    image_size: int,
    seed: int = 0,
) -> dict[str, ClassImages]:
    """Synthetic few-shot splits {"train", "val", "test"} with num_classes[i] classes each.

    Split i is make_glyphs(..., seed=3 * seed + i), so splits never share a seed and differ in classes.
    """
    return {
        split: make_glyphs(n, samples_per_class, image_size=image_size, seed=3 * seed + i)
        for i, (split, n) in enumerate(zip(SPLITS, num_classes))
    }
