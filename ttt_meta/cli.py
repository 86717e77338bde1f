"""Command line: ``python -m ttt_meta fit|validate|test|predict`` (LightningCLI, and ``ttt_meta.predict``).

Every run of a name (``run_name``, default the config file's name) gets its own version N: TensorBoard logs in
``logs/<run_name>/version_N/`` and checkpoints in ``checkpoints/<run_name>/version_N/`` (the best by validation
accuracy, and ``last.ckpt`` every ``last_checkpoint.every_n_steps`` steps), so a second run never touches the
first one's files; a run takes N for good when it starts (``reserve_version``), so runs started at once (a sweep)
never share one, and resolving a config writes nothing. ``--ckpt_path last`` means the newest ``last.ckpt`` of the
run name; ``fit`` from a checkpoint of ``checkpoints/<run_name>/version_N/`` continues version N (its logs too).
``test`` and ``validate`` log into a version of their own; ``test`` writes ``test_results.json`` (mean accuracy
and 95% interval) into it (``inspection.TestReport``). Before anything is written, the data, the episodes and any
``--ckpt_path`` are checked against the model, once (``TTTMetaCLI.check_inputs``). A config file may begin with
``compose: [PART, ...]``: its parts (paths relative to it, each possibly composed itself) are merged first, in
order, then its own keys (``composed``). A user's mistake ends as one line, ``error: ...``, with exit status 2
(``TTT_META_DEBUG=1`` shows the traceback); SIGINT or SIGTERM during ``fit`` saves ``last.ckpt`` and prints the
command that resumes it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from .checkpointing import LastCheckpoint, check_checkpoint
from .data.datamodule import EpisodeDataModule
from .errors import MissingInput, UserError
from .inspection import ConfigLogger, InnerLoopMonitor, TestReport
from .learners import EpisodicLearner
from .quiet import silence_library_notices

PROGRAM = "python -m ttt_meta"
HELP = f"""usage: {PROGRAM} {{fit,validate,test,predict}} [--config FILE] [options]

ttt_meta: few-shot meta-learning with Test-Time Training layers (a whole episode is one sequence), on Lightning.

subcommands:
  fit        train a model on episodes: {PROGRAM} fit --config configs/quickstart.yaml
  validate   score a checkpoint on the fixed validation episodes (--config FILE --ckpt_path CKPT)
  test       score a checkpoint on the fixed test episodes: accuracy with its 95% interval (--ckpt_path CKPT)
  predict    classify your own images with a checkpoint (--ckpt_path CKPT --support DIR --query DIR)

