"""The model and the data must agree on image shapes; a few training steps at 84x84 through the shipped configs.

(The loaders are tested in test_miniimagenet.py and test_cifarfs.py, their fixtures are in fixtures.py.)"""

from pathlib import Path

import pytest
from conftest import DATA, run_cli
from fixtures import write_cifarfs, write_pickles

from ttt_meta.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"


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
    assert len(NATURAL) == 32  # 8 models x 5w1s, 5w5s x miniImageNet, CIFAR-FS
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
