"""Training augmentation of natural images: crops of the padded image, flips, and colour jitter."""

import torch

from ttt_meta.data import augment as augment_module
from ttt_meta.data.augment import augment


def test_augment_geometry(monkeypatch):
    """Without colour jitter, each output is a crop of the zero-padded image, flipped or not."""
    monkeypatch.setattr(augment_module, "JITTER", 0.0)
    x = torch.randint(0, 256, (2, 4, 3, 16, 16), dtype=torch.uint8)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    pad = 2  # 16 // 8
    flips = 0
    for image, result in zip(x.flatten(0, 1), out.flatten(0, 1)):
        padded = torch.nn.functional.pad(image, (pad,) * 4)
        crops = [(padded[:, i:i + 16, j:j + 16], flip) for i in range(2 * pad + 1) for j in range(2 * pad + 1)
                 for flip in (False, True)]
        matches = [flip for crop, flip in crops if torch.equal(crop.flip(-1) if flip else crop, result)]
        assert matches
        flips += matches[0]
    assert 0 < flips < 8


def test_augment_jitter():
    x = torch.full((64, 3, 8, 8), 100, dtype=torch.uint8)
    x[:, 0] = 200
    out = augment(x, torch.Generator().manual_seed(1)).float()
    centre = out[..., 2:6, 2:6]  # inside any crop of a padded 8x8 image
    brightness = centre.mean((1, 2, 3)) / x.float().mean()
    assert brightness.min() < 0.8 and brightness.max() > 1.2  # factors spread over [0.6, 1.4]


def test_augment_jitter_saturates_instead_of_wrapping():
    """A bright pixel (250) brightened by a factor up to 1.4 stays at 255: uint8 arithmetic that wrapped around
    would turn 250 * 1.3 = 325 into 69; darkened by at most 0.6 it stays at 150 or more."""
    x = torch.full((64, 1, 8, 8), 250, dtype=torch.uint8)  # one channel, uniform: contrast leaves it as it is
    centre = augment(x, torch.Generator().manual_seed(1))[..., 2:6, 2:6]
    per_image = centre.flatten(1)
    assert (per_image == per_image[:, :1]).all()  # uniform images stay uniform
    values = per_image[:, 0]
    assert (values == 255).sum() > 10 and values.min() >= 150, values.tolist()
