"""Learning curves and the equal-time comparison at one few-shot setting.

    TTT_META_THREADS=1 taskset -c 1 python scripts/compare.py --setting 5w1s --minutes 15
    TTT_META_THREADS=1 taskset -c 1 python scripts/compare.py --setting 5w1s --minutes 30    # extends every run
    python scripts/compare.py --setting 5w5s --minutes 5 --models ttt_linear --name ablation_omniglot_5w5s \\
        --variants default mb32:model.init_args.mini_batch_size=32

Every model (``configs/<dataset>/<model>_<setting>.yaml``, plus ``--override key=value``) trains as run
``compare_<dataset>_<setting>_<model>[_<variant>]`` for the same training time, ``--minutes`` of the wall time of its
training steps (``ttt_meta.runs.TrainingClock``: no validation or checkpoint writes counted), with the learning
rate constant after its warm-up, so that a later call with more minutes continues each run exactly from its
``last.ckpt`` (a run that already has the time is only rescored). Each model trains at its fastest precision on
this machine: bf16 autocast where the hardware has bf16 arithmetic (an AVX512-BF16 or AMX CPU, a GPU), except
MAML and Meta-SGD, whose per-episode adaptation is slower in bf16 (float32). Validation on the fixed
validation episodes every ``--val-every`` seconds gives the learning curve (accuracy against training time and
episodes), and the times to 95, 97 and 98% validation accuracy. The checkpoint with the best validation
accuracy is then scored on the fixed test episodes (accuracy +- 95% interval) and its test-time cost per
episode is timed, all models in this one process, in batches of ``eval_batch_size`` episodes; MAML is scored at
1, its configured 3, and 10 adaptation steps (rows ``maml_1``, ``maml``, ``maml_10``). ``--score-at 5w1s 20w5s ...``
scores each model at those settings' fixed test episodes instead (one model for every setting: ``--setting
varied``, trained on episodes of 5 to 20 ways and 1 to 5 shots).

Writes results/<name>.json (default name ``compare_<dataset>_<setting>``: rows, curves, the Markdown table the
README shows, provenance) and <name>.png (validation accuracy against log training time, and against training
episodes), after each model, so that an interrupted call keeps the models it finished.

``--test-episodes MODEL=N`` scores that model on the first N fixed test episodes only (the same N for every
model that takes it; its rows record how many): for MAML on a stream, whose test cost grows with the square of
its length.

``--steps N`` instead of ``--minutes`` trains every run for N optimiser steps (extended alike by a later call with
more), ``--steps N protonet=M`` gives model protonet M steps (all its variants) and ``protonet_w20=K`` its variant
w20 K steps (a run's own budget first, then its model's, then N): equal minutes hand one run more steps than
another as the machine's speed drifts (up to 10% between two runs side by side on this VM, and 1.8x
between sessions), so a budget of steps is the robust one: equal steps for variants whose steps cost the same, or
a time budget converted to each model's steps by step costs measured in one process (``bench_training.py``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import re
from pathlib import Path

import torch

from ttt_meta.cli import set_threads
from ttt_meta.learners import MAMLLearner
from ttt_meta.measure import (THRESHOLDS, comparison_budget, comparison_table, provenance, pyplot, save_figure,
                              write_results)
from ttt_meta.nn.cores import CORES
from ttt_meta.runs import build, score, train_for, training_precision

ROOT = Path(__file__).resolve().parents[1]
MODELS = [*CORES, "ttt_readout", "lstm_large", "protonet", "maml", "metasgd"]
MAML_STEPS = (1, 10)  # scored besides the configured test steps


def time_to(curve: list[dict], threshold: float) -> float | None:
    """Training seconds of the first validation at or above `threshold`, None if none is."""
    return next((p["seconds"] for p in curve if p["val_acc"] >= threshold), None)


def release_memory() -> None:
    """Free the last model's run (its trainer, model and data module hold each other) and hand the freed heap back
    to the OS (glibc's malloc_trim): a 20-way test batch peaks at ~5 GB of tensors, and without this the freed
    pages of several models' scoring accumulate in one process (a 20w5s call of five models was killed for memory)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def model_steps(text: str) -> tuple[str, int]:
    """``[MODEL=]N`` -> (MODEL or "" for every model, N)."""
    model, _, steps = text.rpartition("=")
    return model, int(steps)


def variant(text: str) -> tuple[str, list[str]]:
    """``NAME[:key=value[,key=value...]]`` -> (NAME, overrides); NAME "default" means no suffix."""
    name, _, overrides = text.partition(":")
    return ("" if name == "default" else name), [o for o in overrides.split(",") if o]


def run_label(name: str, tag: str) -> str:
    """The row and run name of model `name` in variant `tag`: ``<model>[_<variant>]``."""
    return f"{name}_{tag}" if tag else name


def run_budget(steps: dict[str, int], name: str, label: str) -> int | None:
    """A run's optimiser steps from ``--steps``: its own (RUN=N), else its model's (MODEL=N), else every model's (N)."""
    return steps.get(label, steps.get(name, steps.get("")))


def run_model(name: str, tag: str, variant_overrides: list[str], args, device: torch.device) -> tuple[list[dict], dict]:
    """The rows of model `name` in variant `tag` (trained, continued or reloaded for the budget, then scored) and
    its data module's settings."""
    config = args.configs / f"{name}_{args.setting}.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no config {config} for model {name!r}; write one or drop it from --models")
    label = run_label(name, tag)
    precision = training_precision(name)
    given = [*args.override, *variant_overrides]
    overrides = ["model.init_args.lr_schedule=constant", f"trainer.precision={precision}", *given]
    seconds = None if args.minutes is None else 60 * args.minutes
    budget_steps = None if args.steps is None else run_budget(args.steps, name, label)
    cli, clock, best_step = train_for(config, f"compare_{args.configs.name}_{args.setting}_{label}", overrides,
                                      seconds, args.val_every, budget_steps)
    model, data = cli.model, cli.datamodule.hparams
    first = dict(args.test_episodes).get(name)  # None: every fixed test episode
    steps = clock.curve[-1]["step"] if clock.curve else 0
    common = {"run": label, "precision": precision, "overrides": given, "train_seconds": clock.seconds,
              "train_steps": steps, "train_episodes": steps * data.meta_batch_size,
              "best_checkpoint_step": best_step,
              "best_val_acc": max((p["val_acc"] for p in clock.curve), default=math.nan),
              "time_to": {f"{t:.0%}": time_to(clock.curve, t) for t in THRESHOLDS},
              "params": sum(p.numel() for p in model.parameters()), "curve": clock.curve,
              "training": clock.segments, "meta_batch_size": data.meta_batch_size}
    if args.score_at:  # one model scored at several settings: the fixed test episodes of each
        rows = []
        for setting in args.score_at:
            ways, shots = (int(x) for x in re.fullmatch(r"(\d+)w(\d+)s", setting).groups())
            dm = build(config, [*overrides, f"data.eval_ways={ways}", f"data.eval_shots={shots}"]).datamodule
            rows.append({"model": label, "scored_at": setting, **score(model, dm, device, first), **common})
        return rows, data
    if isinstance(model, MAMLLearner) and name == "maml":
        configured, rows = model.hparams.test_steps, []
        for k in sorted({*MAML_STEPS, configured}):
            model.hparams.test_steps = k
            rows.append({"model": label if k == configured else f"{label}_{k}", "adaptation_steps": k,
                         **score(model, cli.datamodule, device, first), **common})
        return rows, data
    return [{"model": label, **score(model, cli.datamodule, device, first), **common}], data