'{PROGRAM} SUBCOMMAND --help' lists a subcommand's options; '--print_config' shows a resolved config.
Runs write logs/<run_name>/version_N/ (TensorBoard: tensorboard --logdir logs) and checkpoints/<run_name>/version_N/.
"""
LIGHTNING_CKPT_NAMES = ("best", "hpc", "registry")  # --ckpt_path values that Lightning resolves itself
VERSION_ROOTS = ("logs", "checkpoints")  # a run's version folders: <root>/<run_name>/version_N


def set_threads() -> int:
    """Set torch's intra-op threads to $TTT_META_THREADS, else to every core; returns the count (the one place
    that decides it, for the CLI, the scripts and the tests)."""
    torch.set_num_threads(int(os.environ.get("TTT_META_THREADS") or os.cpu_count() or 1))
    return torch.get_num_threads()


def run_versions(folder: Path) -> dict[int, Path]:
    """{N: folder/version_N} of the version folders in `folder` (``logs/<run_name>`` or ``checkpoints/<run_name>``)."""
    found = (re.fullmatch(r"version_(\d+)", p.name) for p in folder.glob("version_*") if p.is_dir())
    return {int(m.group(1)): folder / m.group(0) for m in found if m}


def next_version(run_name: str) -> int:
    """1 + the largest N of ``logs/<run_name>/version_N`` and ``checkpoints/<run_name>/version_N`` (0 when none)."""
    return 1 + max([n for root in VERSION_ROOTS for n in run_versions(Path(root) / run_name)], default=-1)


def reserve_version(run_name: str, roots: tuple[str, ...] = VERSION_ROOTS) -> int:
    """A new version N of `run_name`, taken for this process alone: the first N from ``next_version`` on for which
    this call creates ``<root>/<run_name>/version_N`` for every root of `roots` (``os.mkdir``, atomic: of runs that
    start at once, one creates the folder and the others find it there). A folder that exists belongs to another
    run, so N goes on to N + 1; an empty folder this call made for an N it could not take whole is removed again,
    nothing else is."""
    version = next_version(run_name)
    while True:
        made = []
        try:
            for root in roots:
                folder = Path(root) / run_name / f"version_{version}"
                folder.parent.mkdir(parents=True, exist_ok=True)
                folder.mkdir()
                made.append(folder)
            return version
        except FileExistsError:
            for folder in made:
                folder.rmdir()
            version += 1


def _logger(run_name: str, version: int) -> dict:
    """The TensorBoard logger of version `version` of `run_name` (``logs/<run_name>/version_N``), as a config."""
    return {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "logs", "name": run_name, "version": version, "default_hp_metric": False}}


def newest_last_checkpoint(run_name: str) -> Path:
    """``checkpoints/<run_name>/version_N/last.ckpt`` of the largest N that has one (what ``--ckpt_path last``
    means)."""
    saved = {n: f / "last.ckpt" for n, f in run_versions(Path("checkpoints") / run_name).items()
             if (f / "last.ckpt").is_file()}
    if not saved:
        raise MissingInput(f"found no last.ckpt of the run {run_name!r} under checkpoints/{run_name}/. Train it "
                           f"first, pass the --run_name of another run, or give a checkpoint file")
    return saved[max(saved)]


def _relative(path: str | Path) -> str:
    """`path` relative to the working folder when it lies inside it (for commands a user copies). Not resolved: a
    virtual environment's python is a link to the base interpreter."""
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def invocation() -> str:
    """How to run this app again from the working folder: ``python -m ttt_meta`` when ``python`` on the PATH is
    this interpreter (an activated environment), else this interpreter's path (``.venv/bin/python -m ttt_meta``)."""
    on_path = shutil.which("python")
    if on_path is not None and Path(on_path).absolute() == Path(sys.executable).absolute():
        return "python -m ttt_meta"
    return f"{_relative(sys.executable)} -m ttt_meta"


def _config_parts(path: Path, seen: tuple[Path, ...] = ()) -> list[str]:
    """The ``--config`` values that `path` stands for: its compose parts (recursively), then its own keys as a
    JSON string; just `path` when it is no mapping with a ``compose`` list (jsonargparse then reads it)."""
    try:
        document = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        document = None  # jsonargparse reports it
    if not isinstance(document, dict) or "compose" not in document:
        return [str(path)]
    parts = document.pop("compose")
    if not isinstance(parts, list) or not all(isinstance(part, str) for part in parts):
        raise UserError(f"{path}: compose must be a list of config files, got {parts!r}. Write it as "
                        f"compose: [../model/ttt_linear.yaml, ../data/omniglot_5w1s.yaml]")
    values = []
    for part in parts:
        part_path = path.parent / part
        if not part_path.is_file():
            raise MissingInput(f"{path} composes {part}, which is not a file ({part_path}). Fix that entry of its "
                               f"compose list")
        if part_path.resolve() in seen:
            raise UserError(f"{path} composes {part}, which composes {path} again. Remove the cycle")
        values += _config_parts(part_path, (*seen, path.resolve()))
    return values + ([json.dumps(document)] if document else [])


