"""``python -m ttt_meta predict --ckpt_path CKPT --support DIR --query DIR``: classify your own images.

`--support` holds one sub-folder per class (the folder name is the label, any number of images each).
`--query` holds images, or sub-folders named after support classes (their images are then scored and the
accuracy printed). Images are read like the training data: grey (RGB for a 3-channel model), resized to the
model's image size, and, for grey images, with bright strokes on a dark ground as in Omniglot (an image whose
mean is light is inverted). The whole support set and all queries form one episode: one forward pass.
Writes a CSV with one row per query: file, predicted label, the probability of each class.
"""

from __future__ import annotations

import argparse
import csv
import importlib
from pathlib import Path

import numpy as np
import torch

from .checkpointing import read_checkpoint
from .data.images import decode, image_files
from .errors import MissingInput, UserError


def load_model(path: str | Path) -> torch.nn.Module:
    """The learner a ``fit`` checkpoint holds, rebuilt from its recorded class and settings, in eval mode."""
    ckpt = read_checkpoint(path)
    hp = dict(ckpt.get("hyper_parameters") or {})
    class_path = hp.pop("_class_path", None)
    hp.pop("_instantiator", None)
    if class_path is None:
        raise UserError(f"checkpoint {path} does not record its model class. Use a checkpoint written by "
                        f"`python -m ttt_meta fit` (checkpoints/<run_name>/version_N/*.ckpt)")
    module, name = class_path.rsplit(".", 1)
    model = getattr(importlib.import_module(module), name)(**hp)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def read_image(path: Path, channels: int, size: int) -> torch.Tensor:
    """uint8 [channels, size, size] as the model saw its training images (``data.images.decode``)."""
    array = decode(path, size, "L" if channels == 1 else "RGB", "remove it or save it as PNG or JPEG")
    if channels == 1 and array.mean() > 127:  # dark strokes on a light ground: invert, as Omniglot was
        array = 255 - array
    return torch.from_numpy(np.ascontiguousarray(array))


def episode(model, support: Path, query: Path) -> tuple[dict, list[str], list[Path], list]:
    """(batch of one episode in `model`'s input format, class names, query files, true class index per query or
    None)."""
    if not support.is_dir() or not query.is_dir():
        raise MissingInput(f"--support {support} and --query {query} must both be folders. Pass the folders of "
                           f"your class sub-folders (--support) and of your query images (--query)")
    classes = sorted(p.name for p in support.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise UserError(f"--support {support} needs one sub-folder per class, at least 2; found {len(classes)}. "
                        f"Put each class's images in a sub-folder named after the class")
    if not model.serves(len(classes)):  # the model's side of the contract, checked before any image is read
        raise UserError(f"--support has {len(classes)} classes but this {type(model).__name__} serves "
                        f"{model.ways_text()}. Use {model.ways_text().removesuffix(' ways')} class folders")
    shots = [(path, c) for c, name in enumerate(classes) for path in image_files(support / name, "support class")]
    sub = sorted(p for p in query.iterdir() if p.is_dir())
    if sub:
        unknown = [p.name for p in sub if p.name not in classes]
        if unknown:
            raise UserError(f"query sub-folders {unknown} name no support class (support classes: {classes}). "
                            f"Rename them after support classes, or put the query images directly in --query")
        queries = [(path, classes.index(p.name)) for p in sub for path in image_files(p, "query")]
    else:
        queries = [(path, None) for path in image_files(query, "query")]
    channels, size = model.hparams.get("in_channels", 1), model.hparams.get("image_size", 28)
    read = lambda items: torch.stack([read_image(p, channels, size) for p, _ in items]).unsqueeze(0)  # noqa: E731
    batch = {"support": read(shots), "support_labels": torch.tensor([[c for _, c in shots]]),
             "query": read(queries), "ways": len(classes)}
    return batch, classes, [p for p, _ in queries], [t for _, t in queries]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m ttt_meta predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", required=True, help="a checkpoint written by fit")
    p.add_argument("--support", required=True, type=Path, help="one sub-folder of images per class")
    p.add_argument("--query", required=True, type=Path, help="images, or sub-folders named after classes")
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="the CSV to write")
    args = p.parse_args(argv)
    model = load_model(args.ckpt_path)
    batch, classes, files, truth = episode(model, args.support, args.query)
    with torch.inference_mode():
        probs = model(batch).softmax(-1)[0]
    pred = probs.argmax(-1).tolist()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "predicted", *[f"p_{c}" for c in classes]])
        for path, k, row in zip(files, pred, probs.tolist()):
            writer.writerow([str(path), classes[k], *[f"{x:.4f}" for x in row]])
    result = {"csv": str(args.out), "queries": len(files), "classes": classes}
    print(f"{len(files)} queries, {len(classes)} classes -> {args.out}")
    if truth[0] is not None:
        result["acc"] = sum(int(p == t) for p, t in zip(pred, truth)) / len(truth)
        print(f"accuracy {100 * result['acc']:.2f}% ({sum(int(p == t) for p, t in zip(pred, truth))}/{len(truth)})")
    return result
