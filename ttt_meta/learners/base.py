"""EpisodicLearner: what every few-shot learner shares (loss, metrics, the test report, the optimiser).

A subclass implements ``forward(batch) -> logits [B, N*Q, N]`` for a batch of episodes (see
``ttt_meta.data.episodes``); images arrive as uint8 and ``images()`` turns them into floats in [0, 1].
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import CatMetric, MeanMetric

from ..errors import TrainingDiverged, UserError
from ..measure import confidence_interval, episode_accuracy


class EpisodicLearner(L.LightningModule):
    """Base of the learners: cross-entropy on the queries, accuracy, AdamW with warm-up and cosine decay.

    Every argument of a subclass's ``__init__`` (which calls this one first) is saved as a hyperparameter, so a
    checkpoint records the learner it holds.

    Args:
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps, then cosine decay to 0 at the last step of the run.
    """

    reads_label_ids = False  # whether forward uses a batch's label_ids (data.label_space)

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 200):
        super().__init__()
        if lr <= 0:
            raise UserError(f"model lr must be > 0, got {lr}. Set model.init_args.lr to a positive number")
        self.save_hyperparameters(logger=False)  # the subclass's arguments too; the CLI logs the whole config
        self.train_acc, self.val_acc, self.val_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.test_acc = CatMetric()  # per-episode accuracies, gathered across processes

    def check_data(self, datamodule) -> None:
        """Raise a clear ValueError when this model cannot serve the data module's episodes (subclasses add
        their own checks): the images must have the model's in_channels and image_size."""
        shape, hp = getattr(datamodule, "image_shape", None), self.hparams
        if getattr(getattr(datamodule, "hparams", None), "label_space", None) and not self.reads_label_ids:
            raise UserError(f"data.label_space has no effect on {type(self).__name__} (its classes have no label "
                            f"ids). Remove data.label_space")
        if shape is not None and "image_size" in hp and shape != (hp.in_channels, hp.image_size, hp.image_size):
            raise UserError(f"the data gives {shape[0]}x{shape[1]}x{shape[2]} images but the model reads "
                             f"{hp.in_channels}x{hp.image_size}x{hp.image_size}. Set model.init_args.in_channels: "
                             f"{shape[0]} and model.init_args.image_size: {shape[1]} (or data.image_size)")

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.datamodule is not None:
            self.check_data(self.trainer.datamodule)

    def record_inner_loop(self, on: bool) -> None:
        """Keep (on) or stop keeping what the next forwards' test-time adaptation did, for inner_loop_stats."""

    def inner_loop_stats(self) -> dict[str, Tensor]:
        """Scalars about the last recorded forward's adaptation, by TensorBoard tag (none by default)."""
        return {}

    @staticmethod
    def images(x: Tensor) -> Tensor:
        return x.float().div_(255)

    def loss_and_accuracy(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(cross-entropy of the queries, per-episode accuracy [B]) of a batch of episodes: every step's work."""
        logits = self(batch)
        y = batch["query_labels"]
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()), episode_accuracy(logits, y)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, acc = self.loss_and_accuracy(batch)
        self.stop_if_not_finite(loss)
        self.train_acc(acc)
        n = len(acc)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        return loss

    def stop_if_not_finite(self, loss: Tensor) -> None:
        """Stop the run (every process) before a NaN or infinite loss reaches the weights."""
        bad = self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False)
        if bad:
            raise TrainingDiverged(
                f"the training loss is {loss.item()} at step {self.global_step}: the run stopped before it reached the "
                f"weights, and the last good state is in the run's last.ckpt. Lower model.init_args.lr, keep "
                f"trainer.gradient_clip_val, or resume from last.ckpt with a smaller learning rate")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, acc = self.loss_and_accuracy(batch)
        self.val_loss(loss, weight=len(acc))
        self.val_acc(acc)
        self.log("val/loss", self.val_loss, on_epoch=True, batch_size=len(acc))
        self.log("val/acc", self.val_acc, prog_bar=True, on_epoch=True, batch_size=len(acc))

    def on_test_epoch_start(self) -> None:
        self.test_episodes_here = 0  # this process's share, reported per process

    def test_step(self, batch: dict, batch_idx: int) -> None:
        _, acc = self.loss_and_accuracy(batch)
        self.test_acc.update(acc)
        self.test_episodes_here += len(acc)

    def on_test_epoch_end(self) -> None:
        acc = self.test_acc.compute().float().flatten()  # every process's episodes, each once
        self.test_acc.reset()
        per_process = self.all_gather(torch.tensor(self.test_episodes_here, device=self.device)).flatten().tolist()
        mean, ci = confidence_interval(acc)
        self.log_dict({"test/acc": mean, "test/ci95": ci, "test/episodes": float(acc.numel())}, sync_dist=False)
        log_dir = Path(self.trainer.log_dir or ".")  # a collective call under DDP: every process asks
        if self.trainer.is_global_zero:
            self.write_test_report(log_dir, mean, ci, acc.numel(), per_process)

    def write_test_report(self, log_dir: Path, mean: float, ci: float, episodes: int, per_process: list[int]) -> None:
        dm = self.trainer.datamodule
        spec = getattr(dm, "eval_spec", None)
        report = {"acc": mean, "ci95": ci, "episodes": episodes, "episodes_per_process": per_process,
                  "model": type(self).__name__,
                  "hparams": dict(self.hparams), "ckpt_path": self.trainer.ckpt_path}
        if spec is not None:
            report.update(ways=spec.ways, shots=spec.shots, queries=spec.queries, dataset=dm.hparams.dataset,
                          test_seed=dm.hparams.test_seed)
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_dir / "test_results.json"
        path.write_text(json.dumps(report, indent=1, default=str))
        print(f"\ntest accuracy {100 * mean:.2f} +- {100 * ci:.2f}% (95% CI, {episodes} episodes) -> {path}")

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def schedule(step: int) -> float:
            warm = min(1.0, (step + 1) / max(1, hp.warmup_steps))
            return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                                                   "interval": "step"}}
