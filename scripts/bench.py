"""What things cost, each section measured in one run: the layers against context length, test-time episodes,
training throughput, and (when named) what more context buys in accuracy.

    python scripts/bench.py                       # layers, episodes, training: results/bench_*.{json,md,png}
    python scripts/bench.py --sections episodes   # one section
    python scripts/bench.py --sections context    # trains 3 models: results/context_scaling.{json,md,png}
    python scripts/bench.py --lengths 16 32 --batch 1 --width 16 --repeats 1 --out /tmp/b   # seconds

layers: for each layer (the app's cores: TTT-Linear and TTT-MLP in their primal, dual and compiled forms (the
compiled form's one-off compilation falls in the warm-up), the LSTM sized like TTT-Linear, softmax attention) at
each length T: forward+backward milliseconds (median of --repeats runs, and
of at least 2 s of runs, after one warm-up) and the peak of live tensors one forward+backward allocates
(profiler allocation events, weights excluded). Every token writes (no read-only queries); attention is the
app's: every token attends to every token. The growth exponent is the slope of log time against log T over
T >= --fit-from (TTT and the LSTM should be ~1, attention ~2 at long lengths).

episodes: test-time milliseconds per episode of every model of the comparison, as its Omniglot config builds it
(weights untrained: the cost does not depend on them), on random 28x28 episodes with 15 queries per class:
5-way 1-shot, 5-way 5-shot, 20-way 5-shot, and many-shot 20-way 50-shot and 100-way 10-shot (1,000 support
tokens; models built from the 20w5s configs with max_ways / ways raised). MAML adapts with 1 and 10 steps. Median of
repeated batches of --episode-batch episodes (one for many-shot) under inference_mode, after a warm-up.

training: episodes per second of ``fit`` (Lightning's loop, data loading included, no validation) for the
TTT-Linear model of configs/omniglot/ttt_linear_{5w1s,20w5s}.yaml on --train-dataset in float32 and in bf16
autocast (trainer.precision bf16-mixed), timed over --train-steps steps after 3 warm-up steps (in a temporary
folder).

context: accuracy of TTT-Linear, the LSTM and attention meta-trained at 5-way 5-shot and scored at 1..15 shots
and 5..200 ways (scripts/context_scaling.py; trains a model per core, so it runs only when named).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lightning as L  # noqa: E402
from bench_encoders import episodes, timed, train_peak_mb  # noqa: E402

from ttt_meta.cli import main as cli_main  # noqa: E402
from ttt_meta.learners import MAMLLearner  # noqa: E402
from ttt_meta.nn.cores import make_core  # noqa: E402

# name -> (core, TTT form or None)
LAYERS = {f"{core} {form}": (core, form) for core in ("ttt_linear", "ttt_mlp") for form in ("primal", "dual", "compiled")}
LAYERS.update({"lstm": ("lstm", None), "attention": ("attention", None)})


# episode settings: name -> (ways, shots, config setting the model is built from, many-shot: 1 episode per batch)
SETTINGS = {"5w1s": (5, 1, "5w1s", False), "5w5s": (5, 5, "5w5s", False), "20w5s": (20, 5, "20w5s", False), "20w50s": (20, 50, "20w5s", True),
            "100w10s": (100, 10, "20w5s", True)}
# model -> (config name, MAML adaptation steps at test or None)
MODELS = {"ttt_linear": ("ttt_linear", None), "ttt_mlp": ("ttt_mlp", None), "lstm": ("lstm", None),
          "attention": ("attention", None), "protonet": ("protonet", None), "maml_1": ("maml", 1),
          "maml_10": ("maml", 10), "metasgd": ("metasgd", None)}


def growth_exponent(lengths: list[int], ms: list[float]) -> float:
    """Least-squares slope of log(ms) against log(T)."""
    x, y = [math.log(t) for t in lengths], [math.log(v) for v in ms]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def measure(name: str, T: int, args) -> dict:
    core, form = LAYERS[name]
    torch.manual_seed(0)
    layer = make_core(core, args.width, args.heads, mini_batch_size=args.mini_batch)
    if form is not None:
        layer.form = form
    x = torch.randn(args.batch, T, args.width, requires_grad=True)

    def step():
        layer(x).square().mean().backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    ms = 1000 * timed(step, args.repeats, args.min_seconds)
    return {"layer": name, "T": T, "ms": ms, "peak_mb": train_peak_mb(step)}


def measure_episode(model_name: str, setting: str, args) -> dict:
    config, steps = MODELS[model_name]
    ways, shots, base, many = SETTINGS[setting]
    n = 1 if many else args.episode_batch
    raise_ways = ([f"--model.init_args.ways={ways}"] if config in ("maml", "metasgd") else
                  [] if config == "protonet" else [f"--model.init_args.max_ways={max(ways, 20)}"])
    cli = cli_main(["--config", str(ROOT / "configs" / "omniglot" / f"{config}_{base}.yaml"), *raise_ways,
                    f"--data.ways={ways}"], run=False)
    model = cli.model.eval()
    if steps is not None:
        model.adaptation_steps = steps
    if isinstance(model, MAMLLearner):
        steps = model.adaptation_steps
    batch = episodes(n, ways, shots, 15, 28, torch.Generator().manual_seed(0))
    batch["support"], batch["query"] = batch["support"][:, :, :1], batch["query"][:, :, :1]  # grayscale

    def run():
        with torch.inference_mode():
            model(batch)

    ms = 1000 * timed(run, args.repeats, args.min_seconds) / n
    return {"model": model_name, "setting": setting, "support_tokens": ways * shots, "query_tokens": ways * 15,
            "ms_per_episode": ms, "adaptation_steps": steps, "episodes_per_batch": n}


class _StepClock(L.Callback):
    """Times the training steps after the first `skip` (from the end of step `skip` to the end of the last)."""

    def __init__(self, skip: int):
        self.skip, self.start, self.end = skip, None, None

    def on_train_batch_end(self, trainer, *args) -> None:
        now = time.perf_counter()
        if trainer.global_step == self.skip:
            self.start = now
        self.end = now


def measure_training(setting: str, precision: str, args) -> dict:
    skip = 3
    clock = _StepClock(skip)
    config = ROOT / "configs" / "omniglot" / f"ttt_linear_{setting}.yaml"
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            cli = cli_main(["--config", str(config), f"--data.dataset={args.train_dataset}",
                            f"--trainer.max_steps={skip + args.train_steps}", "--trainer.limit_val_batches=0",
                            "--trainer.enable_progress_bar=false", f"--trainer.precision={precision}",
                            "--trainer.enable_model_summary=false", f"--data.train_batches_per_epoch={skip + args.train_steps}"],
                           run=False)
            cli.trainer.callbacks.append(clock)
            cli.trainer.fit(cli.model, cli.datamodule)
        finally:
            os.chdir(cwd)
    episodes_per_step = cli.datamodule.hparams.meta_batch_size
    return {"setting": setting, "precision": precision, "dataset": args.train_dataset, "steps": args.train_steps,
            "episodes_per_step": episodes_per_step,
            "train_episodes_per_s": args.train_steps * episodes_per_step / (clock.end - clock.start)}


def write_episodes(rows: list[dict], meta: dict, args) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    at = {(r["model"], r["setting"]): r for r in rows}
    ratios = {}
    for other in ("maml_10", "maml_1", "protonet"):
        if other in models and "ttt_linear" in models:
            ratios[f"{other} / ttt_linear"] = {s: at[other, s]["ms_per_episode"] / at["ttt_linear", s]["ms_per_episode"]
                                               for s in settings}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_episodes.json").write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=1))
    lines = [f"Test-time milliseconds per episode (Omniglot 28x28, 15 queries per class; batches of "
             f"{args.episode_batch} episodes, 1 for the many-shot settings, under inference_mode; "
             f"{meta['threads']} threads, {meta['machine']}, "
             f"torch {meta['torch']}).", "",
             "| model | " + " | ".join(f"{s} ({at[models[0], s]['support_tokens']} support tokens)" for s in settings)
             + " |", "| --- |" + " --- |" * len(settings)]
    lines += [f"| {m} | " + " | ".join(f"{at[m, s]['ms_per_episode']:.1f}" for s in settings) + " |" for m in models]
    lines += [f"| **{name}** | " + " | ".join(f"**{r:.2f}x**" for r in by.values()) + " |" for name, by in ratios.items()]
    text = "\n".join(lines) + "\n"
    (args.out / "bench_episodes.md").write_text(text)
    _plot_episodes(at, models, settings, args.out / "bench_episodes.png")
    return text


def _plot_episodes(at, models, settings, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        ax.bar([j + i * width for j in range(len(settings))], [at[m, s]["ms_per_episode"] for s in settings],
               width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))], settings)
    ax.set_yscale("log")
    ax.set_ylabel("test-time ms per episode")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[dict], meta: dict, args) -> str:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(r["layer"] for r in rows))
    lengths = sorted({r["T"] for r in rows})
    at = {(r["layer"], r["T"]): r for r in rows}
    fit = [t for t in lengths if t >= args.fit_from]
    summary = {}
    for name in names:
        s = {}
        ts = [t for t in fit if (name, t) in at]
        if len(ts) >= 2:
            s["exponent"] = growth_exponent(ts, [at[name, t]["ms"] for t in ts])
            s["from"], s["to"], s["time_ratio"] = ts[0], ts[-1], at[name, ts[-1]]["ms"] / at[name, ts[0]]["ms"]
        summary[name] = s
    ratios = {f"{kind} primal/{fast}": {t: at[f"{kind} primal", t]["ms"] / at[f"{kind} {fast}", t]["ms"] for t in lengths
                                       if (f"{kind} primal", t) in at and (f"{kind} {fast}", t) in at}
              for kind in ("ttt_linear", "ttt_mlp") for fast in ("dual", "compiled")
              if f"{kind} primal" in names and f"{kind} {fast}" in names}
    (out / "bench_layers.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary,
                                                       "speedup over primal": ratios}, indent=1))
    head = (f"Forward+backward per layer: B={meta['batch']}, width {meta['width']}, {meta['heads']} heads (head dim "
            f"{meta['width'] // meta['heads']}), TTT inner mini-batch {meta['mini_batch']}, float32, {meta['threads']} "
            f"threads, {meta['machine']}, torch {meta['torch']}. Milliseconds (median) / peak MB of live tensors.")
    lines = [head, "", "| T | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for t in lengths:
        lines.append(f"| {t} | " + " | ".join(f"{at[n, t]['ms']:.1f} ms / {at[n, t]['peak_mb']:.0f} MB"
                                              if (n, t) in at else "-" for n in names) + " |")
    if any(summary.values()):
        lines += ["", f"Growth over T >= {args.fit_from}: exponent of a log-log fit, and the time ratio between the "
                  f"longest and the shortest length fitted.", "", "| layer | exponent | time ratio |", "| --- | --- | --- |"]
        lines += [f"| {n} | {s['exponent']:.2f} | {s['time_ratio']:.1f}x (T={s['to']} / T={s['from']}) |"
                  for n, s in summary.items() if s]
    for kind, by_t in ratios.items():
        lines += ["", f"{kind}: " + ", ".join(f"T={t}: {r:.2f}x" for t, r in by_t.items())]
    text = "\n".join(lines) + "\n"
    (out / "bench_layers.md").write_text(text)
    _plot(rows, names, meta, out / "bench_layers.png")
    return text


def _plot(rows, names, meta, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        pts = sorted((r["T"], r["ms"], r["peak_mb"]) for r in rows if r["layer"] == name)
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax_m.plot([p[0] for p in pts], [max(p[2], 1e-3) for p in pts], marker="o", label=name)
    for ax, label in ((ax_t, "forward+backward ms"), (ax_m, "peak MB (live tensors)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"B={meta['batch']}, width {meta['width']}, {meta['heads']} heads, {meta['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["layers", "episodes", "training"],
                        choices=["layers", "episodes", "training", "context"],
                        help="context (training three models) runs only when named")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mini-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--fit-from", type=int, default=1024)
    parser.add_argument("--primal-max", type=int, default=4096,
                        help="longest T for the primal (reference) forms; TTT-MLP's needs ~10 GB at 8192")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--episode-batch", type=int, default=16)
    parser.add_argument("--train-settings", nargs="+", default=["5w1s", "20w5s"], choices=["5w1s", "20w5s"])
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--train-precisions", nargs="+", default=["32-true", "bf16-mixed"],
                        help="trainer.precision values; bf16-mixed pays on CPUs with native bf16 (AVX512-BF16, AMX)")
    parser.add_argument("--train-dataset", default="omniglot", choices=["omniglot", "synthetic"],
                        help="omniglot reads data.root / TTT_META_DATA like the app")
    parser.add_argument("--context-cores", nargs="+", default=["ttt_linear", "lstm", "attention"],
                        choices=["ttt_linear", "ttt_mlp", "lstm", "attention"])
    parser.add_argument("--context-shots", type=int, nargs="+", default=[1, 2, 5, 10, 15])
    parser.add_argument("--context-ways", type=int, nargs="+", default=[5, 20, 50, 100, 200])
    parser.add_argument("--context-queries", type=int, default=5)
    parser.add_argument("--context-episodes", type=int, default=200)
    parser.add_argument("--context-max-images", type=int, default=4000, help="images per evaluation batch, at most")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--context-budget-seconds", type=float, default=900.0, help="training time per model")
    budget.add_argument("--context-budget-steps", type=int)
    budget.add_argument("--context-from-checkpoints", action="store_true",
                        help="no training: score the newest checkpoints/context_<core>/version_N/last.ckpt "
                             "of an earlier run")
    parser.add_argument("--context-override", nargs="*", default=[], help="config overrides key=value, every model")
    parser.add_argument("--configs", type=Path, default=ROOT / "configs" / "omniglot")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("TTT_META_THREADS", os.cpu_count() or 1)))
    meta = {"batch": args.batch, "width": args.width, "heads": args.heads, "mini_batch": args.mini_batch,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine()}
    rows = {}
    if "layers" in args.sections:
        rows["layers"] = []
        for name in args.layers:
            for T in args.lengths:
                if LAYERS[name][1] == "primal" and T > args.primal_max:
                    continue
                rows["layers"].append(measure(name, T, args))
                print(json.dumps(rows["layers"][-1]), flush=True)
        print(write(rows["layers"], meta, args))
    if "episodes" in args.sections:
        rows["episodes"] = []
        for setting in args.settings:
            for model in args.models:
                rows["episodes"].append(measure_episode(model, setting, args))
                print(json.dumps(rows["episodes"][-1]), flush=True)
        print(write_episodes(rows["episodes"], meta, args))
    if "training" in args.sections:
        rows["training"] = [measure_training(setting, precision, args) for setting in args.train_settings
                            for precision in args.train_precisions]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_training.json").write_text(json.dumps({"meta": meta, "rows": rows["training"]}, indent=1))
        text = "\n".join([f"fit episodes/s, TTT-Linear ({meta['threads']} threads, {meta['machine']}, torch "
                          f"{meta['torch']}; {args.train_steps} steps after 3 warm-up steps, data loading included):",
                          "", "| setting | precision | data | episodes per step | episodes/s |", "| --- | --- | --- | --- | --- |"]
                         + [f"| {r['setting']} | {r['precision']} | {r['dataset']} | {r['episodes_per_step']} | "
                            f"{r['train_episodes_per_s']:.1f} |"
                            for r in rows["training"]]) + "\n"
        (args.out / "bench_training.md").write_text(text)
        print(text)
    if "context" in args.sections:
        from context_scaling import run as run_context
        rows["context"] = run_context(args, meta)
    return rows


if __name__ == "__main__":
    main()
