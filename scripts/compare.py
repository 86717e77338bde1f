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
import platform
import time
from pathlib import Path

import torch

from ttt_meta.checkpointing import check_checkpoint
from ttt_meta.cli import TTTMetaCLI, newest_last_checkpoint
from ttt_meta.cli import main as cli_main
from ttt_meta.learners import MAMLLearner
from ttt_meta.measure import confidence_interval

MODELS = ["ttt_linear", "ttt_mlp", "lstm", "attention", "protonet", "maml", "metasgd"]
MAML_STEPS = (1, 5, 10)


def build(config: Path, overrides: list[str], run_name: str) -> TTTMetaCLI:
    args = ["--config", str(config), f"--run_name={run_name}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.max_time=null"]
    return cli_main(args + [f"--{o}" for o in overrides], run=False)


def step_seconds(cli: TTTMetaCLI, steps: int = 8) -> float:
    """Median seconds of a training step (forward, backward, optimiser), after 2 warm-up steps."""
    model, dm = cli.model, cli.datamodule
    dm.setup("fit")
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: measures the step, changes nothing
    times = []
    batches = iter(dm.train_dataloader())
    model.train()
    for i in range(steps + 2):
        batch = next(batches)
        t0 = time.perf_counter()
        loss, _ = model.loss_and_accuracy(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_tensor_mb(model, batch) -> float:
    """Peak memory (MB) of live tensors while `model` evaluates `batch`, from the profiler's allocation events.

    Counts what the forward (and MAML's adaptation) allocates, not the weights already resident; the allocator's
    cache and other processes cannot skew it, unlike resident-set measures. Run apart from the timed pass.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA if batch["support"].is_cuda else ProfilerActivity.CPU]
    with torch.inference_mode(), profile(activities=activities, profile_memory=True) as prof:
        model(batch)
    key = "self_device_memory_usage" if batch["support"].is_cuda else "self_cpu_memory_usage"
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += getattr(event, key)
        peak = max(peak, live)
    return peak / 2**20


def score(model, dm, device) -> dict:
    """Per-episode test accuracy on the fixed test episodes, with the evaluation time and peak memory."""
    model.eval().to(device)
    accs, seconds, episodes = [], 0.0, 0
    with torch.inference_mode():
        for batch in dm.test_dataloader():
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            logits = model(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - t0
            episodes += len(logits)
            accs.append((logits.argmax(-1) == batch["query_labels"]).float().mean(1).cpu())
    mean, ci = confidence_interval(torch.cat(accs))
    return {"acc": mean, "ci95": ci, "episodes": episodes, "test_ms_per_episode": 1000 * seconds / episodes,
            "test_episodes_per_s": episodes / seconds, "test_peak_mem_mb": peak_tensor_mb(model, batch)}


def train(config: Path, run: str, args) -> tuple[TTTMetaCLI, dict]:
    """Train the model of `config` within the budget, or with --from-checkpoints load what a previous run left."""
    if args.from_checkpoints:
        cli = build(config, args.override, run)
        ckpt = check_checkpoint(newest_last_checkpoint(run), cli.model)
        cli.model.load_state_dict(ckpt["state_dict"])
        return cli, {"train_steps": ckpt["global_step"], "train_seconds": float("nan")}
    steps = args.budget_steps or max(1, int(args.budget_seconds / step_seconds(build(config, args.override, run))))
    cli = build(config, args.override + [f"trainer.max_steps={steps}", "trainer.max_epochs=-1"], run)
    t0 = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli, {"train_steps": steps, "train_seconds": time.perf_counter() - t0}


def run_model(name: str, args, device) -> list[dict]:
    config = args.configs / f"{name}_{args.setting}.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no config {config} for model {name!r}; write one or drop it from --models")
    cli, common = train(config, f"compare_{args.configs.name}_{args.setting}_{name}", args)
    cli.datamodule.setup("test")
    common.update(train_episodes_per_s=common["train_steps"] * cli.datamodule.hparams.meta_batch_size
                  / common["train_seconds"], params=sum(p.numel() for p in cli.model.parameters()))
    if isinstance(cli.model, MAMLLearner) and name == "maml":
        rows = []
        for k in MAML_STEPS:
            cli.model.adaptation_steps = k
            rows.append({"model": f"maml_{k}", **score(cli.model, cli.datamodule, device), **common})
        return rows
    return [{"model": name, **score(cli.model, cli.datamodule, device), **common}]


def write(rows: list[dict], args, meta: dict) -> str:
    stem = args.out / f"compare_{meta['dataset']}_{args.setting}"
    args.out.mkdir(parents=True, exist_ok=True)
    ttt = next((r for r in rows if r["model"] == "ttt_linear"), None)
    head = "| model | test acc % (95% CI) | test ms / episode | episodes / s | peak MB / batch | cost / TTT-Linear | train steps | params |"
    lines = [f"{meta['dataset']} {args.setting}: {meta['budget']}, {meta['test_episodes']} test episodes in batches of "
             f"{meta['eval_batch_size']}, {meta['device']}",
             "", head, "|" + "---|" * 8]
    for r in rows:
        ratio = f"{r['test_ms_per_episode'] / ttt['test_ms_per_episode']:.2f}x" if ttt else "-"
        lines.append(f"| {r['model']} | {100 * r['acc']:.2f} +- {100 * r['ci95']:.2f} | {r['test_ms_per_episode']:.2f} | "
                     f"{r['test_episodes_per_s']:.1f} | {r['test_peak_mem_mb']:.0f} | {ratio} | {r['train_steps']} | "
                     f"{r['params']:,} |")
    table = "\n".join(lines)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(table + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["model"] for r in rows]
    a.barh(names, [100 * r["acc"] for r in rows], xerr=[100 * r["ci95"] for r in rows], color="tab:blue")
    a.set_xlabel("test accuracy % (95% CI)")
    a.set_xlim(max(0, min(100 * r["acc"] for r in rows) - 10), 100)
    b.barh(names, [r["test_ms_per_episode"] for r in rows], color="tab:orange")
    b.set_xscale("log")
    b.set_xlabel("test-time ms per episode (log)")
    fig.suptitle(lines[0])
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    return table


def budget_text(args) -> str:
    if args.from_checkpoints:
        return "trained earlier (--from-checkpoints)"
    return f"{args.budget_seconds:.0f} s per model" if args.budget_seconds else f"{args.budget_steps} steps per model"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="5w1s", help="5w1s, 5w5s, 20w1s or 20w5s")
    p.add_argument("--configs", type=Path, default=Path("configs/omniglot"))
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-seconds", type=float)
    budget.add_argument("--budget-steps", type=int)
    budget.add_argument("--from-checkpoints", action="store_true",
                        help="no training: score the last.ckpt that an earlier run of this comparison left")
    p.add_argument("--override", nargs="*", default=[], help="config overrides key=value for every model")
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in args.models:
        rows += run_model(name, args, device)
    dm = build(args.configs / f"{args.models[0]}_{args.setting}.yaml", args.override, "compare").datamodule
    meta = {"dataset": dm.hparams.dataset, "setting": args.setting, "test_episodes": dm.hparams.test_episodes,
            "test_seed": dm.hparams.test_seed, "eval_batch_size": dm.hparams.eval_batch_size, "device": torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "budget": budget_text(args),
            "torch": torch.__version__}
    print(write(rows, args, meta))
    return rows


if __name__ == "__main__":
    main()
