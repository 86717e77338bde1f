"""The command line: fit on the quickstart config writes a checkpoint and TensorBoard events; test writes the report."""

import json
from pathlib import Path

import pytest

from ttt_meta.cli import main

CONFIG = str(Path(__file__).parents[1] / "configs" / "quickstart.yaml")
SMALL = ["--model.init_args.width=32", "--model.init_args.encoder_channels=8", "--data.train_batches_per_epoch=3",
         "--data.val_episodes=10", "--data.test_episodes=30", "--data.eval_batch_size=10", "--data.meta_batch_size=4",
         "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_fit_then_test(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", CONFIG, *SMALL])
    ckpt = tmp_path / "checkpoints" / "quickstart" / "version_0" / "last.ckpt"
    assert ckpt.is_file()
    assert any((tmp_path / "checkpoints" / "quickstart" / "version_0").glob("best-*.ckpt"))
    assert list((tmp_path / "logs" / "quickstart").glob("version_0/events.out.tfevents.*"))
    main(["test", "--config", CONFIG, *SMALL, "--ckpt_path", str(ckpt)])
    reports = list((tmp_path / "logs" / "quickstart").glob("version_*/test_results.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["episodes"] == 30 and 0 <= report["acc"] <= 1 and 0 < report["ci95"] < 0.5
    assert report["ways"] == 5 and report["dataset"] == "synthetic"


def test_bad_config_is_rejected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", CONFIG, "--model.init_args.no_such_option=1"])
    with pytest.raises(ValueError, match="unknown core"):
        main(["fit", "--config", CONFIG, *SMALL, "--model.init_args.core=gru"])
