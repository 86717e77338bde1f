"""Omniglot (Lake et al. 2015) as uint8 tensors: 1100 / 100 / 423 characters, decoded once and cached."""

import json
import os
from pathlib import Path

import torchvision

from ..errors import MissingInput, UserError
from . import images
from .episodes import SPLITS, ClassImages, SplitCheck

IMAGES_PER_CHARACTER = 20
SPLIT_FILE = Path(__file__).with_name("omniglot_split.json")
_FIND = "Point data.root (or TTT_META_DATA) at the folder that holds omniglot/omniglot-py, or set data.download: true"
_REPAIR = "restore the files, e.g. delete the omniglot-py folder and load again with data.download: true"


class _ExtractedOmniglot(torchvision.datasets.Omniglot):
    """torchvision's Omniglot that accepts the extracted image folders without torchvision's zip files."""

    def _check_integrity(self) -> bool:
        return os.path.isdir(os.path.join(self.root, self._get_target_folder()))


def load_omniglot(
    root: str | os.PathLike,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    *,
    image_size: int,
    split: dict | None = None,
    check: SplitCheck | None = None,
) -> dict[str, ClassImages]:
    """Omniglot splits {"train", "val", "test"}: images uint8 [C, 20, 1, image_size, image_size], strokes 255.

    `root` holds `omniglot-py/images_{background,evaluation}` (torchvision's layout); both sets are pooled and
    split by character, as written in `omniglot_split.json` (1100 / 100 / 423), or as `split` gives
    ({"train": [names], "val": [...], "test": [...]}, names "<Alphabet>/<characterNN>"). Each image is converted
    to mode "L", resized with LANCZOS (like learn2learn; Pillow would use nearest for the mode "1" file), and
    inverted so that strokes are bright (28x28 natively: ``registry.DATASETS``).
    Decoded images are cached in `cache_dir` (default $TTT_META_CACHE, else ~/.cache/ttt_meta); nothing is ever
    written into `root` unless `download` fetches the data there. `check` is called on each split before decoding
    (``images.load_class_files``).
    """
    if split is None:
        split = json.loads(SPLIT_FILE.read_text())
    characters = _list_characters(root, download)
    wanted = [name for key in SPLITS for name in split[key]]
    missing = [name for name in wanted if name not in characters]
    if missing:
        raise MissingInput(
            f"found {len(wanted) - len(missing)} of {len(wanted)} Omniglot characters of the split under "
            f"{os.path.join(root, 'omniglot-py')} (missing e.g. {missing[:3]}); the data set is incomplete: "
            f"{_REPAIR}"
        )
    files = {key: {name: characters[name] for name in split[key]} for key in SPLITS}
    return images.load_class_files(files, image_size, "L", cache_dir, "Omniglot", _REPAIR, invert=True,
                                   check=check)


def _list_characters(root: str | os.PathLike, download: bool) -> dict[str, list[str]]:
    """{"<Alphabet>/<characterNN>": its 20 image paths, sorted}, over both sets, names sorted."""
    characters = {}
    for background in (True, False):
        folder = os.path.join(root, "omniglot-py", "images_background" if background else "images_evaluation")
        if not download and not os.path.isdir(folder):
            raise MissingInput(f"Omniglot not found: {folder} is not a directory. {_FIND}")
        dataset = _ExtractedOmniglot(str(root), background=background, download=download)
        for character, files in zip(dataset._characters, dataset._character_images):
            paths = sorted(os.path.join(dataset.target_folder, character, file) for file, _ in files)
            characters[Path(character).as_posix()] = paths
    wrong = {name: len(paths) for name, paths in characters.items() if len(paths) != IMAGES_PER_CHARACTER}
    if wrong:
        name, count = next(iter(wrong.items()))
        raise UserError(
            f"{len(wrong)} Omniglot characters do not have {IMAGES_PER_CHARACTER} images each (e.g. {name} has "
            f"{count} under {os.path.join(root, 'omniglot-py')}); the data set is incomplete: {_REPAIR}"
        )
    return dict(sorted(characters.items()))

