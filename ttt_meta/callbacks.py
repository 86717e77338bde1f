"""LastCheckpoint: ``<dirpath>/last.ckpt`` every few optimiser steps, so an interrupted run loses little.

Lightning writes checkpoints atomically (serialised in memory, then written through a file-system transaction:
a temporary file renamed over the old one), and on rank 0 only. The checkpoint holds the weights, optimiser,
scheduler, loop progress and the data module's position in the episode stream, so
``fit --ckpt_path checkpoints/<run>/last.ckpt`` continues exactly where the run stopped.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L


class LastCheckpoint(L.Callback):
    """Save ``dirpath/last.ckpt`` every `every_n_steps` optimiser steps and when training ends.

    Args:
        dirpath: folder of the checkpoint (the CLI sets ``checkpoints/<run_name>``).
        every_n_steps: at most this many steps are lost when the run is killed.
    """

    def __init__(self, dirpath: str | None = None, every_n_steps: int = 100):
        if every_n_steps < 1:
            raise ValueError(f"last_checkpoint.every_n_steps must be >= 1, got {every_n_steps}")
        self.dirpath, self.every_n_steps = dirpath, every_n_steps
        self._saved_step = -1

    def _save(self, trainer: L.Trainer) -> None:
        if self.dirpath is None or trainer.global_step == self._saved_step or trainer.sanity_checking:
            return
        trainer.save_checkpoint(str(Path(self.dirpath) / "last.ckpt"))
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)
