"""Scripts run end to end at tiny sizes (benchmarks are never timed in tests), each on its own; the measurement
helpers they share (ttt_meta.measure) measure what they say."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ttt_meta import measure

ROOT = Path(__file__).parents[1]
SCRIPTS = sorted(p for p in (ROOT / "scripts").iterdir() if p.is_file() and p.name != "setup.sh")


def script(name: str):
    """The module of scripts/<name>.py, loaded from its file (scripts/ is no package and not on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HELP_EVERY_SCRIPT = """
import runpy, sys
names = [p.rsplit("/", 1)[-1][:-3] for p in sys.argv[1:]]
failed = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    try:
        runpy.run_path(path, run_name="__main__")
        failed.append((path, "ran without exiting"))
    except SystemExit as stop:
        if stop.code not in (0, None):
            failed.append((path, stop.code))
failed += [(name, "imported as a module") for name in names if name in sys.modules]
print("FAILED", failed)
"""


def test_every_script_runs_help_on_its_own(tmp_path):
    """Each script parses --help and exits 0 from any folder, with scripts/ not on sys.path (one process)."""
    assert len(SCRIPTS) >= 8 and not any(p.name == "bench.py" for p in SCRIPTS)
    done = subprocess.run([sys.executable, "-c", HELP_EVERY_SCRIPT, *map(str, SCRIPTS)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FAILED []" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("usage:") == len(SCRIPTS)


def test_bench_layers(tmp_path):
    bench_layers = script("bench_layers")
    layers = [name for name in bench_layers.LAYERS if name != "ttt_mlp compiled"]  # one compiled layer is enough
    assert len(bench_layers.LAYERS) == 8 and "ttt_linear compiled" in layers and "attention" in layers
    rows = bench_layers.main(["--lengths", "8", "20", "--batch", "1", "--width", "8", "--heads", "2",
                              "--mini-batch", "4", "--repeats", "1", "--min-seconds", "0", "--fit-from", "8",
                              "--layers", *layers, "--out", str(tmp_path)])
    assert [(r["layer"], r["T"]) for r in rows] == [(name, T) for name in layers for T in (8, 20)]
    assert all(r["ms"] > 0 and r["peak_mb"] > 0 for r in rows)
    result = json.loads((tmp_path / "bench_layers.json").read_text())
    assert set(result["summary"]) == set(layers)
    assert {"ttt_linear primal/dual", "ttt_linear primal/compiled"} <= set(result["speedup over primal"])
    assert (tmp_path / "bench_layers.png").stat().st_size > 0 and "| T |" in result["markdown"]


def test_bench_episodes(tmp_path):
    bench_episodes = script("bench_episodes")
    rows = bench_episodes.main(["--models", "ttt_linear", "maml_10", "--settings", "5w1s", "--episode-batch", "1",
                                "--repeats", "1", "--min-seconds", "0", "--out", str(tmp_path)])
    assert [(r["model"], r["adaptation_steps"]) for r in rows] == [("ttt_linear", None), ("maml_10", 10)]
    assert all(r["ms_per_episode"] > 0 for r in rows)
    episodes = json.loads((tmp_path / "bench_episodes.json").read_text())
    assert set(episodes["ratios"]["maml_10 / ttt_linear"]) == {"5w1s"}
    assert "| **maml_10 / ttt_linear** |" in episodes["markdown"]
    assert (tmp_path / "bench_episodes.png").stat().st_size > 0


def test_bench_training(tmp_path):
    bench_training = script("bench_training")
    rows = bench_training.main(["--train-settings", "5w1s", "--train-steps", "1", "--train-dataset", "synthetic",
                                "--out", str(tmp_path)])
    assert [(r["model"], r["precision"]) for r in rows] == [("ttt_linear", "32-true"), ("ttt_linear", "bf16-mixed")]
    assert all(r["train_episodes_per_s"] > 0 for r in rows) and "| 5w1s |" in json.loads((tmp_path / "bench_training.json").read_text())["markdown"]
    assert json.loads((tmp_path / "bench_training.json").read_text())["rows"] == rows
    rows = bench_training.main(["--models", "ttt_linear", "protonet", "--train-settings", "20w1s", "--train-steps", "1",
                                "--train-precisions", "32-true", "--train-dataset", "synthetic", "--out", str(tmp_path),
                                "--name", "models"])
    assert [(r["model"], r["setting"], r["episodes_per_step"]) for r in rows] == [("ttt_linear", "20w1s", 8),
                                                                                  ("protonet", "20w1s", 8)]
    assert "| protonet | 20w1s |" in json.loads((tmp_path / "models.json").read_text())["markdown"]


def test_context_scaling_tiny(tmp_path, monkeypatch):
    """Trains each core with random label ids and scores the whole grid, then rescores from the checkpoints."""
    context_scaling = script("context_scaling")
    monkeypatch.chdir(tmp_path)
    overrides = ["data.dataset=synthetic", "data.train_batches_per_epoch=2", "data.val_episodes=4",
                 "data.meta_batch_size=2", "model.init_args.width=16", "model.init_args.encoder_channels=4",
                 "trainer.val_check_interval=null"]
    common = ["--cores", "ttt_linear", "lstm", "--shots", "1", "3", "--ways", "5", "8", "--queries", "2",
              "--episodes", "3", "--max-images", "40", "--override", *overrides, "--out", str(tmp_path / "results")]
    rows = context_scaling.main([*common, "--budget-steps", "2"])
    grid = [(5, 1), (5, 3), (5, 5), (8, 5)]
    assert [(r["model"], r["ways"], r["shots"]) for r in rows] == [(m, *g) for m in ("ttt_linear", "lstm") for g in grid]
    assert all(r["episodes"] == 3 and 0 <= r["acc"] <= 1 and r["train_steps"] == 2 for r in rows)
    ckpt = torch.load(tmp_path / "checkpoints" / "context_ttt_linear" / "version_0" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["max_ways"] == 8 and ckpt["datamodule_hyper_parameters"]["label_space"] == 8
    again = context_scaling.main([*common, "--from-checkpoints"])
    assert [r["acc"] for r in again] == [r["acc"] for r in rows]  # the same fixed episodes, the same weights
    for suffix in (".json", ".png"):
        assert (tmp_path / "results" / f"context_scaling{suffix}").stat().st_size > 0
    meta = json.loads((tmp_path / "results" / "context_scaling.json").read_text())["meta"]
    assert meta["budget"] == "trained earlier (--from-checkpoints)" and meta["label_space"] == 8


def test_compare_trains_for_a_time_budget_and_extends_exactly(tmp_path, monkeypatch):
    """Each model trains for the budget of training time, its curve and provenance land in the results file; a
    second call with a larger budget continues the same runs (same version folder, the curve extended), and a
    call with the same budget only rescores."""
    compare = script("compare")
    monkeypatch.chdir(tmp_path)
    scored_steps, score = [], compare.score

    def recording_score(model, dm, device, first):  # MAML's test steps as each row is scored
        scored_steps.append(getattr(model.hparams, "test_steps", None))
        return score(model, dm, device, first)

    monkeypatch.setattr(compare, "score", recording_score)
    overrides = ["data.dataset=synthetic", "data.val_episodes=4", "data.test_episodes=6", "data.eval_batch_size=3",
                 "data.meta_batch_size=2", "model.init_args.encoder_channels=4"]
    common = ["--setting", "5w1s", "--val-every", "1", "--override", *overrides, "--out", str(tmp_path / "results")]
    rows = compare.main([*common, "--minutes", "0.03", "--models", "ttt_linear", "maml"])
    assert [r["model"] for r in rows] == ["ttt_linear", "maml_1", "maml", "maml_10"]
    assert scored_steps == [None, 1, 3, 10]
    assert all(r["episodes"] == 6 and r["test_ms_per_episode"] > 0 and r["train_seconds"] >= 1.8 for r in rows)
    ttt = rows[0]
    assert ttt["curve"] and ttt["curve"][-1]["step"] == ttt["train_steps"] > 0 and len(ttt["training"]) == 1
    assert set(ttt["time_to"]) == {"95%", "97%", "98%"} and ttt["precision"] in ("bf16-mixed", "32-true")
    assert rows[1]["precision"] == "32-true"  # MAML: float32
    saved = json.loads((tmp_path / "results" / "compare_synthetic_5w1s.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["provenance"]["command"].startswith(
        "python scripts/compare.py --setting 5w1s")
    assert "| ttt_linear |" in saved["markdown"] and (tmp_path / "results" / "compare_synthetic_5w1s.png").exists()

    longer = compare.main([*common, "--minutes", "0.06", "--models", "ttt_linear"])[0]
    assert longer["train_seconds"] >= 3.6 and longer["train_steps"] > ttt["train_steps"]
    assert longer["curve"][:len(ttt["curve"])] == ttt["curve"] and len(longer["training"]) == 2
    assert [p.name for p in (tmp_path / "checkpoints" / "compare_omniglot_5w1s_ttt_linear").iterdir()] == ["version_0"]
    again = compare.main([*common, "--minutes", "0.06", "--models", "ttt_linear"])[0]
    assert (again["train_steps"], again["acc"], len(again["training"])) == (longer["train_steps"], longer["acc"], 2)


def test_compare_trains_for_a_step_budget_and_extends_exactly(tmp_path, monkeypatch):
    """--steps: every run stops at that many optimiser steps whatever its speed, a larger --steps continues it from
    there, the same --steps only rescores, MODEL=N gives one model its own (MODEL_VARIANT=N one run), and the caption
    names the budget."""
    compare = script("compare")
    monkeypatch.chdir(tmp_path)
    overrides = ["data.dataset=synthetic", "data.val_episodes=4", "data.test_episodes=4", "data.eval_batch_size=2",
                 "data.meta_batch_size=2", "model.init_args.encoder_channels=4"]
    base = ["--setting", "5w1s", "--val-every", "1000", "--override", *overrides, "--out", str(tmp_path / "results")]
    common = [*base, "--models", "ttt_linear", "--variants", "default", "mb2:model.init_args.mini_batch_size=2"]
    rows = compare.main([*common, "--steps", "3"])
    assert [(r["model"], r["train_steps"], r["curve"][-1]["step"]) for r in rows] == [("ttt_linear", 3, 3),
                                                                                      ("ttt_linear_mb2", 3, 3)]
    more = compare.main([*common, "--steps", "5"])
    assert [(r["train_steps"], len(r["training"]), r["training"][1]["from_step"]) for r in more] == [(5, 2, 3)] * 2
    again = compare.main([*common, "--steps", "5"])
    assert [(r["train_steps"], len(r["training"]), r["acc"]) for r in again] == [
        (r["train_steps"], 2, r["acc"]) for r in more]
    saved = json.loads((tmp_path / "results" / "compare_synthetic_5w1s.json").read_text())
    assert saved["meta"]["steps"] == {"": 5} and saved["meta"]["minutes"] is None
    assert saved["markdown"].startswith("synthetic 5w1s: 5 training steps per model (")
    # a model's own budget: protonet 4 steps, the TTT runs as they were
    for budgets in (["protonet=4"], ["5", "protonett=4"]):  # a model without a budget, a budget without a model
        with pytest.raises(SystemExit):
            compare.main([*base, "--models", "ttt_linear", "protonet", "--steps", *budgets])
    rows = compare.main([*base, "--models", "ttt_linear", "protonet", "--steps", "5", "protonet=4"])
    assert [(r["model"], r["train_steps"]) for r in rows] == [("ttt_linear", 5), ("protonet", 4)]
    saved = json.loads((tmp_path / "results" / "compare_synthetic_5w1s.json").read_text())
    assert saved["markdown"].startswith("synthetic 5w1s: training steps every other model 5, protonet 4 (")
    # a run's own budget comes before its model's: the variant mb2 continues to 6 steps, the default run stays at 5
    for budgets in (["5", "ttt_linear_bm2=6"], ["ttt_linear_mb2=6"]):  # a budget without a run, a run without a budget
        with pytest.raises(SystemExit):
            compare.main([*common, "--steps", *budgets])
    rows = compare.main([*common, "--steps", "5", "ttt_linear=4", "ttt_linear_mb2=6"])
    assert [(r["model"], r["train_steps"]) for r in rows] == [("ttt_linear", 5), ("ttt_linear_mb2", 6)]


def test_compare_scores_streams_by_instance(tmp_path, monkeypatch):
    """--setting online_5way: each row holds the test accuracy on the s-th instances (s = 1..S) with intervals,
    whose mean over s is the row's accuracy; the table shows them and the caption says streams."""
    compare = script("compare")
    monkeypatch.chdir(tmp_path)
    overrides = ["data.dataset=synthetic", "data.instances=3", "data.val_episodes=4", "data.test_episodes=6",
                 "data.eval_batch_size=3", "data.meta_batch_size=2", "model.init_args.encoder_channels=4"]
    rows = compare.main(["--setting", "online_5way", "--val-every", "1000", "--override", *overrides, "--out",
                         str(tmp_path / "results"), "--models", "ttt_linear", "protonet", "--steps", "2",
                         "--test-episodes", "protonet=4"])
    assert [r["episodes"] for r in rows] == [6, 4]
    for r in rows:
        assert [p["instance"] for p in r["by_instance"]] == [1, 2, 3]
        assert sum(p["acc"] for p in r["by_instance"]) / 3 == pytest.approx(r["acc"], abs=1e-6)
    saved = json.loads((tmp_path / "results" / "compare_synthetic_online_5way.json").read_text())
    assert "| 1st instance | 2nd instance | 3rd instance |" in saved["markdown"]
    assert "(first 4) |" in saved["markdown"].splitlines()[-1]
    assert "6 fixed test streams (3 instances per class" in saved["markdown"]
    assert saved["meta"]["protocol"] == "online"


def test_bench_encoders_quick(tmp_path):
    bench_encoders = script("bench_encoders")
    rows = bench_encoders.main(["--quick", "--datasets", "miniimagenet", "--settings", "5w1s", "--repeats", "1",
                                "--out", str(tmp_path)])
    assert [r["encoder"] for r in rows] == ["conv4-32", "conv4-64", "resnet12"]
    assert all(r["test_episodes_per_s"] > 0 and r["train_episodes_per_s"] > 0 and r["train_peak_mb"] > 0 for r in rows)
    assert "| miniimagenet 32px | 5w1s | resnet12 |" in json.loads((tmp_path / "bench_encoders.json").read_text())["markdown"]


def test_peak_tensor_memory_counts_live_tensors():
    def work():  # 4 MB, then 8 MB more while the first is still held, then both freed
        a = torch.ones(2**20)
        b = torch.ones(2**21)
        return a.sum() + b.sum()

    assert 12 <= measure.peak_tensor_mb(work) < 13

    def freed_first():  # 4 MB freed before the 8 MB: the peak is 8 MB
        torch.ones(2**20).sum()
        return torch.ones(2**21).sum()

    assert 8 <= measure.peak_tensor_mb(freed_first) < 9


def test_median_seconds_warms_up_repeats_and_takes_the_median(monkeypatch):
    clock = [0.0]  # a fake perf_counter that each call of the work moves on by its duration
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])

    def work_taking(*durations):
        left, calls = iter(durations), []

        def work():
            calls.append(1)
            clock[0] += next(left)

        return work, calls

    work, calls = work_taking(8.0, 8.0, 0.5, 0.125, 0.25)  # two warm-up calls, then three timed ones
    assert measure.median_seconds(work, repeats=3, warmup=2) == 0.25 and len(calls) == 5
    work, calls = work_taking(8.0, *[0.25] * 10)  # one warm-up, then runs until 1 s is timed
    assert measure.median_seconds(work, repeats=1, min_seconds=1.0) == 0.25 and len(calls) == 1 + 4
    work, calls = work_taking(*[0.0] * 20)  # ... or max_runs are done
    assert measure.median_seconds(work, repeats=2, min_seconds=1.0, max_runs=7) == 0.0 and len(calls) == 1 + 7


def test_markdown_table():
    assert measure.markdown_table(["a", "b c"], [[1, "x"], ["-", 2.5]]) == (
        "| a | b c |\n| --- | --- |\n| 1 | x |\n| - | 2.5 |")


def test_random_episodes_are_fixed_and_in_the_batch_format():
    batch = measure.random_episodes(2, ways=3, shots=2, queries=4, size=8, channels=1)
    assert batch["support"].shape == (2, 6, 1, 8, 8) and batch["query"].shape == (2, 12, 1, 8, 8)
    assert batch["support"].dtype == torch.uint8 and batch["ways"] == 3
    assert batch["support_labels"].tolist() == [[0, 0, 1, 1, 2, 2]] * 2 and batch["query_labels"].shape == (2, 12)
    again = measure.random_episodes(2, ways=3, shots=2, queries=4, size=8, channels=1)
    assert torch.equal(batch["support"], again["support"]) and torch.equal(batch["query"], again["query"])


def test_pyplot_draws_off_screen(tmp_path):
    plt = measure.pyplot()
    assert plt.get_backend().lower() == "agg"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    measure.save_figure(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0 and not plt.get_fignums()


def test_compare_scores_one_model_at_several_settings(tmp_path, monkeypatch):
    """--setting varied trains on episodes of varied sizes; --score-at scores the one model at each setting;
    --variants runs each model once per variant, with its overrides, under its own run and row name."""
    compare = script("compare")
    monkeypatch.chdir(tmp_path)
    overrides = ["data.dataset=synthetic", "data.val_episodes=4", "data.test_episodes=6", "data.eval_batch_size=3",
                 "data.meta_batch_size=2", "model.init_args.encoder_channels=4"]
    rows = compare.main(["--setting", "varied", "--minutes", "0.02", "--val-every", "1", "--models", "ttt_readout",
                         "--score-at", "5w1s", "20w5s", "--variants", "default", "c2:model.init_args.encoder_channels=2",
                         "--override", *overrides, "--out", str(tmp_path / "results")])
    assert [(r["model"], r["scored_at"], r["episodes"]) for r in rows] == [
        ("ttt_readout", "5w1s", 6), ("ttt_readout", "20w5s", 6), ("ttt_readout_c2", "5w1s", 6),
        ("ttt_readout_c2", "20w5s", 6)]
    assert rows[2]["overrides"][-1] == "model.init_args.encoder_channels=2" and rows[2]["params"] < rows[0]["params"]
    assert (tmp_path / "checkpoints" / "compare_omniglot_varied_ttt_readout_c2" / "version_0").is_dir()
    markdown = json.loads((tmp_path / "results" / "compare_synthetic_varied.json").read_text())["markdown"]
    assert "| scored at |" in markdown and "| ttt_readout | 20w5s |" in markdown


def test_head_gain_scores_the_served_model(omniglot_root, tmp_path):
    """head_gain.py's served term is the model the CLI serves: on the check set of a shipped readout and of a shipped
    sequence learner it scores the accuracy that checkpoint's report recorded, to within one query."""
    names = ["ttt_readout_5w5s", "ttt_linear_5w1s"]
    checks = [json.loads((ROOT / "checkpoints" / "omniglot" / f"{n}.json").read_text())["check"] for n in names]
    assert checks[0]["episodes"] == checks[1]["episodes"]
    rows = script("head_gain").main(["--names", *names, "--episodes", str(checks[0]["episodes"]),
                                     "--override", f"data.root={omniglot_root}", "--out", str(tmp_path),
                                     "--name", "gain"])
    assert [r["setting"] for r in rows] == ["5w5s", "5w1s"] and (tmp_path / "gain.json").is_file()
    for row, check in zip(rows, checks):
        assert abs(row["served"]["acc"] - check["acc"]) <= 1 / (check["episodes"] * check["queries"]) + 1e-9, row
    assert list(rows[0]["inner_loop"]) == ["readout"]
    assert list(rows[1]["inner_loop"]) == ["blocks.0.core", "blocks.1.core"]
    for row in rows:  # every layer's test-time training lowers its inner loss on the supports
        assert all(v["after"] < v["before"] for v in row["inner_loop"].values()), row["inner_loop"]


def test_first_drawing_terms_by_hand():
    """first_drawing.py on one 3-class stream whose classes first show at steps 0, 1, 3 (u = 3, 2, 1 labels
    unused): the ceiling is (1/3 + 1/2 + 1) / 3; a model that answers a seen label at every 1st drawing by a logit
    margin of 1.5 answers "unused" at none of them, and with delta 2 its 1st drawings go to unused labels (the
    lowest-numbered, by the tie) while its right answers at later drawings, by a margin of 3, stay."""
    first_drawing = script("first_drawing")
    labels = torch.tensor([[0, 1, 0, 2, 1, 2]])
    logits = torch.zeros(1, 6, 3)
    logits[0, torch.arange(6), labels[0]] = 3.0  # right at every step, margin 3 ...
    logits[0, 1] = torch.tensor([1.5, 0.0, 0.0])  # ... except the 1st drawings of classes 1 and 2: the seen label 0
    logits[0, 3] = torch.tensor([0.0, 1.5, 0.0])
    terms = first_drawing.first_drawing_terms(logits, labels, deltas=(0.0, 2.0))
    assert terms["ceiling"].item() == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    assert terms["unused"].item() == pytest.approx(1 / 3)  # step 0: every label is unused
    assert terms[0.0]["first"].item() == pytest.approx(1 / 3) and terms[0.0]["second"].item() == 1.0
    # delta 2: step 1 -> labels 1, 2 tie at 2 above 1.5, argmax 1 (right); step 3 -> label 2 at 2 above 1.5 (right)
    assert terms[2.0]["first"].item() == 1.0 and terms[2.0]["second"].item() == 1.0
    assert terms[2.0]["overall"].item() == 1.0 and terms[0.0]["overall"].item() == pytest.approx(4 / 6)


def test_first_drawing_runs_on_a_stream_checkpoint(tmp_path):
    """first_drawing.py end to end on synthetic streams with an untrained tiny sequence learner's checkpoint: one row
    per --run with the 5-class ceiling and every delta, and a results file with the table."""
    from ttt_meta.runs import build
    overrides = ["data.dataset=synthetic", "data.instances=3", "model.init_args.encoder_channels=4",
                 "data.eval_batch_size=4"]
    config = ROOT / "configs" / "omniglot" / "ttt_linear_online_5way.yaml"
    model = build(config, overrides).model
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, tmp_path / "m.ckpt")
    rows = script("first_drawing").main(["--run", str(config), str(tmp_path / "m.ckpt"), "--episodes", "8",
                                         "--override", *overrides, "--out", str(tmp_path), "--name", "fd"])
    assert len(rows) == 1 and rows[0]["streams"] == 8 and rows[0]["ways"] == 5
    assert rows[0]["ceiling"] == pytest.approx((1 / 5 + 1 / 4 + 1 / 3 + 1 / 2 + 1) / 5)
    assert [d["delta"] for d in rows[0]["by_delta"]] == list(script("first_drawing").DELTAS)
    assert "| delta |" in json.loads((tmp_path / "fd.json").read_text())["markdown"]
