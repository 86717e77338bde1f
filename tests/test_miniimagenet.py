"""miniImageNet in both layouts (learn2learn's pickles; images/ plus CSVs), on small fixtures written in exactly
their real formats."""

import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from fixtures import CLASSES, PER_CLASS, colour, listing, picture, write_folder, write_pickles

from ttt_meta.data import images
from ttt_meta.data.miniimagenet import load_miniimagenet


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


# miniImageNet: learn2learn's pickles ------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickles_load(tmp_path, cache, protocol):
    write_pickles(tmp_path / "miniimagenet", protocol=protocol)
    data = load_miniimagenet(tmp_path, cache_dir=cache, image_size=84)
    for split, names in CLASSES.items():
        x = data[split].images
        assert data[split].names == sorted(names)
        assert x.shape == (len(names), PER_CLASS, 3, 84, 84) and x.dtype == torch.uint8
        for c, name in enumerate(data[split].names):  # each class holds its own images, in order
            for i in (0, PER_CLASS - 1):
                assert torch.equal(x[c, i], torch.from_numpy(picture(name, i, 84, 84)).permute(2, 0, 1))
    sizes = [len(set(data[split].names)) for split in CLASSES]
    assert len(set().union(*(data[split].names for split in CLASSES))) == sum(sizes) == 16  # disjoint splits


def test_pickles_found_in_root_itself_and_resized(tmp_path):
    write_pickles(tmp_path)
    data = load_miniimagenet(tmp_path, image_size=42)
    x = data["val"].images
    assert x.shape == (5, PER_CLASS, 3, 42, 42)
    assert torch.allclose(x[0, 0, :, 0, 0].float(), torch.from_numpy(colour(data["val"].names[0])).float(), atol=1)


def test_truncated_pickle(tmp_path):
    folder = write_pickles(tmp_path / "miniimagenet")
    path = folder / "mini-imagenet-cache-validation.pkl"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="mini-imagenet-cache-validation.pkl .*truncated or damaged"):
        load_miniimagenet(tmp_path, image_size=84)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    folder = write_pickles(tmp_path / "miniimagenet")

    class Exploit:
        def __reduce__(self):
            return (print, ("this ran",))

    (folder / "mini-imagenet-cache-test.pkl").write_bytes(pickle.dumps({"image_data": Exploit()}))
    with pytest.raises(ValueError, match="builtins.print"):
        load_miniimagenet(tmp_path, image_size=84)


def test_pickle_with_wrong_contents(tmp_path):
    folder = write_pickles(tmp_path / "miniimagenet")
    (folder / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps({"images": [1, 2]}))
    with pytest.raises(ValueError, match="not a miniImageNet pickle.*image_data"):
        load_miniimagenet(tmp_path, image_size=84)


def test_missing_pickle(tmp_path):
    folder = write_pickles(tmp_path / "miniimagenet")
    (folder / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="mini-imagenet-cache-test.pkl is missing"):
        load_miniimagenet(tmp_path, image_size=84)


@pytest.mark.parametrize("write", [write_pickles, write_folder], ids=["pickles", "folder"])
def test_class_in_two_splits(tmp_path, cache, write):
    write(tmp_path / "miniimagenet", classes={**CLASSES, "test": [*CLASSES["test"][:4], "n01000"]})
    with pytest.raises(ValueError, match="n01000 is in both the train and the test split"):
        load_miniimagenet(tmp_path, cache_dir=cache, image_size=84)
    assert not cache.exists()  # refused before anything was decoded


def test_no_data_names_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"miniImageNet not found.*mini-imagenet-cache.*data\.download: true"
                                                r".*images/.*train\.csv, val\.csv and test\.csv"):
        load_miniimagenet(tmp_path / "nowhere", image_size=84)


def test_download_goes_through_learn2learn(tmp_path, monkeypatch):
    """download: true hands each split to learn2learn's MiniImagenet (faked here: no network) in root/miniimagenet."""
    calls = []

    class FakeMiniImagenet:
        def __init__(self, root, mode, download):
            calls.append((mode, download))
            write_pickles(Path(root))

    fake = types.ModuleType("learn2learn.vision.datasets")
    fake.MiniImagenet = FakeMiniImagenet
    monkeypatch.setitem(sys.modules, "learn2learn.vision.datasets", fake)
    data = load_miniimagenet(tmp_path, download=True, image_size=84)
    assert calls == [("train", True), ("validation", True), ("test", True)]
    assert data["test"].images.shape == (5, PER_CLASS, 3, 84, 84)


# miniImageNet: images/ + CSVs -------------------------------------------------------------------------------


def test_folder_loads_resized_and_cached(tmp_path, cache, monkeypatch):
    root = tmp_path / "data"
    write_folder(root / "miniimagenet")
    before = listing(root)
    data = load_miniimagenet(root, cache_dir=cache, image_size=84)
    assert listing(root) == before  # nothing written beside the data
    for split, names in CLASSES.items():
        x = data[split].images
        assert data[split].names == sorted(names)
        assert x.shape == (len(names), PER_CLASS, 3, 84, 84) and x.dtype == torch.uint8
        for c, name in enumerate(data[split].names):  # background keeps the class colour (JPEG: approximately)
            assert (x[c, :, :, -1, -1].float() - torch.from_numpy(colour(name)).float()).abs().max() <= 6
        assert x.max() >= 250  # the bright square survives the resize
    (file,) = cache.iterdir()
    assert file.name.startswith("miniimagenet_84px_")

    def fail(*args):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(images, "decode_all", fail)
    again = load_miniimagenet(root, cache_dir=cache, image_size=84)
    assert all(torch.equal(data[k].images, again[k].images) for k in CLASSES)


def test_folder_and_pickles_give_the_same_classes(tmp_path, cache):
    pickled = load_miniimagenet(write_pickles(tmp_path / "a"), cache_dir=cache, image_size=84)
    folder = load_miniimagenet(write_folder(tmp_path / "b"), cache_dir=cache, image_size=84)
    for split in CLASSES:
        assert pickled[split].names == folder[split].names
        gap = (pickled[split].images.float() - folder[split].images.float()).abs().mean()
        assert gap < 8  # the same pictures, the JPEGs resized from their own sizes


def test_csv_naming_a_missing_image(tmp_path, cache):
    folder = write_folder(tmp_path / "miniimagenet")
    (folder / "images" / "n0200000000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of the 96 images .* missing, e.g. .*n0200000000003.jpg"):
        load_miniimagenet(tmp_path, cache_dir=cache, image_size=84)


def test_damaged_jpeg(tmp_path, cache):
    folder = write_folder(tmp_path / "miniimagenet")
    jpeg = folder / "images" / "n0300100000002.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:100])
    with pytest.raises(ValueError, match="n0300100000002.jpg.*damaged"):
        load_miniimagenet(tmp_path, cache_dir=cache, image_size=84)


def test_csv_without_header(tmp_path, cache):
    folder = write_folder(tmp_path / "miniimagenet")
    (folder / "val.csv").write_text("n0200000000001.jpg,n02000\n")
    with pytest.raises(ValueError, match="val.csv must start with the header 'filename,label'"):
        load_miniimagenet(tmp_path, cache_dir=cache, image_size=84)


def test_csv_missing(tmp_path, cache):
    folder = write_folder(tmp_path / "miniimagenet")
    (folder / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['test.csv'\]"):
        load_miniimagenet(tmp_path, cache_dir=cache, image_size=84)
