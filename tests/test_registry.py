"""The data set registry: the one place a data set is added, and where its defaults come from."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from ttt_meta.data import registry
from ttt_meta.data.datamodule import EpisodeDataModule
from ttt_meta.data.episodes import SPLITS, ClassImages
from ttt_meta.data.registry import DATASETS, DatasetEntry


def test_shipped_data_sets_and_their_defaults():
    assert {name: (entry.image_size, entry.rotations) for name, entry in DATASETS.items()} == {
        "omniglot": (28, True), "synthetic": (28, True), "miniimagenet": (84, False), "cifarfs": (32, False),
        "folder": (84, False)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        DATASETS["omniglot"].image_size = 32


def test_unknown_data_set_names_the_registered_ones():
    message = ("unknown data.dataset 'cifar'. Set it to one of ('omniglot', 'synthetic', 'miniimagenet', 'cifarfs', "
               "'folder')")
    with pytest.raises(ValueError) as error:
        EpisodeDataModule(dataset="cifar")
    assert str(error.value) == message


def test_a_data_set_is_added_in_the_registry_alone(tmp_path, monkeypatch):
    """An entry in DATASETS is all the data module needs: its defaults, and its loader with the resolved root."""
    calls = []

    def load(root, download, cache_dir, image_size, check):
        calls.append((root, download, cache_dir, image_size, check))
        x = torch.zeros(6, 4, 1, image_size, image_size, dtype=torch.uint8)
        x[:, :, 0, 0, 0] = torch.arange(6).view(6, 1)
        return {split: ClassImages(x, [f"{split}{c}" for c in range(6)]) for split in SPLITS}

    monkeypatch.setitem(DATASETS, "tiny", DatasetEntry(load, image_size=10, rotations=False))
    monkeypatch.setenv("TTT_META_DATA", str(tmp_path))
    dm = EpisodeDataModule(dataset="tiny", cache_dir="somewhere", ways=3, shots=1, queries=1, meta_batch_size=2,
                           train_batches_per_epoch=1, val_episodes=2, test_episodes=2, eval_batch_size=2)
    assert dm.hparams.image_size == 10 and dm.hparams.rotations is False
    dm.setup("fit")
    assert calls == [(Path(tmp_path), False, "somewhere", 10, dm.check_split)]
    assert dm.image_shape == (1, 10, 10)
    assert next(iter(dm.train_dataloader()))["support"].shape == (2, 3, 1, 10, 10)
    assert EpisodeDataModule(dataset="tiny", rotations=True, image_size=12).hparams.image_size == 12


def test_the_registry_resolves_the_size_a_loader_is_given(monkeypatch):
    monkeypatch.setitem(DATASETS, "synthetic", dataclasses.replace(DATASETS["synthetic"], image_size=12))
    assert registry.image_size_or_native("synthetic", None) == 12
    assert registry.image_size_or_native("synthetic", 20) == 20
    dm = EpisodeDataModule(dataset="synthetic", ways=2, shots=1, queries=1)
    dm.prepare_data()
    assert dm.image_shape == (1, 12, 12)


def test_loaders_never_import_the_registry():
    """The registry imports the loaders (lazily); a loader importing it back would close an import circle."""
    for path in Path(registry.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
        assert "registry" not in imported or path.stem == "datamodule", path.name
