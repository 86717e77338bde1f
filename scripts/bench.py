"""How the sequence layers' cost grows with context length, all measured in one run.

    python scripts/bench.py                       # T = 64 .. 8192, writes results/bench_layers.{json,md,png}
    python scripts/bench.py --lengths 16 32 --batch 1 --width 16 --repeats 1 --out /tmp/b   # seconds

For each layer (the app's cores: TTT-Linear and TTT-MLP in their primal and dual forms, the LSTM sized like
TTT-Linear, softmax attention) at each length T: forward+backward milliseconds (median of --repeats runs, and
of at least 2 s of runs, after one warm-up) and the peak of live tensors one forward+backward allocates
(profiler allocation events, weights excluded). Every token writes (no read-only queries); attention is the
app's: every token attends to every token. The growth exponent is the slope of log time against log T over
T >= --fit-from (TTT and the LSTM should be ~1, attention ~2 at long lengths).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoders import timed, train_peak_mb  # noqa: E402
from ttt_meta.nn.cores import make_core  # noqa: E402

# name -> (core, TTT form or None)
LAYERS = {"ttt_linear primal": ("ttt_linear", "primal"), "ttt_linear dual": ("ttt_linear", "dual"),
          "ttt_mlp primal": ("ttt_mlp", "primal"), "ttt_mlp dual": ("ttt_mlp", "dual"),
          "lstm": ("lstm", None), "attention": ("attention", None)}


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
    ratios = {f"{kind} primal/dual": {t: at[f"{kind} primal", t]["ms"] / at[f"{kind} dual", t]["ms"] for t in lengths
                                      if (f"{kind} primal", t) in at and (f"{kind} dual", t) in at}
              for kind in ("ttt_linear", "ttt_mlp") if f"{kind} primal" in names and f"{kind} dual" in names}
    (out / "bench_layers.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary,
                                                       "primal/dual": ratios}, indent=1))
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
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("TTT_META_THREADS", os.cpu_count() or 1)))
    rows = []
    for name in args.layers:
        for T in args.lengths:
            if LAYERS[name][1] == "primal" and T > args.primal_max:
                continue
            rows.append(measure(name, T, args))
            print(json.dumps(rows[-1]), flush=True)
    meta = {"batch": args.batch, "width": args.width, "heads": args.heads, "mini_batch": args.mini_batch,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine()}
    print(write(rows, meta, args))
    return rows


if __name__ == "__main__":
    main()
