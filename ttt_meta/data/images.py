"""Image files listed and decoded once into uint8 tensors, and the on-disk cache of the result (shared by the data
sets and ``predict``).

A cache file holds {"fingerprint", "names", "images"}; it is used only when all three match what the caller
expects, so a changed data set or decoding method rebuilds it. Nothing is ever written beside the data.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..checkpointing import save_atomic
from ..errors import MissingInput, UserError
from .episodes import ClassImages, SplitCheck

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}  # any case


def image_files(folder: Path, what: str) -> list[Path]:
    """The image files of `folder` (``IMAGE_SUFFIXES``), sorted; a UserError naming it as a `what` folder when
    it holds none."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{what} folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}). Add "
                        f"images to it or remove it")
    return files


def cache_folder(cache_dir: str | os.PathLike | None) -> Path:
    """`cache_dir`, else $TTT_META_CACHE, else ~/.cache/ttt_meta."""
    return Path(cache_dir or os.environ.get("TTT_META_CACHE") or Path.home() / ".cache" / "ttt_meta").expanduser()


def fingerprint(header: str, files: Iterable[tuple[str, str]]) -> str:
    """sha256 hex digest of `header` and each (key, path) as its key and the file's size in bytes."""
    digest = hashlib.sha256(header.encode())
    for key, path in files:
        digest.update(f"{key}\t{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()


def cached(path: Path, fingerprint: str, names: list[str], shape: tuple[int, ...], build: Callable[[], Tensor],
           what: str) -> Tensor:
    """The uint8 tensor of `shape` cached at `path`, else `build()` written there (a failed write only warns).

    The cache is memory-mapped: several processes reading one data set share its pages.
    """
    if path.exists():
        try:
            saved = torch.load(path, weights_only=True, mmap=True)
        except Exception as error:  # any unreadable file is rebuilt below
            warnings.warn(f"{what} cache {path} is unreadable ({error}); rebuilding it")
        else:
            images = saved.get("images") if isinstance(saved, dict) else None
            if (isinstance(images, Tensor) and images.dtype == torch.uint8 and tuple(images.shape) == shape
                    and saved.get("fingerprint") == fingerprint and saved.get("names") == names):
                return images
            warnings.warn(f"{what} cache {path} does not match the data; rebuilding it")
    images = build().view(shape)
    try:
        save_atomic({"fingerprint": fingerprint, "names": names, "images": images}, path)
    except OSError as error:  # the cache is an optimisation: go on without it
        warnings.warn(f"cannot write the {what} cache {path} ({error}); set TTT_META_CACHE to a writable folder")
    return images


def decode_all(paths: list[str], size: int, mode: str, repair: str) -> Tensor:
    """Decode image files in parallel processes: uint8 [len(paths), channels, size, size].

    Each file is read as `decode` reads it; a damaged file raises a UserError that names it and ends with
    `repair` (how to restore the data).
    """
    decode_one = functools.partial(decode, size=size, mode=mode, fix=f"the file is damaged: {repair}")
    if len(paths) < 512:  # not worth starting processes
        arrays = list(map(decode_one, paths))
    else:
        with multiprocessing.Pool(min(8, os.cpu_count() or 1)) as pool:
            arrays = pool.map(decode_one, paths, chunksize=256)
    return torch.from_numpy(np.stack(arrays))


def decode(path: str | os.PathLike, size: int, mode: str, fix: str) -> np.ndarray:
    """One image file as uint8 [channels, size, size]: converted to PIL `mode` ("L": 1 channel, "RGB": 3) and
    resized with LANCZOS (skipped when it already has that size). An unreadable file raises a UserError that
    names it and ends with `fix`."""
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.LANCZOS)
            array = np.asarray(image, dtype=np.uint8)
    except Exception as error:  # PIL raises several types for damaged files
        raise UserError(f"cannot read image {path} ({type(error).__name__}: {error}); {fix}") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def resize(images: Tensor, size: int) -> Tensor:
    """uint8 [..., C, H, W] -> uint8 [..., C, size, size] (antialiased bilinear); unchanged when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    flat = images.flatten(0, -4).float()
    out = F.interpolate(flat, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).view(*images.shape[:-2], size, size)


def check_disjoint(names: dict[str, list[str]], where: str) -> None:
    """Raise a ValueError when a class name is in two splits ({split: class names}) of the data at `where`."""
    seen: dict[str, str] = {}
    for split, split_names in names.items():
        for name in split_names:
            if name in seen:
                raise UserError(f"class {name} is in both the {seen[name]} and the {split} split of {where}; the "
                                f"splits must be disjoint. Remove the class from one of them")
            seen[name] = split


def decoding(mode: str, invert: bool) -> str:
    """How files become pixels (`decode_all`, then 255 - pixels if `invert`), as part of a cache fingerprint.

    Changing the decoding must change this text ("v1" -> "v2"), so that old caches are rebuilt.
    """
    return f"v1: convert {mode}, resize LANCZOS" + (", invert" if invert else "")


def load_class_files(files: dict[str, dict[str, list[str]]], image_size: int, mode: str,
                     cache_dir: str | os.PathLike | None, dataset: str, repair: str, invert: bool = False,
                     uneven: bool = False, check: SplitCheck | None = None) -> dict[str, ClassImages]:
    """Decode (or read from the cache) splits given as {split: {class name: image paths}}.

    Every class must have the same number S of images, unless `uneven`: then S is the largest class's, each
    class is padded to S with zero images and every ClassImages has its counts. Returns {split: ClassImages}
    with images uint8 [classes, S, channels, image_size, image_size] (views into one memory-mapped cached tensor,
    classes in the given order): each file converted to PIL `mode` and resized as `decode_all` does, then with
    `invert` 255 - pixels (dark strokes on white become bright strokes on black). `check` is called on each
    split (``episodes.SplitCheck``) before anything is decoded or written. The cache file is named after
    `dataset`; the decoding (`decoding`) is part of its fingerprint.
    """
    where = f"the {dataset} data"
    check_disjoint({split: list(by_class) for split, by_class in files.items()}, where)  # before any decoding
    paths = [p for by_class in files.values() for class_files in by_class.values() for p in class_files]
    if not paths:
        raise UserError(f"{where} holds no images. Point data.root at the folder that holds the data set")
    absent = [p for p in paths if not os.path.isfile(p)]
    if absent:
        raise MissingInput(f"{len(absent)} of the {len(paths)} images of {where} are missing, e.g. {absent[0]}; "
                                f"the data set is incomplete: {repair}")
    sizes = {split: [len(class_files) for class_files in by_class.values()] for split, by_class in files.items()}
    every = [n for split_sizes in sizes.values() for n in split_sizes]
    if len(set(every)) != 1 and not uneven:
        raise UserError(f"the classes of {where} have different numbers of images ({sorted(set(every))}); every "
                        f"class needs the same number: {repair}")
    if check is not None:
        for split, by_class in files.items():
            check(split, list(by_class), sizes[split])
    per_class = max(every)
    names = [f"{split}/{name}" for split, by_class in files.items() for name in by_class]
    key = fingerprint(f"{decoding(mode, invert)}\n{image_size}\n", (
        (f"{split}/{name}/{os.path.basename(p)}", p)
        for split, by_class in files.items() for name, class_files in by_class.items() for p in class_files))
    path = cache_folder(cache_dir) / f"{dataset.lower().replace('-', '')}_{image_size}px_{key[:16]}.pt"
    channels = 1 if mode == "L" else 3
    shape = (len(names), per_class, channels, image_size, image_size)
    real = torch.arange(per_class) < torch.tensor(every).unsqueeze(1)  # [classes, S]: False at padding

    def build() -> Tensor:
        pixels = decode_all(paths, image_size, mode, repair)
        pixels = 255 - pixels if invert else pixels
        if real.all():
            return pixels
        padded = pixels.new_zeros(shape)
        padded[real] = pixels  # class-major, as `paths`
        return padded

    decoded = cached(path, key, names, shape, build, dataset)
    splits, start = {}, 0
    for split, by_class in files.items():
        counts = torch.tensor(sizes[split]) if uneven else None
        splits[split] = ClassImages(decoded[start:start + len(by_class)], list(by_class), counts)
        start += len(by_class)
    return splits
