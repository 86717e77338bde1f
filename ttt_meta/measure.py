"""Measurements, written once for the learners, the scripts and the tests.

- ``episode_accuracy(logits [B, NQ, N], labels [B, NQ]) -> [B]``: the fraction of each episode's queries scored
  right; ``confidence_interval(acc [n]) -> (mean, 1.96 * std / sqrt(n))``, the 95% interval reported everywhere.
  Streams (the online protocol): ``instance_numbers(labels [B, T]) -> [B, T]``, the how-many-th instance of its
  class each image is (1, 2, ...), and ``accuracy_by_instance(logits, labels) -> [B, S]``, each stream's accuracy
  on the 1st, 2nd, ... S-th instances of its classes.
- Time: ``timed_call`` (one call, CUDA synchronised), ``median_seconds`` (median over repeats after a warm-up),
  ``StepClock`` (the training steps of a Lightning ``fit``); ``add_timing_arguments`` gives a benchmark script its
  shared options.
- Memory: ``peak_tensor_mb`` (peak of the live tensors a call allocates, from the profiler's allocation events).
- Work to measure: ``random_episodes`` (fixed random episodes in the data module's batch format),
  ``evaluate`` (a forward under inference_mode), ``optimizer_step`` (forward, backward, optimiser step).
- Output: ``provenance`` (commit, command, date, hardware, versions; ``code_and_machine`` without the command), ``write_results`` (the one writer of
  ``results/<name>.json``: data, its Markdown table and its provenance), ``printed_rows`` (progress lines),
  ``markdown_table``, ``pyplot`` (matplotlib's pyplot on the Agg backend) and ``save_figure``.

matplotlib and the profiler are imported when first used: the learners import this module.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor


def episode_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-episode accuracy [B] of query logits [B, NQ, N] against query labels [B, NQ]."""
    return (logits.argmax(-1) == labels).float().mean(1)


def instance_numbers(labels: Tensor) -> Tensor:
    """labels [B, T] -> [B, T]: 1 + the number of earlier steps of the same stream with the same label."""
    onehot = torch.nn.functional.one_hot(labels)  # [B, T, N]
    return (onehot.cumsum(1) * onehot).sum(-1)


def accuracy_by_instance(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-stream accuracy [B, S] on the s-th instances of its classes (s = 1..S, S the most instances of a class
    in the batch), from step logits [B, T, N] and labels [B, T]: the mean over the stream's steps that show a
    class for the s-th time (NaN where a stream has none)."""
    n = instance_numbers(labels)
    onehot = torch.nn.functional.one_hot(n - 1).float()  # [B, T, S]
    correct = (logits.argmax(-1) == labels).float()
    return (correct.unsqueeze(-1) * onehot).sum(1) / onehot.sum(1)


def confidence_interval(acc: Tensor) -> tuple[float, float]:
    """Mean and 95% half-interval 1.96 * std / sqrt(n) of per-episode accuracies [n]."""
    n = acc.numel()
    std = acc.std().item() if n > 1 else 0.0
    return acc.mean().item(), 1.96 * std / math.sqrt(n)


def _synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device | str | None = None) -> tuple[object, float]:
    """(fn(), its wall seconds); on a CUDA `device` the queued work is waited for before and after."""
    _synchronize(device)
    start = time.perf_counter()
    out = fn()
    _synchronize(device)
    return out, time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int = 3, min_seconds: float = 0.0, warmup: int = 1,
                   device: torch.device | str | None = None, max_runs: int = 100) -> float:
    """Median wall seconds of `fn()` after `warmup` untimed calls, over at least `repeats` timed calls and, until
    they add up to `min_seconds`, more (`max_runs` at most)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < max_runs):
        times.append(timed_call(fn, device)[1])
    return statistics.median(times)


def add_timing_arguments(parser: argparse.ArgumentParser, name: str, out: Path) -> None:
    """The options of a benchmark script that times calls with ``median_seconds``: --repeats, --min-seconds,
    --device (default: cuda when there is one), --name of its results file (default `name`) and --out (its folder,
    default `out`)."""
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to measure (default: cuda when there is one)")
    parser.add_argument("--name", default=name, help="results file name")
    parser.add_argument("--out", type=Path, default=out)