def composed(args: list[str]) -> tuple[list[str], list[Path]]:
    """`args` with every ``--config FILE`` replaced by ``--config`` options for FILE's compose parts and then its
    own keys (jsonargparse merges several configs in order, a later one overriding an earlier one), and the
    config files as given (a run is named after the last one)."""
    out, given, i = [], [], 0
    while i < len(args):
        if args[i] in ("--config", "-c") and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif args[i].startswith("--config="):
            value, i = args[i].split("=", 1)[1], i + 1
        else:
            out.append(args[i])
            i += 1
            continue
        given.append(Path(value))
        out += [f"--config={part}" for part in _config_parts(Path(value))]
    return out, given


def _without_ckpt_path(args: list[str]) -> list[str]:
    """`args` less any ``--ckpt_path X`` / ``--ckpt_path=X``."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            out.append(arg)
    return out


def _sentence(message: str) -> str:
    message = message.strip()
    return message if message.endswith((".", "!", "?")) else message + "."


def _debug() -> bool:
    return os.environ.get("TTT_META_DEBUG", "") not in ("", "0")


class ArgumentParser(LightningArgumentParser):
    """A parse error (unknown option, wrong type) as one paragraph, ``error: ...``, and exit status 2."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or _debug():
            return super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        print(f"error: {_sentence(message)} Run '{prog} --help' for the options.", file=sys.stderr)
        raise SystemExit(2)


