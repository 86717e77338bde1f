"""Train every model with the same budget, score all on the same test episodes, and time test-time adaptation.

    python scripts/compare.py --setting 5w1s --budget-seconds 600
    python scripts/compare.py --setting 5w5s --budget-steps 2000 --models ttt_linear protonet maml
    python scripts/compare.py --setting 5w1s --from-checkpoints     # re-score what an earlier run trained

Each model comes from ``configs/<dataset>/<model>_<setting>.yaml`` (plus any ``--override key=value``, e.g.
``--override data.dataset=synthetic``). A time budget is turned into a step count from the model's measured
step time, so every learning-rate schedule runs to its end. MAML is trained once and scored with 1, 5 and 10
adaptation steps (rows ``maml_1``, ``maml_5``, ``maml_10``). Test cost is the wall time of the evaluation
forward (adaptation included) per episode, with batches of ``eval_batch_size`` episodes, and the peak memory of
the tensors one such batch allocates (profiler allocation events, measured after the timed pass).

Writes results/compare_<dataset>_<setting>.json, .md and .png, and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ttt_meta.cli import set_threads
from ttt_meta.learners import MAMLLearner
from ttt_meta.measure import environment, markdown_table, pyplot, save_figure
from ttt_meta.nn.cores import CORES
from ttt_meta.runs import Budget, add_budget_arguments, score, train

MODELS = [*CORES, "protonet", "maml", "metasgd"]
MAML_STEPS = (1, 5, 10)


def run_model(name: str, args, device) -> tuple[list[dict], dict]:
    """The rows of model `name` (three for MAML: 1, 5 and 10 test steps) and its data module's settings."""
    config = args.configs / f"{name}_{args.setting}.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no config {config} for model {name!r}; write one or drop it from --models")
    cli, common = train(config, f"compare_{args.configs.name}_{args.setting}_{name}", args.override,
                        Budget.from_args(args))
    model, data = cli.model, cli.datamodule.hparams
    common.update(train_episodes_per_s=common["train_steps"] * data.meta_batch_size / common["train_seconds"],
                  params=sum(p.numel() for p in model.parameters()))
    if isinstance(model, MAMLLearner) and name == "maml":
        rows = []
        for k in MAML_STEPS:
            model.hparams.test_steps = k
            rows.append({"model": f"maml_{k}", **score(model, cli.datamodule, device), **common})
        return rows, data
    return [{"model": name, **score(model, cli.datamodule, device), **common}], data


def write(rows: list[dict], args, meta: dict) -> str:
    stem = args.out / f"compare_{meta['dataset']}_{args.setting}"
    args.out.mkdir(parents=True, exist_ok=True)
    ttt = next((r for r in rows if r["model"] == "ttt_linear"), None)
    title = (f"{meta['dataset']} {args.setting}: {meta['budget']}, {meta['test_episodes']} test episodes in batches "
             f"of {meta['eval_batch_size']}, {meta['device']}")
    header = ["model", "test acc % (95% CI)", "test ms / episode", "episodes / s", "peak MB / batch",
              "cost / TTT-Linear", "train steps", "params"]
    cells = [[r["model"], f"{100 * r['acc']:.2f} +- {100 * r['ci95']:.2f}", f"{r['test_ms_per_episode']:.2f}",
              f"{r['test_episodes_per_s']:.1f}", f"{r['test_peak_mem_mb']:.0f}",
              f"{r['test_ms_per_episode'] / ttt['test_ms_per_episode']:.2f}x" if ttt else "-", r["train_steps"],
              f"{r['params']:,}"] for r in rows]
    table = f"{title}\n\n{markdown_table(header, cells)}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(table + "\n")
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(11, 4))
    names = [r["model"] for r in rows]
    a.barh(names, [100 * r["acc"] for r in rows], xerr=[100 * r["ci95"] for r in rows], color="tab:blue")
    a.set_xlabel("test accuracy % (95% CI)")
    a.set_xlim(max(0, min(100 * r["acc"] for r in rows) - 10), 100)
    b.barh(names, [r["test_ms_per_episode"] for r in rows], color="tab:orange")
    b.set_xscale("log")
    b.set_xlabel("test-time ms per episode (log)")
    fig.suptitle(title)
    save_figure(fig, stem.with_suffix(".png"), dpi=120)
    return table


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="5w1s", help="5w1s, 5w5s, 20w1s or 20w5s")
    p.add_argument("--configs", type=Path, default=Path("configs/omniglot"))
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    add_budget_arguments(p, run_names="compare_<dataset>_<setting>_<model>")
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    set_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, data = [], None
    for name in args.models:
        model_rows, model_data = run_model(name, args, device)
        rows, data = rows + model_rows, data or model_data
    env = environment()
    meta = {"dataset": data.dataset, "setting": args.setting, "test_episodes": data.test_episodes,
            "test_seed": data.test_seed, "eval_batch_size": data.eval_batch_size,
            "device": torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU {env['machine']}, {env['threads']} threads",
            "budget": Budget.from_args(args).describe(" per model"), "torch": env["torch"]}
    print(write(rows, args, meta))
    return rows


if __name__ == "__main__":
    main()
