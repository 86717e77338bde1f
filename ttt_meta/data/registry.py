"""The data sets: the one place a data set is added, with its loader and its defaults.

A loader is called as ``load(root, download, cache_dir, image_size, check)``: `root` is the resolved data root
(the folder that holds a folder per data set; for "folder", the folder of the class folders itself), `download`
allows fetching the data into it, `cache_dir` is where decoded images are cached (None: $TTT_META_CACHE, else
~/.cache/ttt_meta), `image_size` the square side of the images (an int: the data module resolves it with
``image_size_or_native``), `check` raises when a split cannot give the episodes (``episodes.SplitCheck``; a
loader that writes a cache calls it before decoding). It returns {"train" | "val" | "test": ClassImages}
(``episodes.SPLITS``). Loaders import their modules only when called, so naming a data set costs nothing; the
loader modules never import this one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .episodes import ClassImages, SplitCheck

Loader = Callable[[Path, bool, str | os.PathLike | None, int, SplitCheck], dict[str, ClassImages]]


@dataclass(frozen=True)
class DatasetEntry:
    """A data set: its loader, its native image side and whether training adds 90-degree rotations as classes."""

    load: Loader
    image_size: int
    rotations: bool = True


def _omniglot(root: Path, download: bool, cache_dir, image_size: int, check: SplitCheck) -> dict[str, ClassImages]:
    from .omniglot import load_omniglot
    return load_omniglot(root / "omniglot", download, cache_dir, image_size=image_size, check=check)


def _synthetic(root: Path, download: bool, cache_dir, image_size: int, check: SplitCheck) -> dict[str, ClassImages]:
    from .synthetic import load_synthetic
    return load_synthetic(image_size=image_size)  # rendered in-process: nothing to find, fetch, cache or check early


def _miniimagenet(root: Path, download: bool, cache_dir, image_size: int, check: SplitCheck
                  ) -> dict[str, ClassImages]:
    from .miniimagenet import load_miniimagenet
    return load_miniimagenet(root, download, cache_dir, image_size=image_size, check=check)


def _cifarfs(root: Path, download: bool, cache_dir, image_size: int, check: SplitCheck) -> dict[str, ClassImages]:
    from .cifarfs import load_cifarfs
    return load_cifarfs(root, download, cache_dir, image_size=image_size, check=check)


def _folder(root: Path, download: bool, cache_dir, image_size: int, check: SplitCheck) -> dict[str, ClassImages]:
    from .folder import load_folder
    return load_folder(root, cache_dir, image_size=image_size, check=check)  # the user's own: nothing to download


DATASETS: dict[str, DatasetEntry] = {
    "omniglot": DatasetEntry(_omniglot, image_size=28),
    "synthetic": DatasetEntry(_synthetic, image_size=28),
    "miniimagenet": DatasetEntry(_miniimagenet, image_size=84, rotations=False),
    "cifarfs": DatasetEntry(_cifarfs, image_size=32, rotations=False),
    "folder": DatasetEntry(_folder, image_size=84, rotations=False),
}


def image_size_or_native(dataset: str, image_size: int | None) -> int:
    """`image_size`, else the native side of `dataset` (a key of DATASETS): the side its loader is given."""
    return DATASETS[dataset].image_size if image_size is None else image_size
