"""Cost of each sequence layer against the context length T: forward+backward time and peak memory.

    python scripts/bench_layers.py                    # results/bench_layers.{json,md,png}
    python scripts/bench_layers.py --primal-max 2048
    python scripts/bench_layers.py --lengths 16 32 --batch 1 --width 16 --repeats 1 --out /tmp/b   # seconds

For each layer (the app's cores: TTT-Linear and TTT-MLP in their primal, dual and compiled forms (the compiled
form's one-off compilation falls in the warm-up), the LSTM sized like TTT-Linear, softmax attention) at each
length T: forward+backward milliseconds (median of --repeats runs, and of at least --min-seconds of runs, after
one warm-up) and the peak of live tensors one forward+backward allocates (profiler allocation events, weights
excluded). Every token writes (no read-only queries); attention is the app's: every token attends to every
token. The growth exponent is the slope of log time against log T over T >= --fit-from (TTT and the LSTM
should be ~1, attention ~2 at long lengths).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ttt_meta.cli import set_threads
from ttt_meta.measure import (add_timing_arguments, hardware_text, markdown_table, median_seconds, peak_tensor_mb,
                              printed_rows, provenance, pyplot, save_figure, write_results)
from ttt_meta.nn.cores import CORES, make_core
from ttt_meta.nn.ttt import FORMS

ROOT = Path(__file__).resolve().parents[1]
# name -> (core, TTT form or None): "ttt_linear primal", ..., "lstm", "attention"
LAYERS = {f"{core} {form}" if form else core: (core, form)
          for core in CORES for form in (FORMS if core.startswith("ttt_") else (None,))}


def growth_exponent(lengths: list[int], ms: list[float]) -> float:
    """Least-squares slope of log(ms) against log(T)."""
    x, y = [math.log(t) for t in lengths], [math.log(v) for v in ms]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def measure(name: str, T: int, args) -> dict:
    """{"layer", "T", "ms": median forward+backward ms, "peak_mb"} of layer `name` on x [batch, T, width]."""
    core, form = LAYERS[name]
    torch.manual_seed(0)
    layer = make_core(core, args.width, args.heads, mini_batch_size=args.mini_batch, **({"form": form} if form else {}))
    layer.to(args.device)
    x = torch.randn(args.batch, T, args.width, device=args.device, requires_grad=True)

    def step():
        layer(x).square().mean().backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    ms = 1000 * median_seconds(step, args.repeats, args.min_seconds, device=args.device)
    return {"layer": name, "T": T, "ms": ms, "peak_mb": peak_tensor_mb(step, args.device)}


def write(rows: list[dict], meta: dict, prov: dict, args) -> str:
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
    ratios = {f"{kind} primal/{fast}": {t: at[f"{kind} primal", t]["ms"] / at[f"{kind} {fast}", t]["ms"]
                                       for t in lengths if (f"{kind} primal", t) in at and (f"{kind} {fast}", t) in at}
              for kind in CORES for fast in FORMS
              if fast != "primal" and f"{kind} primal" in names and f"{kind} {fast}" in names}
    head = (f"Forward+backward per layer: B={meta['batch']}, width {meta['width']}, {meta['heads']} heads (head dim "
            f"{meta['width'] // meta['heads']}), TTT inner mini-batch {meta['mini_batch']}, float32 on {meta['device']}, "
            f"{hardware_text(prov)}. Milliseconds (median) / peak MB of live tensors.")
    cells = [[t, *(f"{at[n, t]['ms']:.1f} ms / {at[n, t]['peak_mb']:.0f} MB" if (n, t) in at else "-" for n in names)]
             for t in lengths]
    lines = [head, "", markdown_table(["T", *names], cells)]
    if any(summary.values()):
        lines += ["", f"Growth over T >= {args.fit_from}: exponent of a log-log fit, and the time ratio between the "
                  f"longest and the shortest length fitted.", "",
                  markdown_table(["layer", "exponent", "time ratio"],
                                 [[n, f"{s['exponent']:.2f}", f"{s['time_ratio']:.1f}x (T={s['to']} / T={s['from']})"]
                                  for n, s in summary.items() if s])]
    for kind, by_t in ratios.items():
        lines += ["", f"{kind}: " + ", ".join(f"T={t}: {r:.2f}x" for t, r in by_t.items())]
    text = "\n".join(lines) + "\n"
    write_results(out, args.name, {"meta": meta, "rows": rows, "summary": summary,
                                        "speedup over primal": ratios}, text, prov)
    _plot(rows, names, meta, prov, out / f"{args.name}.png")
    return text


def _plot(rows, names, meta, prov, path: Path) -> None:
    fig, (ax_t, ax_m) = pyplot().subplots(1, 2, figsize=(11, 4.2))
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
    fig.suptitle(f"B={meta['batch']}, width {meta['width']}, {meta['heads']} heads, {prov['hardware']['threads']} threads")
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mini-batch", type=int, default=16)
    parser.add_argument("--fit-from", type=int, default=1024)
    parser.add_argument("--primal-max", type=int, default=4096,
                        help="longest T for the primal (reference) forms; TTT-MLP's needs ~10 GB at 8192")
    add_timing_arguments(parser, "bench_layers", ROOT / "results")
    args = parser.parse_args(argv)
    set_threads()
    meta = {"batch": args.batch, "width": args.width, "heads": args.heads, "mini_batch": args.mini_batch,
            "device": args.device}
    prov = provenance(__file__, argv)
    rows = printed_rows(measure(name, T, args) for name in args.layers for T in args.lengths
                        if LAYERS[name][1] != "primal" or T <= args.primal_max)
    print(write(rows, meta, prov, args))
    return rows


if __name__ == "__main__":
    main()
