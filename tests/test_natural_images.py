"""miniImageNet (both layouts) and CIFAR-FS on small fixtures written in exactly their real formats; augmentation;
ResNet-12; a few training steps at 84x84 through the shipped configs."""

import csv
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, run_cli
from PIL import Image

from ttt_meta.cli import main
from ttt_meta.data import augment as augment_module
from ttt_meta.data import images
from ttt_meta.data.augment import augment
from ttt_meta.data.cifarfs import load_cifarfs
from ttt_meta.data.datamodule import EpisodeDataModule
from ttt_meta.data.miniimagenet import load_miniimagenet
from ttt_meta.nn.encoders import make_encoder

CONFIGS = Path(__file__).parents[1] / "configs"
# ImageNet synset ids as class names, as in the real files; 5 classes per split serve 5-way episodes
CLASSES = {"train": [f"n0{i}" for i in range(1000, 1006)], "val": [f"n0{i}" for i in range(2000, 2005)],
           "test": [f"n0{i}" for i in range(3000, 3005)]}
PER_CLASS = 6


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


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def listing(root: Path) -> list:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in [root, *root.rglob("*")])


# miniImageNet: learn2learn's pickles ------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickles_load(tmp_path, cache, protocol):
    write_pickles(tmp_path / "miniimagenet", protocol=protocol)
    data = load_miniimagenet(tmp_path, cache_dir=cache)
    for split, names in CLASSES.items():
        x = data[split].images
        assert data[split].names == sorted(names)
        assert x.shape == (len(names), PER_CLASS, 3, 84, 84) and x.dtype == torch.uint8
        for c, name in enumerate(data[split].names):  # each class holds its own images, in order
            for i in (0, PER_CLASS - 1):
                assert torch.equal(x[c, i], torch.from_numpy(picture(name, i, 84, 84)).permute(2, 0, 1))
    sizes = [len(set(data[split].names)) for split in CLASSES]
    assert len(set().union(*(data[split].names for split in CLASSES))) == sum(sizes) == 16  # disjoint splits


def test_pickles_found_in_root_itself_and_resized(tmp_path):
    write_pickles(tmp_path)
    data = load_miniimagenet(tmp_path, image_size=42)
    x = data["val"].images
    assert x.shape == (5, PER_CLASS, 3, 42, 42)
    assert torch.allclose(x[0, 0, :, 0, 0].float(), torch.from_numpy(colour(data["val"].names[0])).float(), atol=1)


def test_truncated_pickle(tmp_path):
    folder = write_pickles(tmp_path / "miniimagenet")
    path = folder / "mini-imagenet-cache-validation.pkl"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="mini-imagenet-cache-validation.pkl .*truncated or damaged"):
        load_miniimagenet(tmp_path)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    folder = write_pickles(tmp_path / "miniimagenet")

    class Exploit:
        def __reduce__(self):
            return (print, ("this ran",))

    (folder / "mini-imagenet-cache-test.pkl").write_bytes(pickle.dumps({"image_data": Exploit()}))
    with pytest.raises(ValueError, match="builtins.print"):
        load_miniimagenet(tmp_path)


def test_pickle_with_wrong_contents(tmp_path):
    folder = write_pickles(tmp_path / "miniimagenet")
    (folder / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps({"images": [1, 2]}))
    with pytest.raises(ValueError, match="not a miniImageNet pickle.*image_data"):
        load_miniimagenet(tmp_path)


def test_missing_pickle(tmp_path):
    folder = write_pickles(tmp_path / "miniimagenet")
    (folder / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="mini-imagenet-cache-test.pkl is missing"):
        load_miniimagenet(tmp_path)


@pytest.mark.parametrize("write", [write_pickles, write_folder], ids=["pickles", "folder"])
def test_class_in_two_splits(tmp_path, cache, write):
    write(tmp_path / "miniimagenet", classes={**CLASSES, "test": [*CLASSES["test"][:4], "n01000"]})
    with pytest.raises(ValueError, match="n01000 is in both the train and the test split"):
        load_miniimagenet(tmp_path, cache_dir=cache)
    assert not cache.exists()  # refused before anything was decoded