class TTTMetaCLI(LightningCLI):
    """LightningCLI with run names and versions, checks before anything is written, and a summary after fit.

    Args:
        command_args: the subcommand's arguments as the user gave them (for the commands printed after a fit).
        config_files: the config files the user gave, before composition (the run's default name is the last's).
        resume: for a build without a subcommand (``main(run=False)``), the checkpoint its fit will continue
            (what ``fit --ckpt_path`` is for the subcommand): a checkpoint of this run name continues its version.
    """

    def __init__(self, *args, command_args: list[str] = (), config_files: list[Path] = (),
                 resume: str | Path | None = None, **kwargs):
        self.command_args, self.config_files, self.resume = list(command_args), list(config_files), resume
        super().__init__(*args, **kwargs)

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
        the checkpoint against the model once it is built (``TTTMetaCLI.check_inputs``). Lightning offers no public switch
        for this, and its own way overrides even the options given on the command line, silently."""

    @property
    def run_config(self):
        """The config of the run: the subcommand's, or the whole one of a build without a subcommand."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        """Name the run, resolve ``--ckpt_path last``, and pick its version N: the resumed one, or the next free one,
        which ``claim_version`` takes for good when the run starts (nothing is written here)."""
        cfg = self.run_config
        name = cfg.run_name or (self.config_files[-1].stem if self.config_files else "run")
        cfg.run_name = name
        checkpoints = Path("checkpoints") / name
        if cfg.get("ckpt_path") == "last":
            cfg.ckpt_path = str(newest_last_checkpoint(name))
        versions, self.version = run_versions(checkpoints), None
        if self.subcommand == "fit" or self.subcommand is None and self.resume is not None:
            resume = cfg.get("ckpt_path") or self.resume
            foreign = sorted(p.name for p in checkpoints.iterdir()
                             if p not in versions.values()) if checkpoints.is_dir() else []
            if foreign and cfg.checkpoint.dirpath is None:
                raise UserError(f"{checkpoints}/ holds files outside version_N folders ({', '.join(foreign[:3])}), "
                                f"and a run never writes beside files it did not make. Pass another --run_name, or "
                                f"move those files into a version_N folder of their own")
            if resume:  # resuming a checkpoint of this run name continues its version
                resumed = Path(resume).resolve().parent
                self.version = next((n for n, folder in versions.items() if folder.resolve() == resumed), None)
        self.claimed = self.version is not None  # a resumed version is the run's already
        if self.version is None:
            self.version = next_version(name)
        self.own_logger = cfg.trainer.logger is None or cfg.trainer.logger is True
        self.own_checkpoints = cfg.checkpoint.dirpath is None
        if self.own_checkpoints:
            cfg.checkpoint.dirpath = str(checkpoints / f"version_{self.version}")
        if cfg.last_checkpoint.dirpath is None:
            cfg.last_checkpoint.dirpath = cfg.checkpoint.dirpath
        if self.own_logger:
            cfg.trainer.logger = _logger(name, self.version)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:  # jsonargparse buries a class's own message in a list of union subtypes
            if isinstance(error.__cause__, UserError):
                raise error.__cause__ from None
            raise

    def check_inputs(self) -> None:
        """The model/data contract, checked once per run before the trainer writes anything (Lightning's own
        set-up creates the log folder before any hook could): the ``--ckpt_path`` to load against the configured
        model, then the data (loaded once, ``EpisodeDataModule.prepare_data``) against the model
        (``EpisodicLearner.check_data``)."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path is not None and ckpt_path not in LIGHTNING_CKPT_NAMES:
            check_checkpoint(ckpt_path, self.model)
        self.datamodule.prepare_data()
        self.model.check_data(self.datamodule)

    def claim_version(self) -> None:
        """Take the run's new version for good just before the trainer writes anything. Process 0 reserves it
        (``reserve_version``; its node and local rank are 0 under any launcher, before the processes meet), the
        next free one when a run that started meanwhile took the one resolved before; every other process takes
        process 0's when the trainer sets up (``SameVersion``). Nothing when the run resumes a version."""
        fit = self.subcommand in ("fit", None)  # a build without a subcommand is for a fit (``ttt_meta.runs``)
        roots = ("logs",) * self.own_logger + ("checkpoints",) * (self.own_checkpoints and fit)
        if self.claimed or not roots:
            return
        self.claimed = True
        if self.trainer.node_rank == 0 and self.trainer.local_rank == 0:
            self.use_version(reserve_version(self.run_config.run_name, roots))
        self.trainer.callbacks.insert(0, SameVersion(self))

    def use_version(self, version: int) -> None:
        """Make `version` the run's: the logger and the checkpoint folders that the CLI named, and the config."""
        if version == self.version:
            return
        cfg = self.run_config
        if self.own_logger:
            logger = cfg.trainer.logger = _logger(cfg.run_name, version)
            self.trainer.logger = TensorBoardLogger(**logger["init_args"])
        if self.own_checkpoints:
            taken, folder = (Path("checkpoints") / cfg.run_name / f"version_{v}" for v in (self.version, version))
            for callback in self.trainer.callbacks:
                if isinstance(callback, ModelCheckpoint | LastCheckpoint) and callback.dirpath is not None \
                        and os.path.realpath(callback.dirpath) == os.path.realpath(taken):
                    callback.dirpath = os.path.realpath(folder)
            for key in ("checkpoint", "last_checkpoint"):
                if cfg[key].dirpath == str(taken):
                    cfg[key].dirpath = str(folder)
        self.version = version

    def start(self) -> None:
        """Before a subcommand runs: ``check_inputs``, then ``claim_version``."""
        self.check_inputs()
        self.claim_version()

    before_fit = before_validate = before_test = start

    def after_fit(self) -> None:
        """What the run left and what to do next: best and last checkpoints, the test command, TensorBoard."""
        if not self.trainer.is_global_zero:
            return
        best = self.trainer.checkpoint_callback
        last = Path(self.config.fit.last_checkpoint.dirpath) / "last.ckpt"
        args = _without_ckpt_path(self.command_args)
        lines = ["", f"run {self.config.fit.run_name}, version {self.trainer.logger.version}, "
                     f"step {self.trainer.global_step}:"]
        if best is not None and best.best_model_path:
            lines.append(f"  best validation accuracy {100 * float(best.best_model_score):.2f}%: "
                         f"{_relative(best.best_model_path)}")
        if last.is_file():
            lines.append(f"  last checkpoint: {_relative(last)}")
        target = best.best_model_path if best is not None and best.best_model_path else last
        lines += [f"  test it:      {invocation()} test {shlex.join([*args, '--ckpt_path', _relative(target)])}",
                  "  TensorBoard:  tensorboard --logdir logs"]
        print("\n".join(lines))


