"""miniImageNet (Vinyals et al. 2016; Ravi & Larochelle split: 64 / 16 / 20 classes x 600 images, RGB 84x84).

Read from either layout users have, detected from the files in the folder:
- learn2learn's pickles ``mini-imagenet-cache-{train,validation,test}.pkl``: each a dict with ``image_data``
  (uint8 [N, 84, 84, 3]) and ``class_dict`` (class name -> indices into image_data);
- the folder layout of Ravi & Larochelle: ``images/`` with the JPEGs, and ``train.csv``, ``val.csv``,
  ``test.csv`` with the header ``filename,label``. The JPEGs are resized once (LANCZOS) and cached as uint8.
"""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import torch

from ..errors import MissingInput, UserError
from ..quiet import learn2learn
from . import images
from .episodes import SPLITS, ClassImages, SplitCheck

PICKLES = {"train": "mini-imagenet-cache-train.pkl", "val": "mini-imagenet-cache-validation.pkl",
           "test": "mini-imagenet-cache-test.pkl"}
CSVS = {split: f"{split}.csv" for split in SPLITS}
_LAYOUTS = ("learn2learn's pickles mini-imagenet-cache-{train,validation,test}.pkl (set data.download: true to "
            "fetch them through learn2learn), or Ravi & Larochelle's layout: images/ holding the JPEGs plus "
            "train.csv, val.csv and test.csv (filename,label; the CSVs are in github.com/twitter/meta-learning-lstm "
            "under data/miniImagenet, the images are ImageNet's)")


def load_miniimagenet(root: str | os.PathLike, download: bool = False, cache_dir: str | os.PathLike | None = None, *,
                      image_size: int, check: SplitCheck | None = None) -> dict[str, ClassImages]:
    """miniImageNet splits {"train", "val", "test"}: images uint8 [C, 600, 3, image_size, image_size].

    The data is read from ``root/miniimagenet`` (or from ``root`` itself when it holds one of the layouts).
    Classes are sorted by name; a class's images keep their order in the pickle or CSV. Images other than
    84x84 (the native size) are produced from the pickles by antialiased bilinear resizing, from
    the JPEGs by LANCZOS.
    ``download`` fetches the pickles into ``root/miniimagenet`` with learn2learn when no layout is found.
    `check` is called on each split of the folder layout before its JPEGs are decoded (``images.load_class_files``).
    """
    folder = _find(Path(root), download)
    if not any((folder / name).exists() for name in PICKLES.values()):
        return _read_folder(folder, image_size, cache_dir, check)  # checks the splits before decoding
    splits = {split: _read_pickle(folder / PICKLES[split], image_size) for split in SPLITS}
    images.check_disjoint({split: data.names for split, data in splits.items()}, str(folder))
    return splits


def _has_layout(folder: Path) -> bool:
    return any((folder / name).exists() for name in [*PICKLES.values(), *CSVS.values(), "images"])


def _find(root: Path, download: bool) -> Path:
    """The folder holding a layout: root/miniimagenet, else root; downloads into root/miniimagenet if allowed."""
    for folder in (root / "miniimagenet", root):
        if _has_layout(folder):
            return folder
    if not download:
        raise MissingInput(f"miniImageNet not found in {root / 'miniimagenet'} nor in {root}: put there "
                                f"{_LAYOUTS}")
    folder = root / "miniimagenet"
    folder.mkdir(parents=True, exist_ok=True)
    learn2learn()  # imported quietly first
    from learn2learn.vision.datasets import MiniImagenet

    for split, mode in (("train", "train"), ("val", "validation"), ("test", "test")):
        try:
            MiniImagenet(str(folder), mode=mode, download=True)
        except Exception as error:  # network errors, or a partial file learn2learn could not unpickle
            raise UserError(f"downloading miniImageNet ({mode}) into {folder} with learn2learn failed "
                               f"({type(error).__name__}: {error}); download the files by hand: {_LAYOUTS}") from None
    return folder