def test_no_data_names_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"miniImageNet not found.*mini-imagenet-cache.*data\.download: true"
                                                r".*images/.*train\.csv, val\.csv and test\.csv"):
        load_miniimagenet(tmp_path / "nowhere")


def test_download_goes_through_learn2learn(tmp_path, monkeypatch):
    """download: true hands each split to learn2learn's MiniImagenet (faked here: no network) in root/miniimagenet."""
    calls = []

    class FakeMiniImagenet:
        def __init__(self, root, mode, download):
            calls.append((mode, download))
            write_pickles(Path(root))

    fake = types.ModuleType("learn2learn.vision.datasets")
    fake.MiniImagenet = FakeMiniImagenet
    monkeypatch.setitem(sys.modules, "learn2learn.vision.datasets", fake)
    data = load_miniimagenet(tmp_path, download=True)
    assert calls == [("train", True), ("validation", True), ("test", True)]
    assert data["test"].images.shape == (5, PER_CLASS, 3, 84, 84)


# miniImageNet: images/ + CSVs -------------------------------------------------------------------------------


def test_folder_loads_resized_and_cached(tmp_path, cache, monkeypatch):
    root = tmp_path / "data"
    write_folder(root / "miniimagenet")
    before = listing(root)
    data = load_miniimagenet(root, cache_dir=cache)
    assert listing(root) == before  # nothing written beside the data
    for split, names in CLASSES.items():
        x = data[split].images
        assert data[split].names == sorted(names)
        assert x.shape == (len(names), PER_CLASS, 3, 84, 84) and x.dtype == torch.uint8
        for c, name in enumerate(data[split].names):  # background keeps the class colour (JPEG: approximately)
            assert (x[c, :, :, -1, -1].float() - torch.from_numpy(colour(name)).float()).abs().max() <= 6
        assert x.max() >= 250  # the bright square survives the resize
    (file,) = cache.iterdir()
    assert file.name.startswith("miniimagenet_84px_")

    def fail(*args):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(images, "decode_all", fail)
    again = load_miniimagenet(root, cache_dir=cache)
    assert all(torch.equal(data[k].images, again[k].images) for k in CLASSES)


def test_folder_and_pickles_give_the_same_classes(tmp_path, cache):
    pickled = load_miniimagenet(write_pickles(tmp_path / "a"), cache_dir=cache)
    folder = load_miniimagenet(write_folder(tmp_path / "b"), cache_dir=cache)
    for split in CLASSES:
        assert pickled[split].names == folder[split].names
        gap = (pickled[split].images.float() - folder[split].images.float()).abs().mean()
        assert gap < 8  # the same pictures, the JPEGs resized from their own sizes


def test_csv_naming_a_missing_image(tmp_path, cache):
    folder = write_folder(tmp_path / "miniimagenet")
    (folder / "images" / "n0200000000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of the 96 images .* missing, e.g. .*n0200000000003.jpg"):
        load_miniimagenet(tmp_path, cache_dir=cache)


def test_damaged_jpeg(tmp_path, cache):
    folder = write_folder(tmp_path / "miniimagenet")
    jpeg = folder / "images" / "n0300100000002.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:100])
    with pytest.raises(ValueError, match="n0300100000002.jpg.*damaged"):
        load_miniimagenet(tmp_path, cache_dir=cache)


def test_csv_without_header(tmp_path, cache):
    folder = write_folder(tmp_path / "miniimagenet")
    (folder / "val.csv").write_text("n0200000000001.jpg,n02000\n")
    with pytest.raises(ValueError, match="val.csv must start with the header 'filename,label'"):
        load_miniimagenet(tmp_path, cache_dir=cache)


