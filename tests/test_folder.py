"""Your own classes (``data.dataset: folder``): class folders of PNG and JPEG images of any size, grey or colour,
read as RGB at data.image_size; a fit and a test through the command line; each bad layout as one line that names
the problem and its fix, with nothing written."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from fixtures import listing
from PIL import Image

from ttt_meta.cli import command_line, main
from ttt_meta.data.folder import load_folder

CONFIGS = Path(__file__).parents[1] / "configs"
# {split: {class: images}}: classes of different sizes, 3-way 1-shot episodes with 1 query fit every split
TREE = {"train": {"ant": 3, "bee": 4, "cat": 2, "dog": 3}, "val": {"eel": 2, "fox": 3, "gnu": 2},
        "test": {"hen": 2, "ibis": 3, "jay": 4}}
FORMATS = [(".png", (40, 30), "RGB"), (".JPG", (16, 16), "L"), (".jpeg", (100, 64), "RGB"), (".Png", (23, 57), "L")]
CONFIG = ["--config", str(CONFIGS / "model" / "protonet.yaml"), "--config", str(CONFIGS / "data" / "folder.yaml")]
TINY = ["--data.image_size=16", "--model.init_args.image_size=16", "--model.init_args.encoder_channels=4",
        "--data.ways=3", "--data.shots=1", "--data.queries=1", "--data.meta_batch_size=2",
        "--data.train_batches_per_epoch=2", "--data.val_episodes=4", "--data.test_episodes=6",
        "--data.eval_batch_size=4", "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]


def write_tree(root: Path, tree: dict = TREE) -> Path:
    """Class folders under root/<split>/<class>/: image i in format i mod 4 (suffix, size, mode), the class's colour
    with a bright bar at a row of its own; and a file that is no image."""
    for c, (split, name, count) in enumerate((s, n, k) for s, classes in tree.items() for n, k in classes.items()):
        folder = root / split / name
        folder.mkdir(parents=True)
        colour = np.random.default_rng(c).integers(30, 200, 3).astype(np.uint8)
        for i in range(count):
            suffix, (width, height), mode = FORMATS[i % len(FORMATS)]
            x = np.broadcast_to(colour, (height, width, 3)).copy()
            x[2 * i: 2 * i + 3] = 255
            Image.fromarray(x).convert(mode).save(folder / f"{i:02d}{suffix}", quality=95)
        (folder / "notes.txt").write_text("not an image")
    return root


def test_images_are_read_as_rgb_at_the_image_size(tmp_path):
    root, cache = write_tree(tmp_path / "classes"), tmp_path / "cache"
    data = load_folder(root, cache, image_size=16)
    for split, classes in TREE.items():
        x = data[split].images
        assert data[split].names == sorted(classes) and data[split].sizes() == [classes[n] for n in sorted(classes)]
        assert x.shape == (len(classes), 4, 3, 16, 16) and x.dtype == torch.uint8  # padded to the largest class
        for c, name in enumerate(sorted(classes)):
            files = sorted(p for p in (root / split / name).iterdir() if p.suffix != ".txt")
            assert len(files) == classes[name]
            for i, file in enumerate(files):
                with Image.open(file) as image:
                    expected = np.asarray(image.convert("RGB").resize((16, 16), Image.Resampling.LANCZOS))
                assert torch.equal(x[c, i], torch.from_numpy(expected.copy()).permute(2, 0, 1)), file
            assert not x[c, classes[name]:].any()  # padding
    grey = data["train"].images[0, 1]  # ant/01.JPG, saved grey
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    (file,) = cache.iterdir()
    assert file.name.startswith("folder_16px_")
    again = load_folder(root, cache, image_size=16)  # from the cache
    assert torch.equal(again["test"].images, data["test"].images) and torch.equal(again["test"].counts,
                                                                                   data["test"].counts)


def test_data_part_composes_after_a_model():
    cli = main([*CONFIG, "--data.root=my_classes"], run=False)
    assert cli.datamodule.hparams.dataset == "folder" and cli.datamodule.hparams.root == "my_classes"
    assert cli.datamodule.hparams.image_size == cli.model.hparams.image_size == 84
    assert cli.model.hparams.in_channels == 3 and cli.datamodule.hparams.rotations is False
    assert type(cli.model).__name__ == "ProtoNetLearner"


def test_fit_and_test_through_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TTT_META_CACHE", str(tmp_path / "cache"))
    common = [*CONFIG, f"--data.root={write_tree(tmp_path / 'classes')}", *TINY]
    run_cli(tmp_path, ["fit", *common], ["test", *common, "--ckpt_path", "last"])
    report = json.loads(next((tmp_path / "logs" / "folder").glob("version_*/test_results.json")).read_text())
    assert report["episodes"] == 6 and report["dataset"] == "folder" and report["ways"] == 3
    assert [p.name[:12] for p in (tmp_path / "cache").iterdir()] == ["folder_16px_"]


def _broken(name: str, root: Path) -> tuple[list[str], str]:
    """Break the tree at `root` as case `name` says: (extra options, the error line the command must print)."""
    if name == "missing split":
        (root / "val").rename(root.parent / "elsewhere")
        return [], (f"{root / 'val'} is not a folder: the folder data set reads data.root ({root}) as train/, val/ "
                    f"and test/, each with one sub-folder of images per class (the folder's name is the class). "
                    f"Create val/ there, or point data.root at the folder that holds train/, val/ and test/.")
    if name == "empty split":
        for folder in (root / "test").iterdir():
            folder.rename(root.parent / folder.name)
        (root / "test" / "hen.png").write_bytes((root.parent / "hen" / "00.png").read_bytes())
        return [], (f"{root / 'test'} holds no class folders: the folder data set reads data.root ({root}) as "
                    f"train/, val/ and test/, each with one sub-folder of images per class (the folder's name is the "
                    f"class). Put each test class's images in a sub-folder of test/ named after the class.")
    if name == "empty class":
        (root / "train" / "elk").mkdir()
        (root / "train" / "elk" / "notes.txt").write_text("not an image")
        return [], (f"class folder {root / 'train' / 'elk'} holds no images (.bmp, .gif, .jpeg, .jpg, .png, .tif, "
                    f".tiff, .webp). Add images to it or remove it.")
    if name == "too few images":
        return ["--data.eval_queries=2"], (
            f"shots + queries = 3 exceeds the 2 images of {root / 'val' / 'eel'}, the smallest class of the val "
            f"split. Lower data.eval_shots or data.eval_queries (unset, they take the training values), or add "
            f"images to that class.")
    if name == "too few classes":
        return ["--data.ways=4"], "4-way episodes need 4 classes but the val split has 3. Lower data.eval_ways (unset, " \
                                  "they take the training values)."
    if name == "unreadable image":
        broken = root / "test" / "jay" / "02.jpeg"
        broken.write_bytes(b"not a jpeg")
        return [], (f"cannot read image {broken} (UnidentifiedImageError: cannot identify image file "
                    f"'{broken}'); the file is damaged: replace the file or delete it.")
    assert name == "class in two splits"
    (root / "test" / "jay").rename(root / "test" / "bee")
    return [], ("class bee is in both the train and the test split of the folder data; the splits must be "
                "disjoint. Remove the class from one of them.")


CASES = ["missing split", "empty split", "empty class", "too few images", "too few classes", "unreadable image",
         "class in two splits"]


@pytest.mark.parametrize("name", CASES)
def test_a_bad_layout_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, name):
    root = write_tree(tmp_path / "data" / "classes")
    extra, message = _broken(name, root)
    run, cache = tmp_path / "run", tmp_path / "cache"
    run.mkdir()
    monkeypatch.chdir(run)
    monkeypatch.setenv("TTT_META_CACHE", str(cache))
    before = listing(tmp_path / "data")
    with pytest.raises(SystemExit) as stop:
        command_line(functools.partial(main, ["fit", *CONFIG, f"--data.root={root}", *TINY, *extra]))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"
    assert listing(tmp_path / "data") == before and not cache.exists() and not any(run.iterdir())
