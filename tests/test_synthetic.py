"""Synthetic glyphs: shapes, determinism, disjoint splits, and a few-shot problem of the right difficulty."""

import torch

from ttt_meta.data.synthetic import load_synthetic, make_glyphs


def test_synthetic_shapes_dtype_range():
    data = load_synthetic((6, 3, 2), samples_per_class=5, image_size=20)
    for split, n in zip(("train", "val", "test"), (6, 3, 2)):
        images = data[split].images
        assert images.shape == (n, 5, 1, 20, 20) and images.dtype == torch.uint8
        assert len(data[split].names) == n
        assert images.min() == 0 and images.max() == 255
        assert 0.02 < images.float().mean() / 255 < 0.4  # thin bright strokes on a dark background


def test_synthetic_deterministic():
    a, b, c = (make_glyphs(4, image_size=28, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.images, b.images) and a.names == b.names
    assert not torch.equal(a.images, c.images)


def test_synthetic_splits_have_different_classes():
    data = load_synthetic((3, 3, 3), samples_per_class=2, image_size=28)
    for x, y in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(data[x].names) & set(data[y].names)
        assert not torch.equal(data[x].images, data[y].images)


def test_synthetic_is_a_few_shot_problem():
    """5-way 1-shot nearest neighbour on raw pixels: well above chance (20%), far from perfect."""
    x = make_glyphs(40, image_size=28, seed=7).images.float().flatten(2)  # [C, S, D]
    g = torch.Generator().manual_seed(0)
    correct = 0
    for _ in range(200):
        classes = torch.randperm(40, generator=g)[:5]
        samples = torch.randperm(20, generator=g)[:2]
        support, query = x[classes, samples[0]], x[classes, samples[1]]  # [5, D] each
        correct += (torch.cdist(query, support).argmin(1) == torch.arange(5)).sum().item()
    assert 0.4 < correct / 1000 < 0.95
