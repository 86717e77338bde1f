"""Context scaling of accuracy: does a model keep gaining from more context?

    python scripts/context_scaling.py --episodes 100 --budget-steps 1000     # trains 3 models
    python scripts/context_scaling.py --episodes 100 --from-checkpoints     # re-score what that run trained

Each sequence model (TTT-Linear, LSTM, attention by default) is meta-trained once at 5-way 5-shot from
``configs/omniglot/<core>_5w5s.yaml`` with ``max_ways`` and ``data.label_space`` raised to the largest N of the
grid and a tied head (training episodes use random label ids, and queries are scored against the label
embeddings, so the model serves any N up to max_ways: ``ttt_meta.nn.model``), then scored without any further
training on the fixed test episodes (seeded by ``data.test_seed``: the same episodes for every model) of

    5-way at 1, 2, 5, 10, 15 shots      and      5, 20, 50, 100, 200 ways at 5 shots,

with --queries queries per class (5: Omniglot has 20 drawings per class, 15 shots leave 5). A run trains in its
own checkpoint folder ``checkpoints/context_<core>/version_N``; --from-checkpoints scores what an earlier run
left there. Writes results/context_scaling.{json,md,png}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ttt_meta.cli import set_threads
from ttt_meta.data.datamodule import FixedEpisodes
from ttt_meta.data.episodes import EpisodeSpec
from ttt_meta.measure import (confidence_interval, hardware_text, markdown_table, printed_rows, provenance, pyplot,
                              save_figure, timed_call, write_results)
from ttt_meta.nn.cores import CORES
from ttt_meta.runs import Budget, add_budget_arguments, train

ROOT = Path(__file__).resolve().parents[1]


def settings(shots: list[int], ways: list[int]) -> list[tuple[int, int]]:
    """(ways, shots) pairs of the grid: 5-way at each shot count, then each way count at 5 shots."""
    grid = [(5, k) for k in shots] + [(n, 5) for n in ways]
    return list(dict.fromkeys(grid))


def score(model, test, ways: int, shots: int, queries: int, episodes: int, seed: int, max_images: int) -> dict:
    """Accuracy with 95% CI over `episodes` fixed N-way K-shot episodes of the `test` split, and the seconds the
    episodes took to draw and score."""
    fixed = FixedEpisodes(test, EpisodeSpec(ways, shots, queries), episodes, seed)
    per_batch = max(1, max_images // (ways * (shots + queries)))

    def scored() -> torch.Tensor:
        accs = []
        with torch.inference_mode():
            for start in range(0, episodes, per_batch):
                batch = fixed.__getitems__(list(range(start, min(episodes, start + per_batch))))
                accs.append(model.loss_and_accuracy(batch)[1])  # per-episode accuracy, as the learner's test step
        return torch.cat(accs)

    acc, seconds = timed_call(scored)
    mean, ci = confidence_interval(acc)
    return {"ways": ways, "shots": shots, "acc": mean, "ci95": ci, "episodes": episodes, "seconds": seconds}


def run(args, prov: dict) -> list[dict]:
    grid = settings(args.shots, args.ways)
    space = max(n for n, _ in grid)
    overrides = [f"model.init_args.max_ways={space}", "model.init_args.tied_head=true", f"data.label_space={space}",
                 *args.override]
    budget = Budget.from_args(args)
    rows = []
    for core in args.cores:
        cli, trained = train(args.configs / f"{core}_5w5s.yaml", f"context_{core}", overrides, budget)
        dm, model = cli.datamodule, cli.model.eval()
        dm.setup("test")
        rows += printed_rows({"model": core, "train_steps": trained["train_steps"],
                              **score(model, dm.splits["test"], ways, shots, args.queries, args.episodes,
                                      dm.hparams.test_seed, args.max_images)} for ways, shots in grid)
    meta = {"dataset": dm.hparams.dataset, "label_space": space, "queries": args.queries,
            "episodes": args.episodes, "test_seed": dm.hparams.test_seed, "budget": budget.describe()}
    print(write(rows, meta, prov, args.out))
    return rows


def write(rows: list[dict], meta: dict, prov: dict, out: Path) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    at = {(r["model"], r["ways"], r["shots"]): r for r in rows}
    steps = {r["model"]: r["train_steps"] for r in rows}
    head = (f"Test accuracy % (95% CI) of models meta-trained at 5-way 5-shot ({meta['budget']} each, label ids "
            f"from [0, {meta['label_space']})), scored on {meta['episodes']} fixed {meta['dataset']} test episodes "
            f"per setting (test_seed {meta['test_seed']}) with {meta['queries']} queries per class; "
            f"{hardware_text(prov)}. Training steps: "
            + ", ".join(f"{m} {s}" for m, s in steps.items()) + ".")
    lines = [head]
    for title, key, letter, fixed in (("5-way, K shots", "shots", "K", 5), ("N-way, 5 shots", "ways", "N", 5)):
        cols = sorted({r[key] for r in rows if r["ways" if key == "shots" else "shots"] == fixed})
        cells = [[m, *(f"{100 * r['acc']:.1f} +- {100 * r['ci95']:.1f}" if r else "-"
                       for r in (at.get((m, fixed, c) if key == "shots" else (m, c, fixed)) for c in cols))]
                 for m in models]
        lines += ["", f"**{title}**", "", markdown_table(["model", *(f"{letter}={c}" for c in cols)], cells)]
    text = "\n".join(lines) + "\n"
    write_results(out, "context_scaling", {"meta": meta, "rows": rows}, text, prov)
    _plot(rows, models, out / "context_scaling.png")
    return text


def _plot(rows, models, path: Path) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.2))
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
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", nargs="+", default=["ttt_linear", "lstm", "attention"], choices=list(CORES))
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5, 10, 15])
    parser.add_argument("--ways", type=int, nargs="+", default=[5, 20, 50, 100, 200])
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--max-images", type=int, default=4000, help="images per evaluation batch, at most")
    add_budget_arguments(parser, default_seconds=900.0, run_names="context_<core>")
    parser.add_argument("--configs", type=Path, default=ROOT / "configs" / "omniglot")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    set_threads()
    return run(args, provenance(__file__, argv))


if __name__ == "__main__":
    main()
