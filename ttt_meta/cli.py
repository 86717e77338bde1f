"""Command line: ``python -m ttt_meta fit|validate|test --config FILE`` (LightningCLI).

Defaults: TensorBoard runs under ``logs/<run_name>/``, checkpoints under ``checkpoints/<run_name>/`` (the best
by validation accuracy, and ``last.ckpt`` every ``last_checkpoint.every_n_steps`` steps), a fixed seed.
``run_name`` defaults to the config file's name. ``test`` writes ``test_results.json`` (mean accuracy and 95%
interval) into the run's log folder. Before anything runs or is written, the data, the episodes and any
``--ckpt_path`` are checked against the model, with errors that say what to change.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .checkpointing import AtomicCheckpointIO, LastCheckpoint, check_checkpoint
from .data.datamodule import EpisodeDataModule
from .inspection import ConfigLogger, InnerLoopMonitor
from .learners import EpisodicLearner


class TTTMetaCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate, test; ``predict`` is this app's own (``ttt_meta.predict``), not Trainer.predict."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Name of the run's log and checkpoint folders (default: the config file's name).")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/acc", "checkpoint.mode": "max",
                             "checkpoint.filename": "best-{step}-{val/acc:.4f}",
                             "checkpoint.auto_insert_metric_name": False, "checkpoint.save_last": False})
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(InnerLoopMonitor, "inspect")

    def _parse_ckpt_path(self) -> None:
        """Nothing: the config defines the model and the checkpoint gives its weights. (Lightning would rebuild the
        model from the checkpoint's settings, silently replacing the configured ones.) ``_check_inputs`` checks
        the checkpoint against the model once it is built."""

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        configs = [Path(str(c)) for c in (cfg.get("config") or [])]
        name = cfg.run_name or (configs[-1].stem if configs else "run")
        cfg.run_name = name
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = str(Path("checkpoints") / name)
        if cfg.last_checkpoint.dirpath is None:
            cfg.last_checkpoint.dirpath = cfg.checkpoint.dirpath
        if cfg.trainer.logger is None or cfg.trainer.logger is True:
            cfg.trainer.logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": "logs", "name": name, "default_hp_metric": False}}

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:  # jsonargparse buries a class's own message in a list of union subtypes
            if isinstance(error.__cause__, ValueError):
                raise error.__cause__ from None
            raise

    def _check_inputs(self, stage: str) -> None:
        """Data, episodes, model and checkpoint checked before the trainer runs or writes anything."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path not in (None, "last", "best", "hpc", "registry"):  # a file, not one of Lightning's names
            check_checkpoint(ckpt_path, self.model)
        self.datamodule.prepare_data()
        self.datamodule.setup(stage)
        self.model.check_data(self.datamodule)

    def before_fit(self) -> None:
        self._check_inputs("fit")

    def before_validate(self) -> None:
        self._check_inputs("validate")

    def before_test(self) -> None:
        self._check_inputs("test")


def main(args: list[str] | None = None, run: bool = True):
    """Parse `args` (default: the command line) and run the subcommand; with run=False, `args` hold no
    subcommand and the model, data module and trainer are only built (``cli.model``, ``cli.datamodule``, ...).
    ``predict`` goes to ``ttt_meta.predict.main``."""
    torch.set_num_threads(int(os.environ.get("TTT_META_THREADS", os.cpu_count() or 1)))
    argv = sys.argv[1:] if args is None else args
    if run and argv[:1] == ["predict"]:
        from .predict import main as predict

        return predict(argv[1:])
    return TTTMetaCLI(
        EpisodicLearner, EpisodeDataModule, subclass_mode_model=True, seed_everything_default=0,
        trainer_defaults={"callbacks": [LearningRateMonitor(logging_interval="step")], "max_epochs": 20,
                          "gradient_clip_val": 1.0, "log_every_n_steps": 25,
                          "use_distributed_sampler": False,  # the data module shards episodes by rank itself
                          "plugins": [AtomicCheckpointIO()]},
        save_config_callback=ConfigLogger, save_config_kwargs={"overwrite": True}, args=args, run=run, auto_configure_optimizers=False)