def figure(rows: list[dict], meta: dict, path: Path) -> None:
    """Validation accuracy against log training seconds and against training episodes, one line per run; for
    streams also the test accuracy against the instance number, with its 95% intervals."""
    streams = all("by_instance" in r for r in rows)
    fig, axes = pyplot().subplots(1, 3 if streams else 2, figsize=(18 if streams else 12, 4.5))
    by_time, by_episodes = axes[:2]
    if streams:
        for r in rows:
            points = r["by_instance"]
            axes[2].errorbar([p["instance"] for p in points], [100 * p["acc"] for p in points],
                             yerr=[100 * p["ci95"] for p in points], marker=".", capsize=2, label=r["model"])
        axes[2].set_xlabel("instance of the class in the stream")
        axes[2].set_ylabel("test accuracy %")
        axes[2].grid(True, alpha=0.3)
        axes[2].legend(fontsize=8)
    floor = 100
    for name, r in {r["run"]: r for r in rows}.items():
        if not r["curve"]:
            continue
        acc = [100 * p["val_acc"] for p in r["curve"]]
        floor = min(floor, min(acc))
        by_time.plot([p["seconds"] for p in r["curve"]], acc, marker=".", label=name)
        by_episodes.plot([p["step"] * r["meta_batch_size"] for p in r["curve"]], acc, marker=".", label=name)
    by_time.set_xscale("log")
    by_time.set_xlabel("training seconds (log)")
    by_episodes.set_xlabel("training episodes")
    for ax in (by_time, by_episodes):
        ax.set_ylabel("validation accuracy %")
        ax.set_ylim(max(floor - 2, 0), 100)
        ax.grid(True, which="both", alpha=0.3)
        for t in THRESHOLDS:
            ax.axhline(100 * t, color="grey", lw=0.5, ls=":")
    by_time.legend(fontsize=8)
    fig.suptitle(f"{meta['dataset']} {meta['setting']}: {comparison_budget(meta)}")
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="5w1s", help="5w1s, 5w5s, 20w1s, 20w5s, or online_5way, online_15way "
                   "(streams: the test scores accuracy by instance too)")
    p.add_argument("--configs", type=Path, default=ROOT / "configs" / "omniglot")
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    budget_given = p.add_mutually_exclusive_group(required=True)
    budget_given.add_argument("--minutes", type=float, help="training time per model (training steps only)")
    budget_given.add_argument("--steps", nargs="+", type=model_steps, metavar="[MODEL=]N",
                              help="optimiser steps per model instead of --minutes: N for every model, MODEL=N for "
                                   "one, MODEL_VARIANT=N for one run")
    p.add_argument("--val-every", type=float, default=60.0, help="seconds of wall time between validations")
    p.add_argument("--override", nargs="*", default=[], help="config overrides key=value for every model")
    p.add_argument("--score-at", nargs="*", default=[], metavar="NwKs",
                   help="score each model at these settings (e.g. 5w1s 20w5s) instead of its own: for a model "
                        "trained on episodes of varied sizes")
    p.add_argument("--variants", nargs="+", default=[variant("default")], type=variant, metavar="NAME[:key=value,...]",
                   help="variants of every model, each with its own overrides, run and row name (<model>_<NAME>); "
                        "'default' (no overrides, no suffix) by default")
    p.add_argument("--test-episodes", nargs="*", default=[], type=model_steps, metavar="MODEL=N",
                   help="score MODEL on the first N fixed test episodes only (e.g. maml=100)")
    p.add_argument("--name", help="results file name (default compare_<dataset>_<setting>)")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    if args.steps is not None:  # every run has a budget, and every budget a run: checked before any training
        args.steps = dict(args.steps)
        runs = {run_label(m, tag): m for m in args.models for tag, _ in args.variants}
        if unbudgeted := [label for label, m in runs.items() if run_budget(args.steps, m, label) is None]:
            p.error(f"--steps gives no budget for {', '.join(unbudgeted)}: add MODEL=N (or RUN=N) for each, or a "
                    f"bare N")
        if strays := sorted(set(args.steps) - {"", *args.models, *runs}):
            p.error(f"--steps names {', '.join(strays)}, not among --models {' '.join(args.models)} or their runs")
    if strays := sorted({m for m, _ in args.test_episodes} - set(args.models)):
        p.error(f"--test-episodes names {', '.join(strays) or 'no model'}, not among --models {' '.join(args.models)}: "
                f"give MODEL=N for a model it trains")
    set_threads()
    prov = provenance(__file__, argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, meta = [], None
    for model_name, (tag, variant_overrides) in ((m, v) for m in args.models for v in args.variants):
        model_rows, dm = run_model(model_name, tag, variant_overrides, args, device)
        release_memory()
        rows += model_rows
        if meta is None:  # the data settings of a setting are the same for every model
            meta = {"dataset": dm.dataset, "setting": args.setting, "minutes": args.minutes, "steps": args.steps,
                    "val_every_seconds": args.val_every, "test_episodes": dm.test_episodes,
                    "queries": dm.eval_queries or dm.queries, "test_seed": dm.test_seed, "val_seed": dm.val_seed,
                    "protocol": dm.protocol, "instances": dm.instances,
                    "val_episodes": dm.val_episodes, "eval_batch_size": dm.eval_batch_size}
        name = args.name or f"compare_{meta['dataset']}_{args.setting}"
        markdown = comparison_table(rows, meta, prov)
        write_results(args.out, name, {"meta": meta, "rows": rows}, markdown, prov)
        figure(rows, meta, args.out / f"{name}.png")
    print(markdown)
    return rows


if __name__ == "__main__":
    main()