def test_csv_missing(tmp_path, cache):
    folder = write_folder(tmp_path / "miniimagenet")
    (folder / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['test.csv'\]"):
        load_miniimagenet(tmp_path, cache_dir=cache)


# CIFAR-FS ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processed", [True, False], ids=["processed", "extracted"])
def test_cifarfs_loads(tmp_path, cache, processed):
    data = load_cifarfs(write_cifarfs(tmp_path, processed), cache_dir=cache)
    for split, names in CLASSES.items():
        x = data[split].images
        assert data[split].names == [f"class_{n}" for n in sorted(names)]
        assert x.shape == (len(names), PER_CLASS, 3, 32, 32) and x.dtype == torch.uint8
        assert torch.equal(x[0, 1], torch.from_numpy(picture(sorted(names)[0], 1, 32, 32)).permute(2, 0, 1))
    (file,) = cache.iterdir()
    assert file.name.startswith("cifarfs_32px_")


def test_cifarfs_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIFAR-FS not found.*processed/\{train,val,test\}.*data\.download"):
        load_cifarfs(tmp_path)


def test_cifarfs_missing_class_folder(tmp_path, cache):
    write_cifarfs(tmp_path, processed=False)
    split_file = tmp_path / "cifarfs/cifar100/splits/bertinetto/val.txt"
    split_file.write_text(split_file.read_text() + "class_n09999\n")
    with pytest.raises(FileNotFoundError, match="val split .* incomplete .*class_n09999"):
        load_cifarfs(tmp_path, cache_dir=cache)


# Episodes, augmentation, encoders ---------------------------------------------------------------------------


def datamodule(root: Path, cache: Path, **options) -> EpisodeDataModule:
    dm = EpisodeDataModule(dataset="miniimagenet", root=str(root), cache_dir=str(cache), ways=5, shots=1, queries=2,
                           meta_batch_size=3, train_batches_per_epoch=2, val_episodes=4, eval_batch_size=4, **options)
    dm.setup("fit")
    return dm


def test_episodes_from_miniimagenet(tmp_path, cache):
    dm = datamodule(write_pickles(tmp_path / "miniimagenet").parent, cache)
    assert dm.hparams.image_size == 84 and dm.hparams.rotations is False and dm.image_shape == (3, 84, 84)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["support"].shape == (3, 5, 3, 84, 84) and batch["query"].shape == (3, 10, 3, 84, 84)
    assert batch["support"].dtype == torch.uint8 and sorted(batch["support_labels"][0].tolist()) == list(range(5))
    val = next(iter(dm.val_dataloader()))
    assert val["support"].shape == (4, 5, 3, 84, 84)


def test_augmented_training_stream(tmp_path, cache):
    """Augmentation changes the training images, is the same for the same seed, and leaves validation alone."""
    root = write_pickles(tmp_path / "miniimagenet").parent
    torch.manual_seed(0)
    plain = next(iter(datamodule(root, cache).train_dataloader()))
    streams = []
    for _ in range(2):
        torch.manual_seed(0)
        dm = datamodule(root, cache, augment=True)
        streams.append(next(iter(dm.train_dataloader())))
    assert torch.equal(plain["support_labels"], streams[0]["support_labels"])  # the same episodes...
    assert not torch.equal(plain["support"], streams[0]["support"])  # ...augmented
    assert all(torch.equal(streams[0][k], streams[1][k]) for k in ("support", "query"))
    val = next(iter(dm.val_dataloader()))
    assert torch.equal(val["support"], next(iter(datamodule(root, cache).val_dataloader()))["support"])


def test_augment_geometry(monkeypatch):
    """Without colour jitter, each output is a crop of the zero-padded image, flipped or not."""
    monkeypatch.setattr(augment_module, "JITTER", 0.0)
    x = torch.randint(0, 256, (2, 4, 3, 16, 16), dtype=torch.uint8)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    pad = 2  # 16 // 8
    flips = 0
    for image, result in zip(x.flatten(0, 1), out.flatten(0, 1)):
        padded = torch.nn.functional.pad(image, (pad,) * 4)
        crops = [(padded[:, i:i + 16, j:j + 16], flip) for i in range(2 * pad + 1) for j in range(2 * pad + 1)
                 for flip in (False, True)]
        matches = [flip for crop, flip in crops if torch.equal(crop.flip(-1) if flip else crop, result)]
        assert matches
        flips += matches[0]
    assert 0 < flips < 8


def test_augment_jitter():
    x = torch.full((64, 3, 8, 8), 100, dtype=torch.uint8)
    x[:, 0] = 200
    out = augment(x, torch.Generator().manual_seed(1)).float()
    centre = out[..., 2:6, 2:6]  # inside any crop of a padded 8x8 image
    brightness = centre.mean((1, 2, 3)) / x.float().mean()
    assert brightness.min() < 0.8 and brightness.max() > 1.2  # factors spread over [0.6, 1.4]
    assert out.max() <= 255 and out.min() >= 0


@pytest.mark.parametrize("size", [84, 32])
def test_resnet12(size):
    encoder = make_encoder("resnet12", 3, 4, size)
    assert encoder.out_features == 40  # widths 4, 10, 20, 40
    assert encoder(torch.rand(2, 3, size, size)).shape == (2, 40)
    per_task = make_encoder("resnet12", 3, 4, size, batch_stats=True)
    assert not any(name.endswith("running_mean") for name, _ in per_task.named_buffers())


def test_model_and_data_image_shapes_must_agree(tmp_path, monkeypatch):
    write_pickles(tmp_path / "data" / "miniimagenet")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"the data gives 3x84x84 images but the model reads 1x28x28.*in_channels: 3"):
        main(["fit", "--config", str(CONFIGS / "omniglot" / "ttt_linear_5w1s.yaml"), "--data.dataset=miniimagenet",
              f"--data.root={tmp_path / 'data'}", "--data.queries=2", "--data.eval_queries=2"])
    assert not (tmp_path / "logs").exists()


