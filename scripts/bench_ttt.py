"""Forward+backward time of the TTT functional core: primal vs dual.

    python scripts/bench_ttt.py [--lengths 16 64 256 1024 4096] [--kinds linear mlp] [--out results/bench_ttt.json]

Times are medians of repeated runs after warm-up, both forms measured in the same run, float32 on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ttt_meta.nn.ttt import ttt_linear, ttt_mlp


def _inputs(B, H, T, D, kind):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = [r(B, H, T, D) / D**0.5 for _ in range(3)] + [torch.rand(B, H, T, generator=g) / D]
    ln = [torch.ones(H, D), torch.zeros(H, D)]
    state = [0.02 * r(H, D, D), torch.zeros(H, D)] if kind == "linear" else \
        [0.02 * r(H, D, 4 * D), torch.zeros(H, 4 * D), 0.02 * r(H, 4 * D, D), torch.zeros(H, D)]
    return [t.requires_grad_() for t in x + state + ln]


def _fwd_bwd(kind, form, m):
    core = ttt_linear if kind == "linear" else ttt_mlp

    def run(*ts):
        out = core(*ts, m, form=form)
        out[0].square().mean().backward()
    return run


def time_it(run, inputs, repeats, warmup=2):
    for _ in range(warmup):
        run(*inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(*inputs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--kinds", nargs="+", default=["linear"], choices=["linear", "mlp"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=Path("results/bench_ttt.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    forms = ["primal", "dual"]
    rows = []
    for kind in a.kinds:
        for T in a.lengths:
            inputs = _inputs(a.batch, a.heads, T, a.head_dim, kind)
            row = {"kind": kind, "T": T}
            for form in forms:
                row[f"{form}_ms"] = 1000 * time_it(_fwd_bwd(kind, form, a.mini_batch), inputs, a.repeats)
            row["primal/dual"] = row["primal_ms"] / row["dual_ms"]
            rows.append(row)
            print(" | ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    meta = {"B": a.batch, "H": a.heads, "D": a.head_dim, "mini_batch": a.mini_batch, "threads": a.threads,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "dtype": "float32"}
    header = ["kind", "T"] + [f"{f}_ms" for f in forms] + ["primal/dual"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(f"{r[h]:.2f}" if isinstance(r[h], float) else str(r[h]) for h in header) + " |" for r in rows]
    print(f"\nforward+backward, B={a.batch} H={a.heads} D={a.head_dim} mini-batch {a.mini_batch}, {a.threads} threads")
    print("\n".join(table))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
