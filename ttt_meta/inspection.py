"""What a run shows: TensorBoard views of test-time learning, ``InnerLoopMonitor`` (scalars, histograms,
figures) and ``ConfigLogger`` (the resolved config as hyperparameters and as text), and the test report,
``TestReport`` (``test_results.json``).

Tags (``<layer>`` is e.g. ``blocks.0.core``):
    ttt/<layer>/inner_loss_before, _after, _ratio   inner loss of the support tokens under W0 / the final state
    ttt/<layer>/eta_mean, eta_min, eta_max          inner learning rate of the writing tokens
    ttt/<layer>/state_change                        ||W_end - W0|| (all state tensors, mean over episodes)
    maml/support_loss_before, _after, _ratio        MAML: support loss before / after adaptation
    params/<name>                                   histograms: W0 (W1, W2), eta_gate, theta_kv/q/o weights
    val/episode                                     figure: one validation episode (or the start of a stream),
                                                    predictions, wrong ones red
    ttt/inner_loss_along_supports                   figure: per support token, loss under W0 and final state
    hp/val_acc, hp/test_acc                         the HPARAMS tab's metrics (last validation, test; absent
                                                    until logged)
    config                                          text: the resolved config
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams

from .data.episodes import first_episodes, targets
from .errors import UserError
from .measure import instance_numbers, pyplot

HISTOGRAMS = ("W0", "W1", "W2", "eta_gate.weight", "theta_kv.weight", "theta_q.weight", "theta_o.weight")


def _writers(trainer: L.Trainer) -> list:
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class InnerLoopMonitor(L.Callback):
    """Log what the test-time adaptation does, from tensors the forward pass already has.

    Args:
        every_n_steps: training steps between inner-loop scalars (the forward of that step records them).
        histogram_every_n_steps: training steps between parameter histograms.
        figures: each validation epoch, draw one episode with its predictions and the inner-loss curves.
    """

    def __init__(self, every_n_steps: int = 50, histogram_every_n_steps: int = 500, figures: bool = True):
        if every_n_steps < 1 or histogram_every_n_steps < 1:
            raise UserError("inspect.every_n_steps and inspect.histogram_every_n_steps must be >= 1. Set them to 1 "
                            "or more")
        self.every_n_steps, self.histogram_every_n_steps, self.figures = every_n_steps, histogram_every_n_steps, figures
        self._recording, self._episode = False, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._recording = trainer.global_step % self.every_n_steps == 0
        if self._recording:
            pl_module.record_inner_loop(True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._recording:
            stats = pl_module.inner_loop_stats()
            pl_module.record_inner_loop(False)
            for logger in trainer.loggers:  # straight to the loggers: every_n_steps, whatever log_every_n_steps
                logger.log_metrics({k: float(v) for k, v in stats.items()}, step)
        if (step - 1) % self.histogram_every_n_steps == 0:
            for writer in _writers(trainer):
                for name, p in pl_module.named_parameters():
                    if name.endswith(HISTOGRAMS):
                        writer.add_histogram(f"params/{name.removeprefix('model.')}", p.detach().float().cpu(), step)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self._episode = first_episodes(batch, 1)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        writers, episode, self._episode = _writers(trainer), self._episode, None
        if not (self.figures and writers and episode):
            return
        pl_module.record_inner_loop(True)
        probs = pl_module.logits(episode).softmax(-1)[0].float().cpu()
        curves = pl_module.inner_loss_curves() if hasattr(pl_module, "inner_loss_curves") else {}
        pl_module.record_inner_loop(False)
        draw = stream_figure if "stream" in episode else episode_figure
        figures = {"val/episode": draw(episode, probs)}
        if curves:
            figures["ttt/inner_loss_along_supports"] = curve_figure(curves)
        for writer in writers:
            for tag, fig in figures.items():
                writer.add_figure(tag, fig, trainer.global_step, close=False)
        for fig in figures.values():
            pyplot().close(fig)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val/acc" in trainer.callback_metrics:
            for logger in trainer.loggers:
                logger.log_metrics({"hp/val_acc": float(trainer.callback_metrics["val/acc"])}, trainer.global_step)

    def on_test_end(self, trainer, pl_module) -> None:
        if "test/acc" in trainer.callback_metrics:
            for logger in trainer.loggers:
                logger.log_metrics({"hp/test_acc": float(trainer.callback_metrics["test/acc"])}, trainer.global_step)


class TestReport(L.Callback):
    """After a test, ``test_results.json`` in the run's log folder: the mean accuracy over the fixed test
    episodes and its 95% interval (``EpisodicLearner.test_result``), the episodes each process scored (each
    episode counted once), the model with its settings, the checkpoint, and the episodes' spec; written by
    process 0, which also prints the accuracy line."""

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.episodes_here = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.episodes_here += len(targets(batch))

    def on_test_epoch_end(self, trainer, pl_module) -> None:  # collective calls: every process makes them
        count = torch.tensor(self.episodes_here, device=pl_module.device)
        self.episodes_per_process = pl_module.all_gather(count).flatten().tolist()
        self.log_dir = Path(trainer.log_dir or ".")

    def on_test_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        result, dm = pl_module.test_result, trainer.datamodule
        report = {**result, "episodes_per_process": self.episodes_per_process, "model": type(pl_module).__name__,
                  "hparams": dict(pl_module.hparams), "ckpt_path": trainer.ckpt_path}
        spec = getattr(dm, "eval_spec", None)
        if spec is not None:
            report.update(protocol=dm.hparams.protocol, **dataclasses.asdict(spec), dataset=dm.hparams.dataset,
                          test_seed=dm.hparams.test_seed)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / "test_results.json"
        path.write_text(json.dumps(report, indent=1, default=str))
        print(f"\ntest accuracy {100 * result['acc']:.2f} +- {100 * result['ci95']:.2f}% (95% CI, "
              f"{result['episodes']} episodes) -> {path}")
        if "by_instance" in result:
            print("by instance: " + ", ".join(f"{r['instance']}: {100 * r['acc']:.1f} +- {100 * r['ci95']:.1f}"
                                              for r in result["by_instance"]))


def _image_cells(axes, cells) -> None:
    """Draw (image uint8 [C, H, W], title, colour) cells on `axes`; a red cell gets a red frame."""
    for ax in axes.flat:
        ax.axis("off")
    for ax, cell in zip(axes.flat, cells):
        if cell is not None:
            img, title, color = cell
            ax.imshow(img.permute(1, 2, 0).squeeze(-1).cpu(), cmap="gray")
            ax.set_title(title, fontsize=7, color=color)
            if color == "red":
                ax.axis("on"), ax.set_xticks([]), ax.set_yticks([])
                for side in ax.spines.values():
                    side.set_color("red"), side.set_linewidth(2)


def stream_figure(episode: dict, probs: torch.Tensor, columns: int = 10, rows: int = 3):
    """The first steps of a stream in order: each image with its instance number (#), predicted (p) and true (t)
    label; wrong ones in red. episode: a batch of one stream (uint8 images); probs [T, N]."""
    plt = pyplot()
    images, labels = episode["stream"][0][: rows * columns], targets(episode)[0][: rows * columns]
    instance = instance_numbers(targets(episode))[0]
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.9, rows * 1.1), squeeze=False)
    _image_cells(axes, [(img, f"#{int(n)} p={int(p)} t={int(y)}", "black" if p == y else "red")
                        for img, y, p, n in zip(images, labels, probs.argmax(-1), instance)])
    fig.tight_layout()
    return fig


def episode_figure(episode: dict, probs: torch.Tensor, columns: int = 10):
    """Supports with their labels, then queries with predicted (p) and true (t) labels; wrong ones in red.
    episode: a batch of one episode (uint8 images); probs [NQ, N]. At most 2 rows of each."""
    plt = pyplot()
    support, query = episode["support"][0][: 2 * columns], episode["query"][0][: 2 * columns]
    s_rows, q_rows = -(-len(support) // columns), -(-len(query) // columns)
    fig, axes = plt.subplots(s_rows + q_rows, columns, figsize=(columns * 0.9, (s_rows + q_rows) * 1.1),
                             squeeze=False)
    cells = [(img, f"y={int(y)}", "black") for img, y in zip(support, episode["support_labels"][0])]
    cells += [None] * (s_rows * columns - len(cells))
    for img, y, p in zip(query, episode["query_labels"][0], probs.argmax(-1)):
        cells.append((img, f"p={int(p)} t={int(y)}", "black" if p == y else "red"))
    _image_cells(axes, cells)
    fig.tight_layout()
    return fig


def curve_figure(curves: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """One panel per TTT layer: inner loss of each support token under W0 and under the final state."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3), squeeze=False)
    for ax, (name, (before, after)) in zip(axes[0], curves.items()):
        ax.plot(before.float().cpu(), label="W0")
        ax.plot(after.float().cpu(), label="final state")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("support token")
        ax.set_ylabel("inner loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


class ConfigLogger(SaveConfigCallback):
    """Writes config.yaml into the run's folder (Lightning's behaviour) and logs the resolved config to
    TensorBoard: flattened as hyperparameters with hp/val_acc and hp/test_acc as their metrics, and as text."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        flat = {}

        def walk(prefix: str, value) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

        walk("", self.config.as_dict())
        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # the HPARAMS tab's metrics are declared here and get values only when a validation or a test
                # logs them (Lightning's log_hyperparams would also log them as 0 at step 0)
                for summary in hparams(flat, {"hp/val_acc": float("nan"), "hp/test_acc": float("nan")}):
                    logger.experiment.file_writer.add_summary(summary)
                logger.experiment.add_text("config", "    " + text.replace("\n", "\n    "))