class _ArrayUnpickler(pickle.Unpickler):
    """Loads only dicts, lists, strings, numbers and numpy arrays: a downloaded pickle cannot run code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")} | {
        (f"numpy.{core}.{module}", name) for core in ("core", "_core")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a miniImageNet pickle never holds")
        return super().find_class(module, name)


def _read_pickle(path: Path, image_size: int) -> ClassImages:
    if not path.exists():
        raise MissingInput(f"{path} is missing: the pickle layout needs all of {sorted(PICKLES.values())}")
    repair = "delete it and load again with data.download: true, or replace it"
    try:
        with open(path, "rb") as file:
            data = _ArrayUnpickler(file).load()
    except Exception as error:  # truncated (EOFError), damaged (UnpicklingError, ...), or unreadable
        raise UserError(f"cannot read the miniImageNet pickle {path} ({type(error).__name__}: {error}); the file "
                         f"is truncated or damaged: {repair}") from None
    pixels = data.get("image_data") if isinstance(data, dict) else None
    classes = data.get("class_dict") if isinstance(data, dict) else None
    shape = getattr(pixels, "shape", None)
    if (getattr(pixels, "dtype", None) != "uint8" or shape is None or len(shape) != 4 or shape[3] != 3
            or not isinstance(classes, dict) or not classes):
        raise UserError(f"{path} is not a miniImageNet pickle: expected a dict with image_data (uint8 [N, H, W, 3]) "
                         f"and class_dict (class name -> image indices), got "
                         f"{type(data).__name__} with image_data {shape} and class_dict {type(classes).__name__}; "
                         f"{repair}")
    names = sorted(classes)
    counts = {len(classes[name]) for name in names}
    if len(counts) != 1:
        raise UserError(f"the classes of {path} have different numbers of images ({sorted(counts)}); {repair}")
    index = torch.tensor([list(classes[name]) for name in names])  # [C, S]
    if index.min() < 0 or index.max() >= shape[0]:
        raise UserError(f"class_dict of {path} indexes images outside image_data ({shape[0]} images); {repair}")
    # [C, S, 3, H, W] as a view of the gathered [C, S, H, W, 3]: one copy of the data (the encoders run
    # channels-last, so this layout costs nothing)
    grouped = torch.from_numpy(pixels)[index].permute(0, 1, 4, 2, 3)
    return ClassImages(images.resize(grouped, image_size), names)


def _read_csv(path: Path) -> list[tuple[str, str]]:
    """(filename, label) rows of a Ravi & Larochelle CSV."""
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    if not rows or [cell.strip() for cell in rows[0]] != ["filename", "label"]:
        raise UserError(f"{path} must start with the header 'filename,label' (Ravi & Larochelle's format), got "
                         f"{rows[0] if rows else 'an empty file'}. Restore the file")
    bad = [i + 2 for i, row in enumerate(rows[1:]) if len(row) != 2]
    if bad:
        raise UserError(f"{path} line {bad[0]} does not have the two fields filename,label. Repair that line")
    return [(name.strip(), label.strip()) for name, label in rows[1:]]


def _read_folder(folder: Path, image_size: int, cache_dir, check: SplitCheck | None) -> dict[str, ClassImages]:
    missing = [name for name in [*CSVS.values(), "images"] if not (folder / name).exists()]
    if missing:
        raise MissingInput(f"{folder} lacks {missing}: the folder layout needs images/ plus "
                                f"{', '.join(CSVS.values())}; otherwise put there {_LAYOUTS}")
    files = {}  # split -> class name -> image paths, classes sorted, images in CSV order
    for split in SPLITS:
        by_class = {}
        for name, label in _read_csv(folder / CSVS[split]):
            by_class.setdefault(label, []).append(str(folder / "images" / name))
        files[split] = dict(sorted(by_class.items()))
    return images.load_class_files(files, image_size, "RGB", cache_dir, "miniImageNet",
                                   "restore images/ (or fix the CSVs), or download the data set again", check=check)
