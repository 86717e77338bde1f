"""Context scaling of accuracy (the ``context`` section of bench.py): does a model keep gaining from more context?

Each sequence model (TTT-Linear, LSTM, attention by default) is meta-trained once at 5-way 5-shot from
``configs/omniglot/<core>_5w5s.yaml`` with ``max_ways`` and ``data.label_space`` raised to the largest N of the
grid and a tied head (training episodes use random label ids, and queries are scored against the label
embeddings, so the model serves any N up to max_ways: ``ttt_meta.nn.model``), then scored without any further
training on the fixed test episodes (seeded by ``data.test_seed``: the same episodes for every model) of

    5-way at 1, 2, 5, 10, 15 shots      and      5, 20, 50, 100, 200 ways at 5 shots,

with --context-queries queries per class (5: Omniglot has 20 drawings per class, 15 shots leave 5). A run
trains in its own checkpoint folder ``checkpoints/context_<core>/version_N``; --context-from-checkpoints scores what an
earlier run left there. Writes results/context_scaling.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from compare import train

from ttt_meta.data.datamodule import FixedEpisodes
from ttt_meta.data.episodes import EpisodeSpec
from ttt_meta.measure import confidence_interval


def settings(shots: list[int], ways: list[int]) -> list[tuple[int, int]]:
    """(ways, shots) pairs of the grid: 5-way at each shot count, then each way count at 5 shots."""
    grid = [(5, k) for k in shots] + [(n, 5) for n in ways]
    return list(dict.fromkeys(grid))


def score(model, test, ways: int, shots: int, queries: int, episodes: int, seed: int, max_images: int) -> dict:
    """Accuracy with 95% CI over `episodes` fixed N-way K-shot episodes of the `test` split."""
    fixed = FixedEpisodes(test, EpisodeSpec(ways, shots, queries), episodes, seed)
    per_batch = max(1, max_images // (ways * (shots + queries)))
    accs, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for start in range(0, episodes, per_batch):
            batch = fixed.__getitems__(list(range(start, min(episodes, start + per_batch))))
            accs.append(model.loss_and_accuracy(batch)[1])  # per-episode accuracy, as the learner's test step
    mean, ci = confidence_interval(torch.cat(accs))
    return {"ways": ways, "shots": shots, "acc": mean, "ci95": ci, "episodes": episodes,
            "seconds": time.perf_counter() - t0}


def run(args, meta: dict) -> list[dict]:
    grid = settings(args.context_shots, args.context_ways)
    space = max(n for n, _ in grid)
    overrides = [f"model.init_args.max_ways={space}", "model.init_args.tied_head=true", f"data.label_space={space}",
                 *args.context_override]
    train_args = argparse.Namespace(from_checkpoints=args.context_from_checkpoints, override=overrides,
                                    budget_seconds=args.context_budget_seconds, budget_steps=args.context_budget_steps)
    rows = []
    for core in args.context_cores:
        cli, trained = train(args.configs / f"{core}_5w5s.yaml", f"context_{core}", train_args)
        dm, model = cli.datamodule, cli.model.eval()
        dm.setup("test")
        for ways, shots in grid:
            rows.append({"model": core, "train_steps": trained["train_steps"],
                         **score(model, dm.splits["test"], ways, shots, args.context_queries, args.context_episodes,
                                 dm.hparams.test_seed, args.context_max_images)})
            print(json.dumps(rows[-1]), flush=True)
    meta = {**meta, "dataset": dm.hparams.dataset, "label_space": space, "queries": args.context_queries,
            "episodes": args.context_episodes, "test_seed": dm.hparams.test_seed,
            "budget": ("trained earlier (--context-from-checkpoints)" if args.context_from_checkpoints else
                       f"{args.context_budget_steps} steps" if args.context_budget_steps else
                       f"{args.context_budget_seconds:.0f} s")}
    print(write(rows, meta, args.out))
    return rows


def write(rows: list[dict], meta: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "context_scaling.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    models = list(dict.fromkeys(r["model"] for r in rows))
    at = {(r["model"], r["ways"], r["shots"]): r for r in rows}
    steps = {r["model"]: r["train_steps"] for r in rows}
    head = (f"Test accuracy % (95% CI) of models meta-trained at 5-way 5-shot ({meta['budget']} each, label ids "
            f"from [0, {meta['label_space']})), scored on {meta['episodes']} fixed {meta['dataset']} test episodes "
            f"per setting (test_seed {meta['test_seed']}) with {meta['queries']} queries per class; "
            f"{meta['threads']} threads, {meta['machine']}, torch {meta['torch']}. Training steps: "
            + ", ".join(f"{m} {s}" for m, s in steps.items()) + ".")
    lines = [head]
    for title, key, letter, fixed in (("5-way, K shots", "shots", "K", 5), ("N-way, 5 shots", "ways", "N", 5)):
        cols = sorted({r[key] for r in rows if r["ways" if key == "shots" else "shots"] == fixed})
        lines += ["", f"**{title}**", "", "| model | " + " | ".join(f"{letter}={c}" for c in cols) + " |",
                  "| --- |" + " --- |" * len(cols)]
        for m in models:
            cells = [at.get((m, fixed, c) if key == "shots" else (m, c, fixed)) for c in cols]
            lines.append(f"| {m} | " + " | ".join(f"{100 * r['acc']:.1f} +- {100 * r['ci95']:.1f}" if r else "-"
                                                  for r in cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "context_scaling.md").write_text(text)
    _plot(rows, models, out / "context_scaling.png")
    return text


def _plot(rows, models, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, other in ((axes[0], "shots", "ways"), (axes[1], "ways", "shots")):
        for m in models:
            pts = sorted((r[key], r["acc"], r["ci95"]) for r in rows if r["model"] == m and r[other] == 5)
            ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts], marker="o",
                        capsize=3, label=m)
        ax.set_xscale("log")
        ax.set_xlabel(f"{key} at test (5 {other})")
        ax.set_ylabel("test accuracy %")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("meta-trained at 5-way 5-shot, evaluated at other context sizes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
