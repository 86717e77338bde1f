"""Your own classes (``data.dataset: folder``): class folders of images, torchvision's ImageFolder layout.

``data.root`` is the folder itself (not a folder holding one per data set, as for the other data sets)::

    <root>/train/<class>/*.png|*.jpg|...    one sub-folder per class, named after it
    <root>/val/<class>/...
    <root>/test/<class>/...

Images of any size, grey or colour (the suffixes of ``images.IMAGE_SUFFIXES``, any case; other files are
ignored), are converted to RGB and resized to data.image_size with LANCZOS, as ``predict`` reads a 3-channel
model's images, decoded once and cached as uint8. Classes are sorted by name, images by file name; classes may
hold different numbers of images (``ClassImages.counts``), and a class name must not be in two splits.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MissingInput, UserError
from . import images
from .episodes import SPLITS, ClassImages, SplitCheck

_LAYOUT = "train/, val/ and test/, each with one sub-folder of images per class (the folder's name is the class)"
_REPAIR = "replace the file or delete it"


def load_folder(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *, image_size: int,
                check: SplitCheck | None = None) -> dict[str, ClassImages]:
    """The class folders of ``root/{train,val,test}``: images uint8 [C, S, 3, image_size, image_size], S the
    largest class's number of images, with counts [C].

    Every split is listed before anything is decoded; then `check` is called on each split, with the class
    folders' paths as the class names of its messages (``images.load_class_files``).
    """
    root = Path(root)
    files = {split: _class_files(root, split) for split in SPLITS}

    def check_folders(split: str, names: list[str], sizes: list[int]) -> None:
        check(split, [str(root / split / name) for name in names], sizes)

    return images.load_class_files(files, image_size, "RGB", cache_dir, "folder", _REPAIR, uneven=True,
                                   check=check_folders if check is not None else None)


def _class_files(root: Path, split: str) -> dict[str, list[str]]:
    """{class name: its image paths, sorted} of the class folders of root/split, sorted by name."""
    folder = root / split
    if not folder.is_dir():
        raise MissingInput(f"{folder} is not a folder: the folder data set reads data.root ({root}) as {_LAYOUT}. "
                           f"Create {split}/ there, or point data.root at the folder that holds train/, val/ and test/")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{folder} holds no class folders: the folder data set reads data.root ({root}) as "
                        f"{_LAYOUT}. Put each {split} class's images in a sub-folder of {split}/ named after the class")
    return {d.name: [str(p) for p in images.image_files(d, "class")] for d in classes}
