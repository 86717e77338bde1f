"""Data sources: synthetic glyphs, and Omniglot on a tiny fixture (plus the real set when TTT_META_DATA is set)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ttt_meta.data import images, omniglot
from ttt_meta.data.omniglot import load_omniglot
from ttt_meta.data.synthetic import load_synthetic, make_glyphs


# Synthetic glyphs ------------------------------------------------------------------------------------------


def test_synthetic_shapes_dtype_range():
    data = load_synthetic((6, 3, 2), samples_per_class=5, image_size=20)
    for split, n in zip(("train", "val", "test"), (6, 3, 2)):
        images = data[split].images
        assert images.shape == (n, 5, 1, 20, 20) and images.dtype == torch.uint8
        assert len(data[split].names) == n
        assert images.min() == 0 and images.max() == 255
        assert 0.02 < images.float().mean() / 255 < 0.4  # thin bright strokes on a dark background


def test_synthetic_deterministic():
    a, b, c = make_glyphs(4, seed=1), make_glyphs(4, seed=1), make_glyphs(4, seed=2)
    assert torch.equal(a.images, b.images) and a.names == b.names
    assert not torch.equal(a.images, c.images)


def test_synthetic_splits_have_different_classes():
    data = load_synthetic((3, 3, 3), samples_per_class=2)
    for x, y in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(data[x].names) & set(data[y].names)
        assert not torch.equal(data[x].images, data[y].images)


def test_synthetic_is_a_few_shot_problem():
    """5-way 1-shot nearest neighbour on raw pixels: well above chance (20%), far from perfect."""
    x = make_glyphs(40, seed=7).images.float().flatten(2)  # [C, S, D]
    g = torch.Generator().manual_seed(0)
    correct = 0
    for _ in range(200):
        classes = torch.randperm(40, generator=g)[:5]
        samples = torch.randperm(20, generator=g)[:2]
        support, query = x[classes, samples[0]], x[classes, samples[1]]  # [5, D] each
        correct += (torch.cdist(query, support).argmin(1) == torch.arange(5)).sum().item()
    assert 0.4 < correct / 1000 < 0.95


# Omniglot on a tiny fixture in torchvision's layout ------------------------------------------------------

CHARACTERS = {
    "images_background": ["Alpha/character01", "Alpha/character02", "Beta/character01"],
    "images_evaluation": ["Gamma/character01", "Gamma/character02"],
}
SPLIT = {"train": ["Alpha/character01", "Beta/character01", "Gamma/character02"],
         "val": ["Alpha/character02"], "test": ["Gamma/character01"]}


def make_omniglot(root: Path) -> Path:
    """Write 5 characters x 20 images (105x105, mode "1", black strokes on white) under root/omniglot-py."""
    for c, (folder, name) in enumerate((f, n) for f, names in CHARACTERS.items() for n in names):
        directory = root / "omniglot-py" / folder / name
        directory.mkdir(parents=True)
        for drawer in range(1, 21):
            pixels = np.ones((105, 105), dtype=bool)  # True = white
            pixels[20 + 10 * c : 30 + 10 * c, 10 + drawer : 60 + drawer] = False  # a bar, per character
            Image.fromarray(pixels).save(directory / f"{c + 1:04d}_{drawer:02d}.png")
    return root


def listing(root: Path) -> list:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in [root, *root.rglob("*")])


@pytest.fixture
def root(tmp_path):
    return make_omniglot(tmp_path / "data")


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_extracted_folders_load(root, cache):
    data = load_omniglot(root, cache_dir=cache, split=SPLIT)
    for split, names in SPLIT.items():
        assert data[split].names == names
        assert data[split].images.shape == (len(names), 20, 1, 28, 28)
        assert data[split].images.dtype == torch.uint8
    bar = data["val"].images[0, 0, 0]  # Alpha/character02: a bar at rows 30-40 of 105
    assert bar[0, 0] == 0 and bar[:, 14].max() == 255  # background dark, strokes bright (inverted)
    assert (bar > 0).float().mean() < 0.3


def test_cache_written_and_reused(root, cache, monkeypatch):
    first = load_omniglot(root, cache_dir=cache, split=SPLIT)
    (file,) = cache.iterdir()
    assert file.suffix == ".pt"

    def fail(*args):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(images, "decode_all", fail)
    second = load_omniglot(root, cache_dir=cache, split=SPLIT)
    assert all(torch.equal(first[k].images, second[k].images) for k in SPLIT)


def test_nothing_written_into_root(root, cache):
    before = listing(root)
    paths = [root, *root.rglob("*")]
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        load_omniglot(root, cache_dir=cache, split=SPLIT)
    finally:
        for p in paths:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert listing(root) == before


@pytest.mark.parametrize("bad", ["unreadable", "mismatching"])
def test_bad_cache_is_rebuilt(root, cache, bad):
    expected = load_omniglot(root, cache_dir=cache, split=SPLIT)
    (file,) = cache.iterdir()
    if bad == "unreadable":
        file.write_bytes(b"not a torch file")
    else:
        torch.save({"fingerprint": "other", "names": [], "images": torch.zeros(1, dtype=torch.uint8)}, file)
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = load_omniglot(root, cache_dir=cache, split=SPLIT)
    assert all(torch.equal(expected[k].images, rebuilt[k].images) for k in SPLIT)
    assert torch.load(file, weights_only=True)["names"] == sorted(sum(CHARACTERS.values(), []))


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"omniglot-py/images_background.*data\.download: true"):
        load_omniglot(tmp_path / "nowhere", split=SPLIT)


def test_character_with_too_few_images(root, cache):
    next((root / "omniglot-py/images_evaluation/Gamma/character02").iterdir()).unlink()
    with pytest.raises(ValueError, match="Gamma/character02 has 19"):
        load_omniglot(root, cache_dir=cache, split=SPLIT)


def test_character_missing_from_data(root, cache):
    split = {**SPLIT, "test": ["Gamma/character01", "Gamma/character03"]}
    with pytest.raises(FileNotFoundError, match="found 5 of 6 .* incomplete"):
        load_omniglot(root, cache_dir=cache, split=split)


def test_truncated_png(root, cache):
    png = root / "omniglot-py/images_background/Beta/character01/0003_07.png"
    png.write_bytes(png.read_bytes()[:60])
    with pytest.raises(ValueError, match="0003_07.png"):
        load_omniglot(root, cache_dir=cache, split=SPLIT)


# Real Omniglot ---------------------------------------------------------------------------------------------


def test_real_omniglot():
    data_root = os.environ.get("TTT_META_DATA")
    if not data_root or not os.path.isdir(os.path.join(data_root, "omniglot", "omniglot-py")):
        pytest.skip("real Omniglot not found: set TTT_META_DATA to a folder holding omniglot/omniglot-py")
    data = load_omniglot(os.path.join(data_root, "omniglot"))  # default cache dir: decoded once per machine
    shipped = json.loads(omniglot.SPLIT_FILE.read_text())
    for split, n in (("train", 1100), ("val", 100), ("test", 423)):
        assert data[split].images.shape == (n, 20, 1, 28, 28) and data[split].images.dtype == torch.uint8
        assert data[split].names == shipped[split]
    names = sorted(set().union(*(data[k].names for k in ("train", "val", "test"))))
    assert len(names) == 1623
    # The shipped split is the one its "method" describes.
    order = torch.randperm(1623, generator=torch.Generator().manual_seed(shipped["seed"])).tolist()
    assert shipped["val"] == sorted(names[i] for i in order[1100:1200])
