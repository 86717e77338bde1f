"""Scripts run end to end at tiny sizes (benchmarks are never timed in tests)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_bench_ttt(tmp_path):
    import bench_ttt
    out = tmp_path / "bench.json"
    bench_ttt.main(["--lengths", "8", "20", "--batch", "1", "--heads", "2", "--head-dim", "4", "--mini-batch", "4",
                    "--kinds", "linear", "mlp", "--repeats", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kind"], r["T"]) for r in rows] == [("linear", 8), ("linear", 20), ("mlp", 8), ("mlp", 20)]
    assert all(r["primal_ms"] > 0 and r["dual_ms"] > 0 for r in rows)


def test_compare_tiny(tmp_path, monkeypatch):
    import compare
    monkeypatch.chdir(tmp_path)
    overrides = ["data.dataset=synthetic", "data.train_batches_per_epoch=2", "data.val_episodes=4",
                 "data.test_episodes=6", "data.eval_batch_size=3", "data.meta_batch_size=2",
                 "model.init_args.encoder_channels=4", "trainer.val_check_interval=null"]
    rows = compare.main(["--setting", "5w1s", "--configs", str(ROOT / "configs" / "omniglot"), "--budget-steps", "2",
                         "--models", "ttt_linear", "lstm", "protonet", "maml", "--override", *overrides,
                         "--out", str(tmp_path / "results")])
    assert [r["model"] for r in rows] == ["ttt_linear", "lstm", "protonet", "maml_1", "maml_5", "maml_10"]
    assert all(r["episodes"] == 6 and r["test_ms_per_episode"] > 0 for r in rows)
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / "results" / f"compare_synthetic_5w1s{suffix}").stat().st_size > 0