class StepClock(L.Callback):
    """Times a ``fit``'s training steps after the first `skip`: ``seconds`` runs from the end of step `skip` to
    the end of the last step (Lightning's loop, data loading included)."""

    def __init__(self, skip: int):
        self.skip, self.start, self.end = skip, None, None

    def on_train_batch_end(self, trainer, *args) -> None:
        now = time.perf_counter()
        if trainer.global_step == self.skip:
            self.start = now
        self.end = now

    @property
    def seconds(self) -> float:
        return self.end - self.start


def peak_tensor_mb(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Peak memory (MB) of the tensors live while `fn()` runs on `device` (CPU or CUDA), from the profiler's
    allocation events: what `fn` allocates (a forward, MAML's adaptation, a backward), not the weights already
    resident; the allocator's cache and other processes cannot skew it, unlike resident-set measures. Run it apart
    from timed calls (the profiler slows them)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    key = "self_device_memory_usage" if cuda else "self_cpu_memory_usage"
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += getattr(event, key)
        peak = max(peak, live)
    return peak / 2**20


def random_episodes(n: int, ways: int, shots: int, queries: int, size: int, channels: int = 3,
                    generator: torch.Generator | None = None) -> dict:
    """`n` random N-way K-shot episodes of size x size images with Q queries per class, in the data module's batch
    format: support [n, N*K, C, H, W] uint8, support_labels [n, N*K], query [n, N*Q, C, H, W] uint8, query_labels
    [n, N*Q], ways N. The same episodes for the same `generator` state (default: seed 0)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    def images(k):
        return torch.randint(0, 256, (n, ways * k, channels, size, size), dtype=torch.uint8, generator=gen)

    def labels(k):
        return torch.arange(ways).repeat_interleave(k).expand(n, -1).contiguous()

    return {"support": images(shots), "support_labels": labels(shots), "query": images(queries),
            "query_labels": labels(queries), "ways": ways}


def evaluate(model, batch: dict) -> Tensor:
    """Logits of a learner on a batch under inference_mode (an evaluation forward): [B, NQ, N] of episodes,
    [B, T, N] of streams (``EpisodicLearner.logits``)."""
    with torch.inference_mode():
        return model.logits(batch)


def optimizer_step(model, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    """One training step on a batch of episodes: ``model.loss_and_accuracy``, backward, optimiser step."""
    loss, _ = model.loss_and_accuracy(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _git(*args: str) -> str | None:
    """Output of ``git <args>`` in the folder of this package's checkout, None when git or the checkout is missing."""
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_and_machine() -> dict:
    """The commit of this package's checkout (and whether tracked files differed from it), the date (UTC), the
    hardware (CPU model, cores, cores this process may use, torch threads, GPU) and the versions of Python, torch
    and Lightning."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"commit": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "hardware": {"cpu": _cpu_model(), "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
                         "threads": torch.get_num_threads(), "gpu": gpu},
            "python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__}


def provenance(script: str, argv: list[str] | None = None) -> dict:
    """What produced a result: ``code_and_machine()`` and the command line (``python <script> <argv>``, the
    script relative to the checkout, argv default: this process's) with $TTT_META_THREADS."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        script = str(Path(script).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        pass
    return {**code_and_machine(), "command": shlex.join(["python", script, *argv]),
            "threads_env": os.environ.get("TTT_META_THREADS")}


def hardware_text(prov: dict) -> str:
    """One line for a table's caption: "AMD EPYC, 1 of 2 cores, 1 thread, torch 2.14.1" (GPU when there is one)."""
    hw = prov["hardware"]
    where = hw["gpu"] or f"{hw['cpu']}, {hw['cores_usable']} of {hw['cores']} cores"
    return f"{where}, {hw['threads']} thread{'s' * (hw['threads'] != 1)}, torch {prov['torch']}"


def write_results(out: Path | str, name: str, data: dict, markdown: str, prov: dict) -> Path:
    """Write ``<out>/<name>.json``: {"provenance": prov, "markdown": the table(s) as the README shows them, **data}.
    The only writer of result files (scripts/readme_tables.py copies "markdown" into the README)."""
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": prov, "markdown": markdown.strip() + "\n", **data}, indent=1) + "\n")
    return path


def printed_rows(rows: Iterable[dict]) -> list[dict]:
    """The measured `rows` as a list, each printed as a JSON line as soon as it is measured (progress)."""
    out = []
    for row in rows:
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (no trailing newline): the `header` cells, a rule, then one line per row (cells str())."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display): the one place that selects the backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path | str, dpi: int = 110) -> None:
    """Lay `fig` out tightly, write it to `path` (the format from its suffix) and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


# ----------------------------------------------------------------------------------------------- comparisons
THRESHOLDS = (0.95, 0.97, 0.98)  # validation accuracies whose training time a comparison reports


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def comparison_budget(meta: dict) -> str:
    """The training budget of each model, in words."""
    steps = meta.get("steps")
    if steps is None:
        return f"{meta['minutes']:g} min of training steps per model"
    if set(steps) == {""}:
        return f"{steps['']:,} training steps per model"
    return "training steps " + ", ".join(f"{model or 'every other model'} {n:,}" for model, n in steps.items())


INSTANCES_SHOWN = (1, 2, 3, 4, 5, 10)  # Santoro et al.'s columns of accuracy by instance


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def comparison_table(rows: list[dict], meta: dict, prov: dict) -> str:
    """A comparison (scripts/compare.py's rows and meta) as docs/ show it: caption, then one row per model."""
    at = any("scored_at" in r for r in rows)
    ttt = None if at else next((r for r in rows if r["model"] == "ttt_linear"), None)  # the cost reference, if any
    instances = [n for n in INSTANCES_SHOWN if all("by_instance" in r and n <= len(r["by_instance"]) for r in rows)]
    header = ["model", *(["scored at"] if at else []), "test acc % (95% CI)",
              *(f"{_ordinal(n)} instance" for n in instances), "best val acc %", "test ms / episode",
              *(["cost / TTT-Linear"] if ttt else []),
              *(f"s to {t:.0%} val" for t in THRESHOLDS), "train s", "train steps", "train episodes", "params"]
    partial = lambda r: f" (first {r['episodes']})" if r["episodes"] < meta["test_episodes"] else ""  # noqa: E731
    cells = [[r["model"], *([r["scored_at"]] if at else []),
              f"{100 * r['acc']:.2f} +- {100 * r['ci95']:.2f}{partial(r)}",
              *(f"{100 * r['by_instance'][n - 1]['acc']:.1f} +- {100 * r['by_instance'][n - 1]['ci95']:.1f}"
                for n in instances),
              f"{100 * r['best_val_acc']:.2f}",
              f"{r['test_ms_per_episode']:.1f}",
              *([f"{r['test_ms_per_episode'] / ttt['test_ms_per_episode']:.2f}x"] if ttt else []),
              *(_seconds(r["time_to"][f"{t:.0%}"]) for t in THRESHOLDS), f"{r['train_seconds']:.0f}",
              r["train_steps"], f"{r['train_episodes']:,}", f"{r['params']:,}"] for r in rows]
    scored = (f"{meta['test_episodes']} fixed test streams ({meta['instances']} instances per class, every step "
              f"scored)" if meta.get("protocol") == "online" else
              f"{meta['test_episodes']} fixed test episodes ({meta['queries']} queries per class)")
    caption = (f"{meta['dataset']} {meta['setting']}: {comparison_budget(meta)} "
               f"({hardware_text(prov)}); test: the best-validated checkpoint on {scored}, cost per episode in batches of "
               f"{meta['eval_batch_size']}. Commit {str(prov['commit'])[:10]}{' (dirty)' if prov['dirty'] else ''}, "
               f"{prov['date'][:10]}: `{prov['command']}`")
    return f"{caption}\n\n{markdown_table(header, cells)}\n"
