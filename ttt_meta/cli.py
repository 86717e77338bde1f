"""Command line: ``python -m ttt_meta fit|validate|test --config FILE`` (LightningCLI).

Defaults: TensorBoard runs under ``logs/<run_name>/``, checkpoints under ``checkpoints/<run_name>/`` (the best
by validation accuracy and ``last.ckpt``), a fixed seed. ``run_name`` defaults to the config file's name.
``test`` writes ``test_results.json`` (mean accuracy and 95% interval) into the run's log folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .data.datamodule import EpisodeDataModule
from .learners import EpisodicLearner


class TTTMetaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Name of the run's log and checkpoint folders (default: the config file's name).")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/acc", "checkpoint.mode": "max", "checkpoint.save_last": True,
                             "checkpoint.filename": "best-{step}-{val/acc:.4f}",
                             "checkpoint.auto_insert_metric_name": False})

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        configs = [Path(str(c)) for c in (cfg.get("config") or [])]
        name = cfg.run_name or (configs[-1].stem if configs else "run")
        cfg.run_name = name
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = str(Path("checkpoints") / name)
        if cfg.trainer.logger is None or cfg.trainer.logger is True:
            cfg.trainer.logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": "logs", "name": name}}


def main(args: list[str] | None = None, run: bool = True) -> TTTMetaCLI:
    """Parse `args` (default: the command line) and run the subcommand; with run=False, `args` hold no
    subcommand and the model, data module and trainer are only built (``cli.model``, ``cli.datamodule``, ...)."""
    torch.set_num_threads(int(os.environ.get("TTT_META_THREADS", os.cpu_count() or 1)))
    return TTTMetaCLI(
        EpisodicLearner, EpisodeDataModule, subclass_mode_model=True, seed_everything_default=0,
        trainer_defaults={"callbacks": [LearningRateMonitor(logging_interval="step")], "max_epochs": 20,
                          "gradient_clip_val": 1.0, "log_every_n_steps": 25},
        save_config_kwargs={"overwrite": True}, args=args, run=run, auto_configure_optimizers=False)