class SameVersion(L.Callback):
    """At set-up, once the processes have met, every process takes process 0's version with its logger and
    checkpoint folders (``TTTMetaCLI.use_version``): under torchrun the others resolved theirs on their own."""

    def __init__(self, cli: TTTMetaCLI):
        self.cli = cli

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.cli.use_version(trainer.strategy.broadcast(self.cli.version))


def main(args: list[str] | None = None, run: bool = True, resume: str | Path | None = None):
    """Parse `args` (default: the command line) and run the subcommand; with run=False, `args` hold no
    subcommand and the model, data module and trainer are only built (``cli.model``, ``cli.datamodule``, ...),
    in the version folder of the checkpoint `resume` when its fit will continue one of this run name.
    ``predict`` goes to ``ttt_meta.predict.main``. A signal during ``fit`` exits with status 128 + its number
    after saving last.ckpt."""
    set_threads()
    silence_library_notices()
    argv = sys.argv[1:] if args is None else list(args)
    if run and (not argv or argv[0] in ("-h", "--help")):
        print(HELP, end="", file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    if run and argv[0] == "predict":
        from .predict import main as predict

        return predict(argv[1:])
    parser_kwargs = {"prog": PROGRAM, "description": HELP.split("\n")[2]}
    if run:
        parser_kwargs.update({sub: {"prog": f"{PROGRAM} {sub}"} for sub in TTTMetaCLI.subcommands()})
    parsed, config_files = composed(argv)
    try:
        return TTTMetaCLI(
            EpisodicLearner, EpisodeDataModule, subclass_mode_model=True, seed_everything_default=0,
            trainer_defaults={"callbacks": [LearningRateMonitor(logging_interval="step"), TestReport()],
                              "max_epochs": 20,
                              "gradient_clip_val": 1.0, "log_every_n_steps": 25,
                              "use_distributed_sampler": False,  # the data module shards episodes by rank itself
                              "plugins": {"class_path": "ttt_meta.checkpointing.AtomicCheckpointIO"}},
            save_config_callback=ConfigLogger, save_config_kwargs={"overwrite": True}, parser_class=ArgumentParser,
            parser_kwargs=parser_kwargs,
            args=parsed, run=run, auto_configure_optimizers=False, command_args=argv[1:] if run else argv,
            config_files=config_files, resume=resume)
    except SIGTERMException as stop:  # SIGTERM or SIGINT in fit: LastCheckpoint saved and noted it
        if not hasattr(stop, "saved"):
            raise
        path, step, signum = stop.saved
        if rank_zero_only.rank == 0 and path is None:
            print(f"\nstopped by {signal.Signals(signum).name} before the first training step: nothing to resume",
                  file=sys.stderr)
        elif rank_zero_only.rank == 0:
            print(f"\nstopped by {signal.Signals(signum).name} at step {step}; saved {_relative(path)}. Resume with:\n"
                  f"  {invocation()} fit {shlex.join([*_without_ckpt_path(argv[1:]), '--ckpt_path', _relative(path)])}",
                  file=sys.stderr)
        raise SystemExit(128 + signum) from None


def command_line(entry=None) -> None:
    """``python -m ttt_meta`` (or a script's `entry` function): a UserError ends as ``error: <message>`` on stderr
    with exit status 2 and no traceback (unless TTT_META_DEBUG=1); any other exception keeps its traceback."""
    try:
        (entry or main)()
    except UserError as error:
        if _debug():
            raise
        print(f"error: {_sentence(str(error))}", file=sys.stderr)
        raise SystemExit(2) from None
