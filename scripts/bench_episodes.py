"""Test-time cost per episode of every model of the comparison, at few-shot and many-shot settings.

    python scripts/bench_episodes.py                          # results/bench_episodes.{json,md,png}
    python scripts/bench_episodes.py --models ttt_linear maml_10 --settings 5w1s --repeats 1 --out /tmp/b
    python scripts/bench_episodes.py --device cuda --name gpu_bench_episodes    # on a GPU (scripts/gpu_check.py)

Test-time milliseconds per episode of each model as its Omniglot config builds it (weights untrained: the cost
does not depend on them), on random 28x28 episodes with 15 queries per class: 5-way 1-shot, 5-way 5-shot,
20-way 5-shot, and many-shot 20-way 50-shot and 100-way 10-shot (1,000 support tokens; models built from the
20w5s configs with max_ways / ways raised). MAML adapts with 1 and 10 steps. Median of repeated batches of
--episode-batch episodes (one for many-shot) under inference_mode, after a warm-up.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ttt_meta.cli import set_threads
from ttt_meta.learners import MAMLLearner
from ttt_meta.measure import (add_timing_arguments, evaluate, hardware_text, markdown_table, median_seconds,
                              printed_rows, provenance, pyplot, random_episodes, save_figure, write_results)
from ttt_meta.nn.cores import CORES
from ttt_meta.runs import build

ROOT = Path(__file__).resolve().parents[1]
QUERIES = 15
# episode settings: name -> (ways, shots, config setting the model is built from, many-shot: 1 episode per batch)
SETTINGS = {"5w1s": (5, 1, "5w1s", False), "5w5s": (5, 5, "5w5s", False), "20w5s": (20, 5, "20w5s", False),
            "20w50s": (20, 50, "20w5s", True), "100w10s": (100, 10, "20w5s", True)}
# model -> (config name, MAML adaptation steps at test or None: the config's)
MODELS = {**{core: (core, None) for core in CORES}, "protonet": ("protonet", None), "maml_1": ("maml", 1),
          "maml_10": ("maml", 10), "metasgd": ("metasgd", None)}


def measure_episode(model_name: str, setting: str, args) -> dict:
    """Milliseconds per episode of model `model_name` at episode setting `setting`."""
    config, steps = MODELS[model_name]
    ways, shots, base, many = SETTINGS[setting]
    n = 1 if many else args.episode_batch
    raise_ways = ([f"model.init_args.ways={ways}"] if config in ("maml", "metasgd") else
                  [] if config == "protonet" else [f"model.init_args.max_ways={max(ways, 20)}"])
    cli = build(ROOT / "configs" / "omniglot" / f"{config}_{base}.yaml", [*raise_ways, f"data.ways={ways}"])
    model = cli.model.eval().to(args.device)
    if steps is not None:
        model.hparams.test_steps = steps
    if isinstance(model, MAMLLearner):
        steps = model.hparams.test_steps
    batch = random_episodes(n, ways, shots, QUERIES, 28, channels=1)  # grayscale, as Omniglot
    batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    ms = 1000 * median_seconds(lambda: evaluate(model, batch), args.repeats, args.min_seconds, device=args.device) / n
    return {"model": model_name, "setting": setting, "support_tokens": ways * shots, "query_tokens": ways * QUERIES,
            "ms_per_episode": ms, "adaptation_steps": steps, "episodes_per_batch": n}


def write(rows: list[dict], prov: dict, args) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    at = {(r["model"], r["setting"]): r for r in rows}
    ratios = {}
    for other in ("maml_10", "maml_1", "protonet"):
        if other in models and "ttt_linear" in models:
            ratios[f"{other} / ttt_linear"] = {s: at[other, s]["ms_per_episode"] / at["ttt_linear", s]["ms_per_episode"]
                                               for s in settings}
    header = ["model", *(f"{s} ({at[models[0], s]['support_tokens']} support tokens)" for s in settings)]
    cells = [[m, *(f"{at[m, s]['ms_per_episode']:.1f}" for s in settings)] for m in models]
    cells += [[f"**{name}**", *(f"**{r:.2f}x**" for r in by.values())] for name, by in ratios.items()]
    text = "\n".join([f"Test-time milliseconds per episode (Omniglot 28x28, {QUERIES} queries per class; batches of "
                      f"{args.episode_batch} episodes, 1 for the many-shot settings, under inference_mode, on "
                      f"{args.device}; {hardware_text(prov)}).", "", markdown_table(header, cells)]) + "\n"
    write_results(args.out, args.name, {"rows": rows, "ratios": ratios}, text, prov)
    _plot(at, models, settings, args.out / f"{args.name}.png")
    return text


def _plot(at, models, settings, path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(11, 4.2))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        ax.bar([j + i * width for j in range(len(settings))], [at[m, s]["ms_per_episode"] for s in settings],
               width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))], settings)
    ax.set_yscale("log")
    ax.set_ylabel("test-time ms per episode")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=4)
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--episode-batch", type=int, default=16)
    add_timing_arguments(parser, "bench_episodes", ROOT / "results")
    args = parser.parse_args(argv)
    set_threads()
    prov = provenance(__file__, argv)
    rows = printed_rows(measure_episode(model, setting, args) for setting in args.settings for model in args.models)
    print(write(rows, prov, args))
    return rows


if __name__ == "__main__":
    main()
