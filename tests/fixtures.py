"""Small data sets written in exactly their real formats (Omniglot, miniImageNet's two layouts, CIFAR-FS), for
the loader, data module and training tests. A plain module: ``from fixtures import write_pickles``."""

import csv
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

# Omniglot in torchvision's layout: 5 characters over both image sets, and a split of them
CHARACTERS = {
    "images_background": ["Alpha/character01", "Alpha/character02", "Beta/character01"],
    "images_evaluation": ["Gamma/character01", "Gamma/character02"],
}
SPLIT = {"train": ["Alpha/character01", "Beta/character01", "Gamma/character02"],
         "val": ["Alpha/character02"], "test": ["Gamma/character01"]}

# miniImageNet and CIFAR-FS: ImageNet synset ids as class names, as in the real files; 5 classes per split serve
# 5-way episodes
CLASSES = {"train": [f"n0{i}" for i in range(1000, 1006)], "val": [f"n0{i}" for i in range(2000, 2005)],
           "test": [f"n0{i}" for i in range(3000, 3005)]}
PER_CLASS = 6


def listing(root: Path) -> list:
    """Every path under `root` with its size and modification time: equal listings mean nothing was written."""
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in [root, *root.rglob("*")])


def make_omniglot(root: Path) -> Path:
    """Write 5 characters x 20 images (105x105, mode "1", black strokes on white) under root/omniglot-py."""
    for c, (folder, name) in enumerate((f, n) for f, names in CHARACTERS.items() for n in names):
        directory = root / "omniglot-py" / folder / name
        directory.mkdir(parents=True)
        for drawer in range(1, 21):
            pixels = np.ones((105, 105), dtype=bool)  # True = white
            pixels[20 + 10 * c : 30 + 10 * c, 10 + drawer : 60 + drawer] = False  # a bar, per character
            Image.fromarray(pixels).save(directory / f"{c + 1:04d}_{drawer:02d}.png")
    return root


def colour(name: str) -> np.ndarray:
    """A class's colour: uint8 [3], distinct per class."""
    return np.random.default_rng(int(name[1:])).integers(30, 226, 3).astype(np.uint8)


def picture(name: str, i: int, height: int, width: int) -> np.ndarray:
    """Image i of a class: its colour with a bright square whose place depends on i, uint8 [H, W, 3]."""
    x = np.broadcast_to(colour(name), (height, width, 3)).copy()
    x[5 + i: 25 + i, 10: 30] = 255
    return x


def write_pickles(folder: Path, classes=CLASSES, protocol: int = 4) -> Path:
    """learn2learn's files: mini-imagenet-cache-<mode>.pkl, {"image_data": uint8 [N, 84, 84, 3], "class_dict"}.
    Images of a class are interleaved with the others' (class_dict indices are not contiguous)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, mode in (("train", "train"), ("val", "validation"), ("test", "test")):
        names = classes[split]
        order = [(name, i) for i in range(PER_CLASS) for name in names]
        data = {"image_data": np.stack([picture(name, i, 84, 84) for name, i in order]),
                "class_dict": {name: [k for k, (n, _) in enumerate(order) if n == name] for name in names}}
        (folder / f"mini-imagenet-cache-{mode}.pkl").write_bytes(pickle.dumps(data, protocol=protocol))
    return folder


def write_folder(folder: Path, classes=CLASSES) -> Path:
    """Ravi & Larochelle's layout: images/<synset><number>.jpg at ImageNet-like sizes, and <split>.csv."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for split, names in classes.items():
        with open(folder / f"{split}.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["filename", "label"])
            for name in names:
                for i in range(PER_CLASS):
                    filename = f"{name}{i + 1:08d}.jpg"
                    Image.fromarray(picture(name, i, 100 + 7 * i, 120)).save(folder / "images" / filename, quality=95)
                    writer.writerow([filename, name])
    return folder


def write_cifarfs(root: Path, processed: bool = True) -> Path:
    """learn2learn's CIFAR-FS layout under root/cifarfs: processed/<split>/<class>/*.png, or the extracted
    archive cifar100/data/<class>/*.png with cifar100/splits/bertinetto/<split>.txt."""
    base = root / "cifarfs"
    for split, names in CLASSES.items():
        for name in names:
            label = f"class_{name}"
            folder = base / ("processed" / Path(split) if processed else Path("cifar100/data")) / label
            folder.mkdir(parents=True)
            for i in range(PER_CLASS):
                Image.fromarray(picture(name, i, 32, 32)[:, :, :]).save(folder / f"{label}_s_{i:04d}.png")
        if not processed:
            splits = base / "cifar100/splits/bertinetto"
            splits.mkdir(parents=True, exist_ok=True)
            (splits / f"{split}.txt").write_text("".join(f"class_{n}\n" for n in names))
    return root
