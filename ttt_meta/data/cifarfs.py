"""CIFAR-FS (Bertinetto et al. 2019): the 100 CIFAR-100 classes split 64 / 16 / 20, 600 images each, RGB 32x32.

Read from learn2learn's layout under ``root/cifarfs``: the processed class folders
``processed/{train,val,test}/<class>/*.png`` that ``learn2learn.vision.datasets.CIFARFS`` writes, or, before
that, the extracted archive ``cifar100/data/<class>/*.png`` with the split files
``cifar100/splits/bertinetto/{train,val,test}.txt``. Decoded once and cached as uint8.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MissingInput, UserError
from ..quiet import learn2learn
from . import images
from .episodes import SPLITS, ClassImages, SplitCheck

_LAYOUT = ("learn2learn's CIFAR-FS layout: cifarfs/processed/{train,val,test}/<class>/*.png, or the extracted "
           "cifar100.zip as cifarfs/cifar100/data/<class>/*.png with cifar100/splits/bertinetto/{train,val,test}.txt")
_REPAIR = "delete the cifarfs folder and load again with data.download: true"


def load_cifarfs(root: str | os.PathLike, download: bool = False, cache_dir: str | os.PathLike | None = None, *,
                 image_size: int, check: SplitCheck | None = None) -> dict[str, ClassImages]:
    """CIFAR-FS splits {"train", "val", "test"}: images uint8 [C, 600, 3, image_size, image_size].

    ``root`` holds ``cifarfs/``; ``download`` fetches it there with learn2learn when it is absent. Classes are
    sorted by name, images by file name (32x32 natively: ``registry.DATASETS``). `check` is called on each split
    before decoding (``images.load_class_files``).
    """
    folder = Path(root) / "cifarfs"
    processed, raw = folder / "processed", folder / "cifar100"
    if not processed.is_dir() and not raw.is_dir():
        if not download:
            raise MissingInput(f"CIFAR-FS not found in {folder}: put there {_LAYOUT}; or set data.download: "
                                    f"true to fetch it with learn2learn")
        _download(Path(root))
    if processed.is_dir():
        class_dirs = {split: sorted(p for p in (processed / split).iterdir() if p.is_dir())
                      if (processed / split).is_dir() else [] for split in SPLITS}
    else:
        class_dirs = {split: [raw / "data" / name for name in _split_file(raw / "splits" / "bertinetto" / f"{split}.txt")]
                      for split in SPLITS}
    for split, dirs in class_dirs.items():
        missing = [d for d in dirs if not d.is_dir()]
        if not dirs or missing:
            raise MissingInput(f"the CIFAR-FS {split} split under {folder} is incomplete "
                                    f"({'missing ' + str(missing[0]) if missing else 'no classes'}): {_REPAIR}")
    files = {split: {d.name: sorted(str(p) for p in d.glob("*.png")) for d in sorted(dirs)}
             for split, dirs in class_dirs.items()}
    return images.load_class_files(files, image_size, "RGB", cache_dir, "CIFAR-FS", _REPAIR, check=check)


def _split_file(path: Path) -> list[str]:
    if not path.is_file():
        raise MissingInput(f"the CIFAR-FS split file {path} is missing: {_REPAIR}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _download(root: Path) -> None:
    learn2learn()  # imported quietly first
    from learn2learn.vision.datasets import CIFARFS

    root.mkdir(parents=True, exist_ok=True)
    try:
        for mode in ("train", "validation", "test"):
            CIFARFS(str(root), mode=mode, download=True)  # downloads once, then writes processed/
    except Exception as error:  # network errors, a partial archive
        raise UserError(f"downloading CIFAR-FS into {root / 'cifarfs'} with learn2learn failed "
                           f"({type(error).__name__}: {error}); fetch it by hand: {_LAYOUT}") from None
