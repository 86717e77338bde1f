"""CIFAR-FS in learn2learn's layouts (processed class folders; the extracted archive with split files), on small
fixtures written in exactly their real formats."""

import pytest
import torch
from fixtures import CLASSES, PER_CLASS, picture, write_cifarfs

from ttt_meta.data.cifarfs import load_cifarfs


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.mark.parametrize("processed", [True, False], ids=["processed", "extracted"])
def test_cifarfs_loads(tmp_path, cache, processed):
    data = load_cifarfs(write_cifarfs(tmp_path, processed), cache_dir=cache, image_size=32)
    for split, names in CLASSES.items():
        x = data[split].images
        assert data[split].names == [f"class_{n}" for n in sorted(names)]
        assert x.shape == (len(names), PER_CLASS, 3, 32, 32) and x.dtype == torch.uint8
        assert torch.equal(x[0, 1], torch.from_numpy(picture(sorted(names)[0], 1, 32, 32)).permute(2, 0, 1))
    (file,) = cache.iterdir()
    assert file.name.startswith("cifarfs_32px_")


def test_cifarfs_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIFAR-FS not found.*processed/\{train,val,test\}.*data\.download"):
        load_cifarfs(tmp_path, image_size=32)


def test_cifarfs_missing_class_folder(tmp_path, cache):
    write_cifarfs(tmp_path, processed=False)
    split_file = tmp_path / "cifarfs/cifar100/splits/bertinetto/val.txt"
    split_file.write_text(split_file.read_text() + "class_n09999\n")
    with pytest.raises(FileNotFoundError, match="val split .* incomplete .*class_n09999"):
        load_cifarfs(tmp_path, cache_dir=cache, image_size=32)
