"""EpisodicLearner: what every few-shot learner shares (loss, metrics, the model/data contract, the optimiser).

A subclass implements ``forward(batch) -> logits [B, N*Q, N]`` for a batch of episodes (see
``ttt_meta.data.episodes``), and, to learn online, ``stream_logits(batch) -> [B, T, N]`` for a batch of streams
(the logits of step t read images 0..t and labels 0..t-1 only); ``logits(batch)`` calls the one the batch asks
for. Images arrive as uint8 and ``images()`` turns them into floats in [0, 1]. A learner declares the episodes it
can score with ``ways_served()``; ``check_data`` (once per run) and ``predict`` hold data and folders of images
to that.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import CatMetric, MeanMetric

from ..data.episodes import StreamSpec, targets
from ..errors import TrainingDiverged, UserError
from ..measure import accuracy_by_instance, confidence_interval, episode_accuracy


LR_SCHEDULES = ("cosine", "constant")
_NONE = 2**62  # "no such step" for the device-side first non-finite step


class EpisodicLearner(L.LightningModule):
    """Base of the learners: cross-entropy on the queries, accuracy, AdamW with warm-up and cosine decay.

    Every argument of a subclass's ``__init__`` (which calls this one first) is saved as a hyperparameter, so a
    checkpoint records the learner it holds.

    Args:
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps, then the `lr_schedule`.
        lr_schedule: "cosine": decay to 0 at the run's last step (trainer.max_steps); "constant": the peak rate
            after the warm-up, for runs stopped by a time budget and extended later (``scripts/compare.py``).
    """

    reads_label_ids = False  # whether forward uses a batch's label_ids (data.label_space)
    learns_online = False  # whether it implements stream_logits (data.protocol: online)

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 200,
                 lr_schedule: str = "cosine"):
        super().__init__()
        if lr <= 0:
            raise UserError(f"model lr must be > 0, got {lr}. Set model.init_args.lr to a positive number")
        if lr_schedule not in LR_SCHEDULES:
            raise UserError(f"unknown lr_schedule {lr_schedule!r}. Set model.init_args.lr_schedule to one of "
                            f"{list(LR_SCHEDULES)}")
        self.save_hyperparameters(logger=False)  # the subclass's arguments too; the CLI logs the whole config
        # nan_strategy "disable": the default NaN check reads every update back from the device
        self.train_acc, self.val_acc, self.val_loss = (MeanMetric(nan_strategy="disable") for _ in range(3))
        self.test_acc = CatMetric()  # per-episode accuracies, gathered across processes
        self.test_acc_by_instance = CatMetric()  # streams: per-stream accuracies on the 1st..S-th instances [n, S]

    def ways_served(self) -> tuple[int, int | None]:
        """(fewest, most) ways of the episodes this learner can score; most None: any number."""
        return 2, None

    def serves(self, ways: int) -> bool:
        """Whether this learner can score `ways`-way episodes (``ways_served``)."""
        fewest, most = self.ways_served()
        return fewest <= ways and (most is None or ways <= most)

    def ways_text(self) -> str:
        """``ways_served()`` in words: "exactly 5 ways", "at most 20 ways", "any number of ways"."""
        fewest, most = self.ways_served()
        return "any number of ways" if most is None else f"exactly {most} ways" if fewest == most else \
            f"at most {most} ways"

    ways_fix = ""  # how to make the model serve more ways (the message's last sentence)

    def check_data(self, datamodule) -> None:
        """The model/data contract: a UserError naming the options to change when the data module's images do not
        have this model's shape (in_channels, image_size), its episodes (data.ways[_up_to], data.eval_ways) or label ids
        (data.label_space) ask for ways the model does not serve, or it draws label ids for a model that reads none."""
        hp, label_space = self.hparams, datamodule.hparams.label_space
        if isinstance(datamodule.eval_spec, StreamSpec) and not self.learns_online:
            raise UserError(f"{type(self).__name__} cannot learn from a stream (data.protocol: online). Use a learner "
                            f"that can (SequenceMetaLearner, OnlineProtoNetLearner, MAMLLearner) or data.protocol: batch")
        if label_space and not self.reads_label_ids:
            raise UserError(f"data.label_space has no effect on {type(self).__name__} (its classes have no label "
                            f"ids). Remove data.label_space")
        shape = datamodule.image_shape
        if shape is not None and shape != (hp.in_channels, hp.image_size, hp.image_size):
            raise UserError(f"the data gives {shape[0]}x{shape[1]}x{shape[2]} images but the model reads "
                             f"{hp.in_channels}x{hp.image_size}x{hp.image_size}. Set model.init_args.in_channels: "
                             f"{shape[0]} and model.init_args.image_size: {shape[1]} (or data.image_size)")
        train_ways = {spec.ways for spec in datamodule.train_specs}
        asked = sorted({min(train_ways), max(train_ways), datamodule.eval_spec.ways, label_space or 0} - {0})
        if not all(map(self.serves, asked)):
            raise UserError(f"the data asks for {'- and '.join(map(str, asked))}-way episodes or label ids "
                            f"(data.ways, data.eval_ways, data.label_space) but this {type(self).__name__} serves "
                            f"{self.ways_text()}. {self.ways_fix}")

    def record_inner_loop(self, on: bool) -> None:
        """Keep (on) or stop keeping what the next forwards' test-time adaptation did, for inner_loop_stats."""

    def inner_loop_stats(self) -> dict[str, Tensor]:
        """Scalars about the last recorded forward's adaptation, by TensorBoard tag (none by default)."""
        return {}

    @staticmethod
    def images(x: Tensor) -> Tensor:
        return x.float().div_(255)

    def stream_logits(self, batch: dict) -> Tensor:
        """Logits [B, T, N] of a batch of streams, step t from images 0..t and labels 0..t-1."""
        raise UserError(f"{type(self).__name__} cannot learn from a stream (data.protocol: online)")

    def logits(self, batch: dict) -> Tensor:
        """The logits of a batch: of its queries [B, N*Q, N] (episodes, ``forward``), of its steps [B, T, N]
        (streams, ``stream_logits``)."""
        return self.stream_logits(batch) if "stream" in batch else self(batch)

    def loss_and_accuracy(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(cross-entropy of the queries, or of a stream's steps, and the per-episode accuracy [B]) of a batch:
        every step's work."""
        logits, y = self.logits(batch), targets(batch)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()), episode_accuracy(logits, y)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, acc = self.loss_and_accuracy(batch)
        self.note_if_not_finite(loss)
        self.train_acc(acc)
        n = len(acc)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        return loss

    def note_if_not_finite(self, loss: Tensor) -> None:
        """Keep, on the loss's device, the first step whose training loss is NaN or infinite (no value is read
        back: a training step never waits for the device). ``stop_if_diverged`` reads it."""
        if getattr(self, "_first_bad_step", None) is None or self._first_bad_step.device != loss.device:
            self._first_bad_step = torch.full((), _NONE, dtype=torch.long, device=loss.device)
        bad_now = torch.where(torch.isfinite(loss.detach()), _NONE, self.global_step)
        self._first_bad_step = torch.minimum(self._first_bad_step, bad_now)

    def stop_if_diverged(self) -> None:
        """Stop the run (every process) if some process had a non-finite training loss since the run started.
        Called when the logger reads the loss anyway (every trainer.log_every_n_steps steps) and before any
        checkpoint is written, so no checkpoint ever holds the weights such a step produced."""
        first = getattr(self, "_first_bad_step", None)
        step = int(first) if first is not None else _NONE  # the one read back, at a log step or checkpoint write
        if self.trainer.strategy.reduce_boolean_decision(step != _NONE, all=False):
            where = f"at step {step}" if step != _NONE else "in another process"
            raise TrainingDiverged(
                f"the training loss was not finite {where}: the run stopped before it wrote a checkpoint of those "
                f"weights, and the last good state is in the run's last.ckpt. Lower model.init_args.lr, keep "
                f"trainer.gradient_clip_val, or resume from last.ckpt with a smaller learning rate")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.stop_if_diverged()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self.stop_if_diverged()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, acc = self.loss_and_accuracy(batch)
        self.val_loss(loss, weight=len(acc))
        self.val_acc(acc)
        self.log("val/loss", self.val_loss, on_epoch=True, batch_size=len(acc))
        self.log("val/acc", self.val_acc, prog_bar=True, on_epoch=True, batch_size=len(acc))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        logits, y = self.logits(batch), targets(batch)
        self.test_acc.update(episode_accuracy(logits, y))
        if "stream" in batch:
            self.test_acc_by_instance.update(accuracy_by_instance(logits, y))

    def on_test_epoch_end(self) -> None:
        """test/acc, test/ci95 and test/episodes over every process's episodes, each once, and for streams the
        accuracy on the s-th instances (test/acc_instance_<s>, test/ci95_instance_<s>); also kept as
        ``test_result`` for the report (``inspection.TestReport``)."""
        acc = self.test_acc.compute().float().flatten()
        self.test_acc.reset()
        mean, ci = confidence_interval(acc)
        self.test_result = {"acc": mean, "ci95": ci, "episodes": acc.numel()}
        logged = {"test/acc": mean, "test/ci95": ci, "test/episodes": float(acc.numel())}
        if self.test_acc_by_instance.update_count:
            by_instance = self.test_acc_by_instance.compute().float()  # [n, S]
            self.test_acc_by_instance.reset()
            self.test_result["by_instance"] = []
            for s, column in enumerate(by_instance.T, start=1):
                mean, ci = confidence_interval(column[~column.isnan()])
                self.test_result["by_instance"].append({"instance": s, "acc": mean, "ci95": ci})
                logged.update({f"test/acc_instance_{s}": mean, f"test/ci95_instance_{s}": ci})
        self.log_dict(logged, sync_dist=False)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        constant = hp.lr_schedule == "constant"
        steps = self.trainer.estimated_stepping_batches
        if not constant and not math.isfinite(steps):
            raise UserError("the cosine learning-rate schedule decays to 0 at the run's last step, but this run has "
                            "no step limit. Set trainer.max_steps, or model.init_args.lr_schedule: constant")
        total = 1 if constant else max(1, int(steps))

        def schedule(step: int) -> float:
            warm = min(1.0, (step + 1) / max(1, hp.warmup_steps))
            return warm if constant else warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                                                   "interval": "step"}}
