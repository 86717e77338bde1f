"""Checkpoints: written atomically, ``last.ckpt`` every few steps, and read back with clear errors.

- ``save_atomic`` / ``AtomicCheckpointIO``: torch.save into a temporary file beside the target, then rename it
  over the target, so a kill never leaves a truncated file in place of a good one. (Lightning's own writer
  stages the file in the system's temporary folder and moves it, which is a copy, not a rename, when that
  folder is another file system.)
- ``LastCheckpoint``: ``<dirpath>/last.ckpt`` every N optimiser steps, at the end, and when SIGINT or SIGTERM
  stops the run. A checkpoint holds the weights, optimiser, scheduler, loop progress and the data module's
  position in the episode stream, so ``fit --ckpt_path checkpoints/<run>/version_N/last.ckpt`` continues exactly
  where the run stopped.
- ``read_checkpoint`` / ``check_checkpoint``: a missing, damaged or mismatched checkpoint named as such.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .errors import MissingInput, UserError


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with local files written by ``save_atomic`` (remote URLs: Lightning's)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options}")
        save_atomic(checkpoint, path)


class LastCheckpoint(L.Callback):
    """Save ``dirpath/last.ckpt`` every `every_n_steps` optimiser steps, when training ends, and when a signal
    stops it.

    Stops use Lightning's signal connector: during training, SIGINT (Ctrl-C) is routed to Lightning's SIGTERM
    handler, which sets ``trainer.received_sigterm``; Lightning then raises ``SIGTERMException`` between two
    training batches (or at the next validation batch), and ``on_exception`` saves ``last.ckpt`` at that step
    and notes ``(path, step, signal)`` on the exception as ``saved``, for the CLI to print the resume command
    and exit non-zero. A second Ctrl-C stops at once, without saving.

    Args:
        dirpath: folder of the checkpoint (the CLI sets ``checkpoints/<run_name>/version_N``).
        every_n_steps: at most this many steps are lost when the run is killed.
    """

    def __init__(self, dirpath: str | None = None, every_n_steps: int = 100):
        if every_n_steps < 1:
            raise UserError(f"last_checkpoint.every_n_steps must be >= 1, got {every_n_steps}. Set it to 1 or more")
        self.dirpath, self.every_n_steps = dirpath, every_n_steps
        self._saved_step = -1
        self.stop_signal: int | None = None
        self._sigint_handler = None  # the SIGINT handler to restore after training

    def _save(self, trainer: L.Trainer, again: bool = False) -> None:
        """Save last.ckpt, unless it already holds this step (`again`: even then, e.g. after a validation that
        changed the best checkpoint and the callbacks' states since)."""
        if self.dirpath is None or trainer.global_step == self._saved_step and not again or trainer.sanity_checking:
            return
        trainer.save_checkpoint(str(Path(self.dirpath) / "last.ckpt"), weights_only=False)
        self._saved_step = trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        self.stop_signal = None
        lightning = signal.getsignal(signal.SIGTERM)  # installed by Lightning's signal connector before this hook
        if threading.current_thread() is not threading.main_thread() or not callable(lightning):
            return

        def note(signum, frame) -> None:
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C
            self.stop_signal = self.stop_signal or signum
            lightning(signum, frame)

        self._sigint_handler = signal.signal(signal.SIGINT, note)
        signal.signal(signal.SIGTERM, note)  # Lightning's teardown restores the SIGTERM handler it replaced

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._sigint_handler is not None:
            signal.signal(signal.SIGINT, self._sigint_handler)
            self._sigint_handler = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self._save(trainer)
            path = Path(self.dirpath) / "last.ckpt" if self._saved_step == trainer.global_step else None
            exception.saved = (path, trainer.global_step, self.stop_signal or signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, again=True)  # after the last validation: the final best checkpoint and callback states


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at `path`, or a clear error when it is missing, unreadable or not a checkpoint of this app."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"checkpoint {path} does not exist. Pass a checkpoint that a run wrote "
                           f"(checkpoints/<run_name>/version_N/last.ckpt or best-*.ckpt), or --ckpt_path last")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for damaged files
        raise UserError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); the file is damaged "
                         f"or not a checkpoint. Use another one (e.g. best-*.ckpt beside it) or train again") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"checkpoint {path} holds no 'state_dict': it is not a Lightning checkpoint of this app. "
                        f"Pass a checkpoint written by `python -m ttt_meta fit`")
    return ckpt


def check_checkpoint(path: str | os.PathLike, model: torch.nn.Module) -> dict:
    """The checkpoint at `path`, read once; a clear error when it cannot restore `model` (another model or
    shape), a warning for settings that differ without changing the weights' shapes (the configured ones win)."""
    ckpt = read_checkpoint(path)
    state, own = ckpt["state_dict"], model.state_dict()
    theirs, ours = ckpt.get("hyper_parameters") or {}, dict(getattr(model, "hparams", {}))
    theirs_class = str(theirs.get("_class_path", "?")).rsplit(".", 1)[-1]
    differ = [f"{k}: {theirs[k]!r} there, {ours[k]!r} here" for k in ours if k in theirs and theirs[k] != ours[k]]
    problems = [f"{k} missing" for k in own if k not in state][:3]
    problems += [f"unexpected {k}" for k in state if k not in own][:3]
    problems += [f"{k} is {tuple(state[k].shape)} there, {tuple(v.shape)} here" for k, v in own.items()
                 if k in state and state[k].shape != v.shape][:3]
    if problems:
        ours_class = type(model).__name__
        what = (f"a {theirs_class} of another shape than the configured one" if theirs_class == ours_class
                else f"a {theirs_class}, not the configured {ours_class}")
        raise UserError(f"checkpoint {path} holds {what}: {'; '.join(problems)}. Settings that differ: "
                         f"{'; '.join(differ) or 'none recorded'}. Use the config the checkpoint was trained with "
                         f"(its run's config.yaml under logs/) or a checkpoint of this model")
    if differ:
        warnings.warn(f"checkpoint {path} was trained with other settings, the configured ones are used: "
                      f"{'; '.join(differ)}")
    return ckpt
