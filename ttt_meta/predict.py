"""``python -m ttt_meta predict --ckpt_path CKPT --support DIR --query DIR``: classify your own images;
``python -m ttt_meta predict --ckpt_path CKPT --stream DIR --labels CSV``: watch a model learn from a stream.

`--support` holds one sub-folder per class (the folder name is the label, any number of images each).
`--query` holds images, or sub-folders named after support classes (their images are then scored and the
accuracy printed). The whole support set and all queries form one episode: one forward pass. Writes a CSV
with one row per query: file, predicted label, the probability of each class.

`--stream` holds images whose names sort in the order they are shown (001.png, 002.png, ...); `--labels` is a CSV
of ``file,label`` rows giving the label of each image that has one (a header row ``file,label`` is allowed).
The labelled images come first: each is predicted before its label is given, from the images and labels before
it (the online protocol, for a model trained with data.protocol: online); every image after them is predicted
from all of them. Writes a CSV with one row per image in order: step, file, label (empty when not given),
instance (the how-many-th image of its label), predicted label, the probability of each label; prints the
accuracy on the labelled images, overall and by instance. Labels are numbered by first appearance.

Images are read like the training data: grey (RGB for a 3-channel model), resized to the model's image size,
and, for grey images, with bright strokes on a dark ground as in Omniglot (an image whose mean is light is
inverted).
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


def stream(model, folder: Path, labels_csv: Path) -> tuple[dict, list[Path], list[str], list[str | None]]:
    """(batch of one stream of the labelled images, all image files in order, label names by first appearance,
    the label of each file or None)."""
    if not getattr(model, "learns_online", False):
        raise UserError(f"this {type(model).__name__} cannot learn from a stream. Use a checkpoint of a learner "
                        f"trained with data.protocol: online (configs/omniglot/*_online_*.yaml)")
    if not folder.is_dir() or not labels_csv.is_file():
        raise MissingInput(f"--stream {folder} must be a folder of images and --labels {labels_csv} a CSV file of "
                           f"file,label rows. Pass both")
    files = image_files(folder, "stream")
    given = {}
    with labels_csv.open(newline="") as f:
        for row in csv.reader(f):
            if row and row != ["file", "label"]:
                if len(row) != 2:
                    raise UserError(f"--labels {labels_csv}: the row {row} is not file,label. Write one file,label "
                                    f"row per labelled image")
                given[row[0].strip()] = row[1].strip()
    if unknown := sorted(set(given) - {p.name for p in files}):
        raise UserError(f"--labels names {unknown[:3]}, not images of --stream {folder}. Name its images by file "
                        f"name")
    labels = [given.get(p.name) for p in files]
    labelled = sum(label is not None for label in labels)
    if None in labels[:labelled]:
        raise UserError(f"in --stream {folder}, {files[labels.index(None)].name} has no label but a later image has: "
                        f"the labelled images must come first in name order. Label it or rename the files")
    names = list(dict.fromkeys(label for label in labels if label is not None))
    if not model.serves(len(names)):
        raise UserError(f"--labels has {len(names)} labels but this {type(model).__name__} serves "
                        f"{model.ways_text()}")
    channels, size = model.hparams.get("in_channels", 1), model.hparams.get("image_size", 28)
    images = torch.stack([read_image(p, channels, size) for p in files]).unsqueeze(0)
    ids = torch.tensor([[names.index(label) for label in labels[:labelled]]])
    return {"stream": images, "stream_labels": ids, "ways": len(names)}, files, names, labels


def predict_stream(model, batch: dict) -> torch.Tensor:
    """Probabilities [T, N] of every image of `batch`: the labelled ones (stream_labels [1, L]) as the stream's steps,
    each later image as the step after all of them."""
    images, labelled = batch["stream"], batch["stream_labels"].shape[1]
    with torch.inference_mode():
        probs = [model.logits(dict(batch, stream=images[:, :labelled]))[0]] if labelled else []
        for t in range(labelled, images.shape[1]):
            step = dict(batch, stream=torch.cat([images[:, :labelled], images[:, t:t + 1]], 1),
                        stream_labels=torch.cat([batch["stream_labels"], batch["stream_labels"].new_zeros(1, 1)], 1))
            probs.append(model.logits(step)[0, -1:])
    return torch.cat(probs).softmax(-1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m ttt_meta predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", required=True, help="a checkpoint written by fit")
    p.add_argument("--support", type=Path, help="one sub-folder of images per class")
    p.add_argument("--query", type=Path, help="images, or sub-folders named after classes")
    p.add_argument("--stream", type=Path, help="images whose names sort in the order they are shown")
    p.add_argument("--labels", type=Path, help="with --stream: a CSV of file,label rows")
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="the CSV to write")
    args = p.parse_args(argv)
    episode_given, stream_given = (args.support, args.query), (args.stream, args.labels)
    if not (None not in episode_given and stream_given == (None, None)
            or None not in stream_given and episode_given == (None, None)):
        p.error("give --support and --query (an episode), or --stream and --labels (a stream)")
    model = load_model(args.ckpt_path)
    if args.stream is not None:
        return main_stream(model, args)
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


def main_stream(model, args) -> dict:
    """``predict --stream --labels``: the CSV of every step and the accuracy on the labelled ones (module doc)."""
    batch, files, names, labels = stream(model, args.stream, args.labels)
    probs = predict_stream(model, batch)
    pred = probs.argmax(-1).tolist()
    seen: dict[str, int] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    right_by_instance: dict[int, list[int]] = {}
    with args.out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "file", "label", "instance", "predicted", *[f"p_{n}" for n in names]])
        for t, (path, label, k, row) in enumerate(zip(files, labels, pred, probs.tolist())):
            instance = ""
            if label is not None:
                instance = seen[label] = seen.get(label, 0) + 1
                right_by_instance.setdefault(instance, []).append(int(names[k] == label))
            writer.writerow([t, path.name, label or "", instance, names[k], *[f"{x:.4f}" for x in row]])
    right = [r for rs in right_by_instance.values() for r in rs]
    result = {"csv": str(args.out), "steps": len(files), "labelled": len(right), "labels": names,
              "acc": sum(right) / len(right) if right else None,
              "by_instance": {n: sum(rs) / len(rs) for n, rs in sorted(right_by_instance.items())}}
    print(f"{len(files)} images, {len(right)} labelled, {len(names)} labels -> {args.out}")
    if right:
        print(f"accuracy on the labelled images, each predicted before its label: {100 * result['acc']:.1f}%; by "
              f"instance: " + ", ".join(f"{n}: {100 * a:.0f}%" for n, a in result["by_instance"].items()))
    return result
