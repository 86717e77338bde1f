"""Omniglot (Lake et al. 2015) as uint8 tensors: 1100 / 100 / 423 characters, decoded once and cached."""

import functools
import hashlib
import json
import multiprocessing
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from ..checkpointing import save_atomic
from .episodes import ClassImages

IMAGES_PER_CHARACTER = 20
SPLIT_FILE = Path(__file__).with_name("omniglot_split.json")
# Part of the data fingerprint, so that changing how images are decoded invalidates old caches.
_DECODING = "v1: convert L, resize LANCZOS, invert"
_FIND = "point data.root (or TTT_META_DATA) at the folder that holds omniglot/omniglot-py, or set data.download: true"
_REPAIR = "restore the files, e.g. delete the omniglot-py folder and load again with data.download: true"


class _ExtractedOmniglot(torchvision.datasets.Omniglot):
    """torchvision's Omniglot that accepts the extracted image folders without torchvision's zip files."""

    def _check_integrity(self) -> bool:
        return os.path.isdir(os.path.join(self.root, self._get_target_folder()))


def load_omniglot(
    root: str | os.PathLike,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    image_size: int = 28,
    split: dict | None = None,
) -> dict[str, ClassImages]:
    """Omniglot splits {"train", "val", "test"}: images uint8 [C, 20, 1, image_size, image_size], strokes 255.

    `root` holds `omniglot-py/images_{background,evaluation}` (torchvision's layout); both sets are pooled and
    split by character, as written in `omniglot_split.json` (1100 / 100 / 423), or as `split` gives
    ({"train": [names], "val": [...], "test": [...]}, names "<Alphabet>/<characterNN>"). Each image is converted
    to mode "L", resized with LANCZOS (like learn2learn; Pillow would use nearest for the mode "1" file), and
    inverted so that strokes are bright. Decoded images are cached in `cache_dir` (default $TTT_META_CACHE,
    else ~/.cache/ttt_meta); nothing is ever written into `root` unless `download` fetches the data there.
    """
    if split is None:
        split = json.loads(SPLIT_FILE.read_text())
    characters = _list_characters(root, download)
    wanted = [name for key in ("train", "val", "test") for name in split[key]]
    missing = [name for name in wanted if name not in characters]
    if missing:
        raise FileNotFoundError(
            f"found {len(wanted) - len(missing)} of {len(wanted)} Omniglot characters of the split under "
            f"{os.path.join(root, 'omniglot-py')} (missing e.g. {missing[:3]}); the data set is incomplete: "
            f"{_REPAIR}"
        )
    images = _cached_images(characters, image_size, cache_dir)
    index = {name: i for i, name in enumerate(characters)}
    return {
        key: ClassImages(images[[index[name] for name in split[key]]], list(split[key]))
        for key in ("train", "val", "test")
    }


def _list_characters(root: str | os.PathLike, download: bool) -> dict[str, list[str]]:
    """{"<Alphabet>/<characterNN>": its 20 image paths, sorted}, over both sets, names sorted."""
    characters = {}
    for background in (True, False):
        folder = os.path.join(root, "omniglot-py", "images_background" if background else "images_evaluation")
        if not download and not os.path.isdir(folder):
            raise FileNotFoundError(f"Omniglot not found: {folder} is not a directory; {_FIND}")
        dataset = _ExtractedOmniglot(str(root), background=background, download=download)
        for character, files in zip(dataset._characters, dataset._character_images):
            paths = sorted(os.path.join(dataset.target_folder, character, file) for file, _ in files)
            characters[Path(character).as_posix()] = paths
    wrong = {name: len(paths) for name, paths in characters.items() if len(paths) != IMAGES_PER_CHARACTER}
    if wrong:
        name, count = next(iter(wrong.items()))
        raise ValueError(
            f"{len(wrong)} Omniglot characters do not have {IMAGES_PER_CHARACTER} images each (e.g. {name} has "
            f"{count} under {os.path.join(root, 'omniglot-py')}); the data set is incomplete: {_REPAIR}"
        )
    return dict(sorted(characters.items()))


def _cached_images(
    characters: dict[str, list[str]], image_size: int, cache_dir: str | os.PathLike | None
) -> torch.Tensor:
    """Decoded images uint8 [len(characters), 20, 1, image_size, image_size], from the cache or decoded once."""
    names = list(characters)
    fingerprint = _fingerprint(characters, image_size)
    if cache_dir is None:
        cache_dir = os.environ.get("TTT_META_CACHE") or Path.home() / ".cache" / "ttt_meta"
    path = Path(cache_dir).expanduser() / f"omniglot_{image_size}px_{fingerprint[:16]}.pt"
    shape = (len(names), IMAGES_PER_CHARACTER, 1, image_size, image_size)
    if path.exists():
        try:
            cached = torch.load(path, weights_only=True)
        except Exception as error:  # any unreadable file is rebuilt below
            warnings.warn(f"Omniglot cache {path} is unreadable ({error}); rebuilding it")
        else:
            images = cached.get("images") if isinstance(cached, dict) else None
            if (
                isinstance(images, torch.Tensor)
                and images.dtype == torch.uint8
                and tuple(images.shape) == shape
                and cached.get("fingerprint") == fingerprint
                and cached.get("names") == names
            ):
                return images
            warnings.warn(f"Omniglot cache {path} does not match the data; rebuilding it")
    images = _decode_all([p for paths in characters.values() for p in paths], image_size).view(shape)
    try:
        save_atomic({"fingerprint": fingerprint, "names": names, "images": images}, path)
    except OSError as error:  # the cache is an optimisation: go on without it
        warnings.warn(f"cannot write the Omniglot cache {path} ({error}); set TTT_META_CACHE to a writable folder")
    return images


def _fingerprint(characters: dict[str, list[str]], image_size: int) -> str:
    """sha256 hex digest of the decoding method, image size, and every image's name and size in bytes."""
    digest = hashlib.sha256(f"{_DECODING}\n{image_size}\n".encode())
    for name, paths in characters.items():
        for p in paths:
            digest.update(f"{name}/{os.path.basename(p)}\t{os.path.getsize(p)}\n".encode())
    return digest.hexdigest()


def _decode_all(paths: list[str], image_size: int) -> torch.Tensor:
    """Decode images in parallel processes: uint8 [len(paths), image_size, image_size]."""
    with multiprocessing.Pool(min(8, os.cpu_count() or 1)) as pool:
        arrays = pool.map(functools.partial(_decode, image_size=image_size), paths, chunksize=256)
    return torch.from_numpy(np.stack(arrays))


def _decode(path: str, image_size: int) -> np.ndarray:
    """One Omniglot PNG as uint8 [image_size, image_size], strokes 255 on 0."""
    try:
        with Image.open(path) as image:
            small = image.convert("L").resize((image_size, image_size), Image.Resampling.LANCZOS)
    except Exception as error:  # PIL raises several types for damaged files
        raise ValueError(
            f"cannot decode Omniglot image {path} ({type(error).__name__}: {error}); the file is damaged: "
            f"{_REPAIR}"
        ) from None
    return 255 - np.asarray(small, dtype=np.uint8)
