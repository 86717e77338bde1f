"""Each checkpoint shipped in checkpoints/omniglot/ scores, through the CLI, the accuracy its report recorded on the
check set of fixed test episodes, to within one query; predict reads real Omniglot files with one."""

import json
from pathlib import Path

import pytest

from ttt_meta.cli import main

ROOT = Path(__file__).parents[1]
SHIPPED = sorted((ROOT / "checkpoints" / "omniglot").glob("*.ckpt"))


@pytest.mark.parametrize("ckpt", SHIPPED, ids=[c.stem for c in SHIPPED])
def test_shipped_checkpoint(ckpt, omniglot_root, tmp_path, monkeypatch):
    report = json.loads(ckpt.with_suffix(".json").read_text())
    check = report["check"]
    monkeypatch.chdir(tmp_path)
    main(["test", "--config", str(ROOT / report["config"]), *(f"--{o}" for o in report["overrides"]),
          "--ckpt_path", str(ckpt), f"--data.root={omniglot_root}", f"--data.test_episodes={check['episodes']}",
          "--trainer.enable_progress_bar=false"])
    scored = json.loads(next(tmp_path.glob("logs/*/version_*/test_results.json")).read_text())
    assert scored["episodes"] == check["episodes"]
    one_query = 1 / (check["episodes"] * check["queries"])  # one query more or less right moves the mean this much
    assert abs(scored["acc"] - check["acc"]) <= one_query + 1e-9, (scored["acc"], check["acc"])


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

