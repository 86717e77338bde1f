"""A callback for signal tests, loaded by a ``python -m ttt_meta fit`` subprocess (tests/ on PYTHONPATH): at a
chosen point it writes ``<folder>/ready`` and waits until a signal has reached Lightning's signal connector, so
the test's signal lands at that point. It changes no computation."""

import time
from pathlib import Path

import lightning as L


class SignalGate(L.Callback):
    """Args: at: "train" (after training step `step`) or "validation" (after the first validation batch
    following step `step`); folder: where ``ready`` is written."""

    def __init__(self, at: str = "train", step: int = 3, folder: str = "."):
        self.at, self.step, self.folder = at, step, Path(folder)

    def _wait(self, trainer) -> None:
        (self.folder / "ready").touch()
        deadline = time.monotonic() + 60
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.at == "train" and trainer.global_step == self.step:
            self._wait(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.at == "validation" and batch_idx == 0 and trainer.global_step >= self.step and not trainer.sanity_checking:
            self._wait(trainer)
