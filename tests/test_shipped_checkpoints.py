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


def test_predict_real_omniglot_files(omniglot_root, tmp_path):
    """predict on the raw PNG files (dark strokes on white, 105 px) of 5 test characters: 1 shot, 5 queries each."""
    import shutil

    names = json.loads((ROOT / "ttt_meta" / "data" / "omniglot_split.json").read_text())["test"][:5]
    base = omniglot_root / "omniglot" / "omniglot-py"
    for name in names:
        folder = next(base.glob(f"images_*/{name}"))
        files = sorted(folder.glob("*.png"))
        label = name.replace("/", "_")
        for split, chosen in (("support", files[:1]), ("query", files[1:6])):
            (tmp_path / split / label).mkdir(parents=True)
            for f in chosen:
                shutil.copy(f, tmp_path / split / label / f.name)
    result = main(["predict", "--ckpt_path", str(ROOT / "checkpoints" / "omniglot" / "ttt_linear_5w1s.ckpt"),
                   "--support", str(tmp_path / "support"), "--query", str(tmp_path / "query"),
                   "--out", str(tmp_path / "p.csv")])
    assert result["queries"] == 25 and result["acc"] >= 0.8, result
