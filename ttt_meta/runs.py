"""Budgeted runs for the scripts: build a model from a config, train it for a budget (or reload what an earlier
run left), and score it on the fixed test episodes.

- ``build(config, overrides, run_name)``: the model, data module and trainer of ``configs/...yaml`` plus
  ``key=value`` overrides, nothing run (``ttt_meta.cli.main(args, run=False)``); a fit of it first takes its
  version for good (``TTTMetaCLI.claim_version``), as the command line's does.
- ``Budget``: a step count, or seconds turned into steps from the measured step time (so every learning-rate
  schedule runs to its end), or no training (``--from-checkpoints``); ``add_budget_arguments`` gives a script
  those options and ``--override``.
- ``train(config, run_name, overrides, budget)``: trains (``checkpoints/<run_name>/version_N``), or loads the
  newest ``last.ckpt`` of the run name.
- ``TrainingClock`` and ``train_for(config, run_name, overrides, seconds)``: a run trained for a budget of
  training time (the steps' wall time, kept in its checkpoints), continued by a later call with a larger budget
  through the exact resume of its newest ``last.ckpt``; with its validation curve (step, seconds, accuracy).
- ``training_precision(model)``: the trainer precision the scripts train a model at, its fastest here.
- ``score(model, datamodule, device)``: per-episode accuracy on the fixed test episodes with its 95% interval,
  the evaluation time per episode and the peak memory of scoring one episode.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from .checkpointing import check_checkpoint, read_checkpoint
from .cli import TTTMetaCLI, newest_last_checkpoint
from .cli import main as cli_main
from .errors import MissingInput
from .data.episodes import first_episodes, targets
from .measure import (accuracy_by_instance, code_and_machine, confidence_interval, episode_accuracy, evaluate,
                      median_seconds, optimizer_step, peak_tensor_mb, timed_call)


def build(config: Path | str, overrides: list[str] = (), run_name: str | None = None,
          resume: Path | None = None) -> TTTMetaCLI:
    """The run of `config` with `overrides` (``key=value``, e.g. ``data.dataset=synthetic``) built, not run: no
    progress bar, no model summary, no time limit; named `run_name` (default: the config's name); in the version
    folder of `resume` when its fit is to continue that checkpoint of the run."""
    args = ["--config", str(config), "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.max_time=null", *([f"--run_name={run_name}"] if run_name else [])]
    return cli_main(args + [f"--{o}" for o in overrides], run=False, resume=resume)


# slower in bf16 autocast on CPU (step_seconds under autocast, 1 thread: 0.93 vs 0.83 s per MAML 5w1s step)
FLOAT32 = ("maml", "metasgd")


def has_bf16() -> bool:
    """Whether bf16 arithmetic is native here: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_precision(model: str) -> str:
    """Trainer precision of the experiment model `model` (configs/<dataset>/<model>_<setting>.yaml) in the scripts:
    bf16 autocast where bf16 arithmetic is native, except MAML and Meta-SGD (FLOAT32)."""
    return "32-true" if model in FLOAT32 or not has_bf16() else "bf16-mixed"


def step_seconds(cli: TTTMetaCLI, steps: int = 8) -> float:
    """Median seconds of a training step (forward, backward, optimiser; the batch already loaded) of `cli`'s model
    on its training episodes, over `steps` steps after 2 warm-up steps. The optimiser's lr is 0: nothing changes."""
    model, dm = cli.model, cli.datamodule
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    batches = iter([next(loader) for _ in range(steps + 2)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    model.train()
    return median_seconds(lambda: optimizer_step(model, optimizer, next(batches)), repeats=steps, warmup=2)


@dataclass(frozen=True)
class Budget:
    """Training per model: `steps`, else `seconds` turned into steps, or none at all (`from_checkpoints`)."""

    seconds: float | None = None
    steps: int | None = None
    from_checkpoints: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Budget:
        """The budget of the options ``add_budget_arguments`` adds."""
        return cls(args.budget_seconds, args.budget_steps, args.from_checkpoints)

    def describe(self, per: str = "") -> str:
        """``trained earlier (--from-checkpoints)``, ``N steps<per>`` or ``S s<per>``."""
        if self.from_checkpoints:
            return "trained earlier (--from-checkpoints)"
        return f"{self.steps} steps{per}" if self.steps else f"{self.seconds:.0f} s{per}"


def add_budget_arguments(parser: argparse.ArgumentParser, default_seconds: float | None = None,
                         run_names: str = "<run_name>") -> None:
    """--budget-seconds | --budget-steps | --from-checkpoints (one required unless `default_seconds`), and
    --override key=value ... (config overrides for every model). `run_names` names the runs in the help."""
    budget = parser.add_mutually_exclusive_group(required=default_seconds is None)
    budget.add_argument("--budget-seconds", type=float, default=default_seconds,
                        help="training time per model (turned into a step count from the measured step time)")
    budget.add_argument("--budget-steps", type=int, help="training steps per model")
    budget.add_argument("--from-checkpoints", action="store_true",
                        help=f"no training: score the newest checkpoints/{run_names}/version_N/last.ckpt of an "
                             f"earlier run")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides key=value for every model")


def train(config: Path, run_name: str, overrides: list[str], budget: Budget) -> tuple[TTTMetaCLI, dict]:
    """(the run, {"train_steps", "train_seconds"}): `config` trained within `budget` as run `run_name`, or with
    ``budget.from_checkpoints`` the newest ``last.ckpt`` of `run_name` loaded (train_seconds NaN)."""
    if budget.from_checkpoints:
        cli = build(config, overrides, run_name)
        ckpt = check_checkpoint(newest_last_checkpoint(run_name), cli.model)
        cli.model.load_state_dict(ckpt["state_dict"])
        return cli, {"train_steps": ckpt["global_step"], "train_seconds": float("nan")}
    steps = budget.steps or max(1, int(budget.seconds / step_seconds(build(config, overrides, run_name))))
    cli = build(config, [*overrides, f"trainer.max_steps={steps}", "trainer.max_epochs=-1"], run_name)
    cli.claim_version()
    seconds = timed_call(lambda: cli.trainer.fit(cli.model, cli.datamodule))[1]
    return cli, {"train_steps": steps, "train_seconds": seconds}


class TrainingClock(L.Callback):
    """The training time of a run, its validation curve and who trained it; stops the run at `budget_seconds` of
    training time or at `budget_steps` optimiser steps, whichever comes first (None: no such limit).

    ``seconds`` sums the wall time of the training steps (forward, backward, optimiser step: from
    ``on_train_batch_start`` to ``on_train_batch_end``; no validation, no checkpoint writes), so the budget does
    not depend on how often a run validates (on a GPU the host runs ahead of the device, so a step's span ends
    when its work is queued; the sum catches up at the next read, at the latest at each validation). When it reaches the budget the run stops, after a last validation
    (Lightning validates when a callback stops a fit). ``curve`` holds {"step", "seconds", "val_acc"} of each
    validation, ``segments`` the provenance of each fit that trained the run (from step / seconds). All three are
    saved in the run's checkpoints, so a fit resumed from ``last.ckpt`` continues them.
    """

    def __init__(self, budget_seconds: float | None = None, budget_steps: int | None = None):
        self.budget_seconds, self.budget_steps = budget_seconds, budget_steps
        self.seconds, self.curve, self.segments = 0.0, [], []
        self._started = None

    def reached(self, step: int) -> bool:
        """Whether a run at optimiser step `step` with this clock's seconds has its budget."""
        return (self.budget_seconds is not None and self.seconds >= self.budget_seconds
                or self.budget_steps is not None and step >= self.budget_steps)

    def on_train_start(self, trainer, pl_module) -> None:
        self.segments.append({"from_step": trainer.global_step, "from_seconds": self.seconds, **code_and_machine()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self._started
        if self.reached(trainer.global_step):
            trainer.should_stop = True

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or "val/acc" not in trainer.callback_metrics:
            return
        point = {"step": trainer.global_step, "seconds": round(self.seconds, 3),
                 "val_acc": float(trainer.callback_metrics["val/acc"])}
        if not self.curve or self.curve[-1]["step"] != point["step"]:
            self.curve.append(point)

    def state_dict(self) -> dict:
        return {"seconds": self.seconds, "curve": self.curve, "segments": self.segments}

    def load_state_dict(self, state: dict) -> None:
        self.seconds, self.curve, self.segments = state["seconds"], list(state["curve"]), list(state["segments"])


def callback_state(ckpt: dict, kind: type) -> dict:
    """The state a checkpoint holds for the callback of class `kind` (Lightning keys it by class name and args)."""
    return next((v for k, v in ckpt.get("callbacks", {}).items() if k.split("{")[0] == kind.__name__), {})


def train_for(config: Path, run_name: str, overrides: list[str], seconds: float | None, val_every_seconds: float,
              steps: int | None = None) -> tuple[TTTMetaCLI, TrainingClock, int]:
    """(the run with its best checkpoint's weights loaded, its clock, that checkpoint's step): `config` trained as run
    `run_name` until its TrainingClock reaches `seconds` of training time or `steps` optimiser steps (None: no such
    limit), validating every `val_every_seconds` of wall time. A run of that name that an earlier call left (its
    newest ``last.ckpt``) is continued exactly (same version folder) when it has not reached the budget, and only
    reloaded when it has."""
    try:
        last = newest_last_checkpoint(run_name)
    except MissingInput:
        last = None
    if seconds is None and steps is None:
        raise ValueError("train_for needs a budget: seconds, steps or both")
    clock = TrainingClock(seconds, steps)
    saved = read_checkpoint(last) if last is not None else None
    if saved is not None:
        clock.load_state_dict(callback_state(saved, TrainingClock))
    every = max(1, round(val_every_seconds))
    interval = f"{every // 86400:02d}:{every // 3600 % 24:02d}:{every // 60 % 60:02d}:{every % 60:02d}"  # DD:HH:MM:SS
    cli = build(config, [*overrides, "trainer.max_steps=-1", "trainer.max_epochs=-1",
                         f"trainer.val_check_interval={interval}"], run_name, resume=last)
    if saved is None or not clock.reached(saved["global_step"]):
        cli.trainer.callbacks.insert(0, clock)
        cli.claim_version()
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=last, weights_only=False)
        last = Path(cli.config.last_checkpoint.dirpath) / "last.ckpt"  # its own, not a concurrent run's
        saved = read_checkpoint(last)
    best = Path(callback_state(saved, ModelCheckpoint).get("best_model_path") or last)
    if not best.is_file():  # a last.ckpt written before the final validation replaced the best (save_top_k=1)
        best = max(last.parent.glob("best-*.ckpt"), key=lambda path: path.stat().st_mtime, default=last)
    ckpt = check_checkpoint(best, cli.model)
    cli.model.load_state_dict(ckpt["state_dict"])
    return cli, clock, int(ckpt["global_step"])


def score(model, dm, device: torch.device, first: int | None = None) -> dict:
    """Accuracy on `dm`'s fixed test episodes, or on the `first` of them (mean of the per-episode accuracies, 95%
    interval), the wall time of the evaluation forward (adaptation included) per episode and episodes per second,
    and the peak memory (MB) of the tensors scoring one test episode allocates (measured after the timed pass,
    ``test_episode_peak_mem_mb``); for streams also the accuracy
    on the s-th instances of the classes, s = 1..S (``by_instance``: instance, acc, ci95)."""
    dm.setup("test")
    model.eval().to(device)
    accs, by_instance, seconds, episodes = [], [], 0.0, 0
    for batch in dm.test_dataloader():
        if first is not None and episodes >= first:
            break
        keep = len(targets(batch)) if first is None else first - episodes
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in first_episodes(batch, keep).items()}
        logits, took = timed_call(lambda: evaluate(model, batch), device)
        seconds += took
        episodes += len(logits)
        accs.append(episode_accuracy(logits, targets(batch)).cpu())
        if "stream" in batch:
            by_instance.append(accuracy_by_instance(logits, targets(batch)).cpu())
    mean, ci = confidence_interval(torch.cat(accs))
    result = {"acc": mean, "ci95": ci, "episodes": episodes, "test_ms_per_episode": 1000 * seconds / episodes,
              "test_episodes_per_s": episodes / seconds,
              # one episode: the profiler keeps every event, and a batch of MAML streams held tens of GB of them
              "test_episode_peak_mem_mb": peak_tensor_mb(lambda: evaluate(model, first_episodes(batch, 1)), device)}
    if by_instance:
        columns = torch.cat(by_instance).T  # [S, n]
        result["by_instance"] = [dict(zip(("acc", "ci95"), confidence_interval(c[~c.isnan()])), instance=s)
                                 for s, c in enumerate(columns, start=1)]
    return result
