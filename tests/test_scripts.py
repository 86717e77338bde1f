"""Scripts run end to end at tiny sizes (benchmarks are never timed in tests)."""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_bench(tmp_path):
    import bench
    rows = bench.main(["--lengths", "8", "20", "--batch", "1", "--width", "8", "--heads", "2", "--mini-batch", "4",
                       "--repeats", "1", "--min-seconds", "0", "--fit-from", "8",
                       "--layers", *[name for name in bench.LAYERS if name != "ttt_mlp compiled"], "--models", "ttt_linear", "maml_10",
                       "--settings", "5w1s", "--episode-batch", "1", "--train-settings", "5w1s", "--train-steps", "1",
                       "--train-dataset", "synthetic", "--out", str(tmp_path)])
    layers = [name for name in bench.LAYERS if name != "ttt_mlp compiled"]  # one compiled layer is enough here
    assert [(r["layer"], r["T"]) for r in rows["layers"]] == [(name, T) for name in layers for T in (8, 20)]
    assert all(r["ms"] > 0 and r["peak_mb"] > 0 for r in rows["layers"])
    assert [(r["model"], r["adaptation_steps"]) for r in rows["episodes"]] == [("ttt_linear", None), ("maml_10", 10)]
    episodes = json.loads((tmp_path / "bench_episodes.json").read_text())
    assert set(episodes["ratios"]["maml_10 / ttt_linear"]) == {"5w1s"}
    assert [r["precision"] for r in rows["training"]] == ["32-true", "bf16-mixed"]
    assert all(r["train_episodes_per_s"] > 0 for r in rows["training"]) and (tmp_path / "bench_training.md").exists()
    result = json.loads((tmp_path / "bench_layers.json").read_text())
    assert set(result["summary"]) == set(layers) and {"ttt_linear primal/dual", "ttt_linear primal/compiled"} <= set(result["speedup over primal"])
    assert (tmp_path / "bench_layers.png").stat().st_size > 0 and (tmp_path / "bench_episodes.png").stat().st_size > 0


def test_bench_context_tiny(tmp_path, monkeypatch):
    """The context section trains each core with random label ids and scores the whole grid, then rescores."""
    import bench
    monkeypatch.chdir(tmp_path)
    overrides = ["data.dataset=synthetic", "data.train_batches_per_epoch=2", "data.val_episodes=4",
                 "data.meta_batch_size=2", "model.init_args.width=16", "model.init_args.encoder_channels=4",
                 "trainer.val_check_interval=null"]
    common = ["--sections", "context", "--context-cores", "ttt_linear", "lstm", "--context-shots", "1", "3",
              "--context-ways", "5", "8", "--context-queries", "2", "--context-episodes", "3",
              "--context-max-images", "40", "--context-override", *overrides, "--out", str(tmp_path / "results")]
    rows = bench.main([*common, "--context-budget-steps", "2"])["context"]
    grid = [(5, 1), (5, 3), (5, 5), (8, 5)]
    assert [(r["model"], r["ways"], r["shots"]) for r in rows] == [(m, *g) for m in ("ttt_linear", "lstm") for g in grid]
    assert all(r["episodes"] == 3 and 0 <= r["acc"] <= 1 and r["train_steps"] == 2 for r in rows)
    ckpt = torch.load(tmp_path / "checkpoints" / "context_ttt_linear" / "version_0" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["max_ways"] == 8 and ckpt["datamodule_hyper_parameters"]["label_space"] == 8
    again = bench.main([*common, "--context-from-checkpoints"])["context"]
    assert [r["acc"] for r in again] == [r["acc"] for r in rows]  # the same fixed episodes, the same weights
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / "results" / f"context_scaling{suffix}").stat().st_size > 0


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
    assert all(r["episodes"] == 6 and r["test_ms_per_episode"] > 0 and r["test_peak_mem_mb"] > 0 for r in rows)
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / "results" / f"compare_synthetic_5w1s{suffix}").stat().st_size > 0
    again = compare.main(["--setting", "5w1s", "--configs", str(ROOT / "configs" / "omniglot"), "--from-checkpoints",
                          "--models", "ttt_linear", "protonet", "--override", *overrides, "--out", str(tmp_path / "again")])
    assert [(r["model"], r["acc"], r["train_steps"]) for r in again] == [(r["model"], r["acc"], 2) for r in rows[::2][:2]]


def test_peak_tensor_memory_counts_live_tensors():
    import compare
    import torch

    def model(batch):  # 4 MB, then 8 MB more while the first is still held, then both freed
        a = torch.ones(2**20)
        b = torch.ones(2**21)
        return a.sum() + b.sum()

    peak = compare.peak_tensor_mb(model, {"support": torch.zeros(1)})
    assert 12 <= peak < 13


def test_bench_encoders_quick(tmp_path):
    import bench_encoders
    rows = bench_encoders.main(["--quick", "--datasets", "miniimagenet", "--settings", "5w1s", "--repeats", "1",
                                "--out", str(tmp_path)])
    assert [r["encoder"] for r in rows] == ["conv4-32", "conv4-64", "resnet12"]
    assert all(r["test_episodes_per_s"] > 0 and r["train_episodes_per_s"] > 0 and r["train_peak_mb"] > 0 for r in rows)
    assert "| miniimagenet 32px | 5w1s | resnet12 |" in (tmp_path / "bench_encoders.md").read_text()
