"""Each checkpoint shipped in checkpoints/omniglot/ scores within 2 points of its recorded accuracy on real Omniglot."""

import json
from pathlib import Path

import pytest

from ttt_meta.cli import main

ROOT = Path(__file__).parents[1]
SHIPPED = sorted((ROOT / "checkpoints" / "omniglot").glob("*.ckpt"))


@pytest.mark.parametrize("ckpt", SHIPPED, ids=[c.stem for c in SHIPPED])
def test_shipped_checkpoint(ckpt, omniglot_root, tmp_path, monkeypatch):
    recorded = json.loads(ckpt.with_suffix(".json").read_text())
    config = ROOT / "configs" / "omniglot" / f"{ckpt.stem}.yaml"
    monkeypatch.chdir(tmp_path)
    main(["test", "--config", str(config), "--ckpt_path", str(ckpt), f"--data.root={omniglot_root}",
          "--data.test_episodes=100", "--trainer.enable_progress_bar=false"])
    report = json.loads(next(tmp_path.glob("logs/*/version_*/test_results.json")).read_text())
    assert report["episodes"] == 100
    assert abs(report["acc"] - recorded["acc"]) <= 0.02, (report["acc"], recorded["acc"])