# Shipped configs and training at 84x84 ----------------------------------------------------------------------

NATURAL = sorted([*CONFIGS.glob("miniimagenet/*.yaml"), *CONFIGS.glob("cifarfs/*.yaml")])


def test_natural_image_configs_build():
    assert len(NATURAL) == 28
    for config in NATURAL:
        cli = main(["--config", str(config)], run=False)
        size = 84 if config.parent.name == "miniimagenet" else 32
        assert cli.model.hparams.image_size == size and cli.model.hparams.in_channels == 3, config
        assert cli.datamodule.hparams.dataset == config.parent.name and cli.datamodule.hparams.image_size == size
        assert cli.config.run_name == f"{config.parent.name}_{config.stem}"


FEW = [*DATA, "--data.queries=2", "--data.eval_queries=2", "--data.val_episodes=4", "--data.test_episodes=6",
       "--model.init_args.encoder_channels=4"]


@pytest.mark.parametrize("config, extra", [
    ("miniimagenet/ttt_linear_5w1s.yaml", ["--model.init_args.width=16"]),
    ("miniimagenet/ttt_linear_5w5s.yaml", ["--model.init_args.width=16", "--model.init_args.encoder=resnet12",
                                           "--data.augment=true", "--data.shots=2"]),
    ("miniimagenet/maml_5w1s.yaml", ["--model.init_args.train_steps=1", "--model.init_args.test_steps=1"]),
    ("cifarfs/protonet_5w1s.yaml", []),
], ids=["ttt_conv4", "ttt_resnet12_augment", "maml_conv4", "cifarfs_protonet"])
def test_fit_and_test_on_fixtures(tmp_path, config, extra):
    """A few training steps and a test run through a shipped config, on the fixture written in the real format."""
    root = tmp_path / "data"
    if config.startswith("cifarfs"):
        write_cifarfs(root)
    else:
        write_pickles(root / "miniimagenet")
    name = "_".join(Path(config).with_suffix("").parts)
    common = ["--config", str(CONFIGS / config), f"--data.root={root}", f"--data.cache_dir={tmp_path / 'cache'}",
              *FEW, *extra]
    run_cli(tmp_path, ["fit", *common, "--trainer.max_steps=2"],
            ["test", *common, "--ckpt_path", f"checkpoints/{name}/version_0/last.ckpt"])
    report = next((tmp_path / "logs" / name).glob("version_*/test_results.json"))
    assert '"episodes": 6' in report.read_text()
