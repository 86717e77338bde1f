"""Omniglot on a tiny fixture in torchvision's layout (plus the real set when TTT_META_DATA is set)."""

import json

import pytest
import torch
from fixtures import SPLIT, listing, make_omniglot

from ttt_meta.data import images, omniglot
from ttt_meta.data.omniglot import load_omniglot


@pytest.fixture
def root(tmp_path):
    return make_omniglot(tmp_path / "data")


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_extracted_folders_load(root, cache):
    data = load_omniglot(root, cache_dir=cache, split=SPLIT, image_size=28)
    for split, names in SPLIT.items():
        assert data[split].names == names
        assert data[split].images.shape == (len(names), 20, 1, 28, 28)
        assert data[split].images.dtype == torch.uint8
    bar = data["val"].images[0, 0, 0]  # Alpha/character02: a bar at rows 30-40 of 105
    assert bar[0, 0] == 0 and bar[:, 14].max() == 255  # background dark, strokes bright (inverted)
    assert (bar > 0).float().mean() < 0.3


def test_cache_written_and_reused(root, cache, monkeypatch):
    first = load_omniglot(root, cache_dir=cache, split=SPLIT, image_size=28)
    (file,) = cache.iterdir()
    assert file.suffix == ".pt"

    def fail(*args):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(images, "decode_all", fail)
    second = load_omniglot(root, cache_dir=cache, split=SPLIT, image_size=28)
    assert all(torch.equal(first[k].images, second[k].images) for k in SPLIT)


def test_nothing_written_into_root(root, cache):
    before = listing(root)
    paths = [root, *root.rglob("*")]
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        load_omniglot(root, cache_dir=cache, split=SPLIT, image_size=28)
    finally:
        for p in paths:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert listing(root) == before


@pytest.mark.parametrize("bad", ["unreadable", "mismatching"])
def test_bad_cache_is_rebuilt(root, cache, bad):
    expected = load_omniglot(root, cache_dir=cache, split=SPLIT, image_size=28)
    (file,) = cache.iterdir()
    if bad == "unreadable":
        file.write_bytes(b"not a torch file")
    else:
        torch.save({"fingerprint": "other", "names": [], "images": torch.zeros(1, dtype=torch.uint8)}, file)
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = load_omniglot(root, cache_dir=cache, split=SPLIT, image_size=28)
    assert all(torch.equal(expected[k].images, rebuilt[k].images) for k in SPLIT)
    assert torch.load(file, weights_only=True)["names"] == [f"{s}/{n}" for s, names in SPLIT.items() for n in names]


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"omniglot-py/images_background.*data\.download: true"):
        load_omniglot(tmp_path / "nowhere", split=SPLIT, image_size=28)


def test_character_with_too_few_images(root, cache):
    next((root / "omniglot-py/images_evaluation/Gamma/character02").iterdir()).unlink()
    with pytest.raises(ValueError, match="Gamma/character02 has 19"):
        load_omniglot(root, cache_dir=cache, split=SPLIT, image_size=28)


def test_character_missing_from_data(root, cache):
    split = {**SPLIT, "test": ["Gamma/character01", "Gamma/character03"]}
    with pytest.raises(FileNotFoundError, match="found 5 of 6 .* incomplete"):
        load_omniglot(root, cache_dir=cache, split=split, image_size=28)


def test_truncated_png(root, cache):
    png = root / "omniglot-py/images_background/Beta/character01/0003_07.png"
    png.write_bytes(png.read_bytes()[:60])
    with pytest.raises(ValueError, match="0003_07.png"):
        load_omniglot(root, cache_dir=cache, split=SPLIT, image_size=28)


# Real Omniglot ---------------------------------------------------------------------------------------------


def test_real_omniglot(omniglot_root):
    data = load_omniglot(omniglot_root / "omniglot", image_size=28)  # default cache dir: decoded once per machine
    shipped = json.loads(omniglot.SPLIT_FILE.read_text())
    for split, n in (("train", 1100), ("val", 100), ("test", 423)):
        assert data[split].images.shape == (n, 20, 1, 28, 28) and data[split].images.dtype == torch.uint8
        assert data[split].names == shipped[split]
    names = sorted(set().union(*(data[k].names for k in ("train", "val", "test"))))
    assert len(names) == 1623
    # The shipped split is the one its "method" describes.
    order = torch.randperm(1623, generator=torch.Generator().manual_seed(shipped["seed"])).tolist()
    assert shipped["val"] == sorted(names[i] for i in order[1100:1200])
