"""``python -m ttt_meta`` as a user meets it, run as a subprocess: help, user errors as one line with exit
status 2, a quiet start, the summary after a fit, runs that keep their own versions, and clean stops on a
signal that resume bitwise."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUICK, TINY, run_cli

ROOT = Path(__file__).parents[1]
SHIPPED = ROOT / "checkpoints" / "omniglot" / "ttt_linear_5w1s.ckpt"
NOISE = ["Gym has been unmaintained", "Unable to serialize", "litlogger", "LeafSpec", "has `__len__` defined",
         "`weights_only` was not set", "Traceback", "Warning"]


def ttt_meta(folder: Path, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m ttt_meta ARGS`` in `folder`, a process started from nothing."""
    env = {**os.environ, "TTT_META_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent), **(env or {})}
    return subprocess.run([sys.executable, "-m", "ttt_meta", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ttt_meta_forked(cases: list[tuple[Path, list[str]]], meet_before: str | None = None
                    ) -> list[subprocess.CompletedProcess]:
    """``python -m ttt_meta ARGS`` in `folder` for each (folder, ARGS), each in a process of its own, all at once,
    forked from one that has imported ttt_meta (``forked_cli.py``): seconds instead of a minute for a dozen.
    `meet_before` (``module:function``): each process calls it only once all of them have reached it."""
    meet = {"meet_before": meet_before} if meet_before else {}
    lines = "".join(json.dumps({"args": args, "cwd": str(folder), **meet}) + "\n" for folder, args in cases)
    env = {**os.environ, "TTT_META_THREADS": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("forked_cli.py"))], input=lines, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return [subprocess.CompletedProcess(args, r["returncode"], r["stdout"], r["stderr"])
            for (_, args), r in zip(cases, map(json.loads, done.stdout.splitlines()), strict=True)]


def test_help_names_the_program_and_all_subcommands(forked_runs):
    done = forked_runs["--help"][0]
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m ttt_meta")
    for sub in ("fit", "validate", "test", "predict"):
        assert f"\n  {sub} " in done.stdout
    assert "Lightning Trainer command line tool" not in done.stdout


def _fake_checkpoint(path: Path, hparams: dict | None) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, **({"hyper_parameters": hparams} if hparams else {})}, path)
    return path


# (arguments, words the message must hold); {tmp} is the test's folder
USER_ERRORS = [
    (["fit", "--config", QUICK, "--data.shots=0"], ["shots >= 1", "data.shots"]),
    (["fit", "--config", QUICK, "--model.init_args.core=gru"], ["unknown core 'gru'", "model.init_args.core"]),
    (["fit", "--config", QUICK, "--data.dataset=cifar"], ["unknown data.dataset 'cifar'"]),
    (["fit", "--config", QUICK, "--data.no_such_key=1"], ["no_such_key", "--help"]),
    (["fit", "--config", "{tmp}/missing.yaml"], ["missing.yaml", "does not exist"]),
    (["fit", "--config", QUICK, "--data.dataset=omniglot", "--data.root={tmp}/no_data"], ["Omniglot not found",
                                                                                           "data.root"]),
    (["test", "--config", QUICK, "--ckpt_path", "{tmp}/nope.ckpt"], ["nope.ckpt does not exist"]),
    (["test", "--config", QUICK, "--ckpt_path", "{tmp}/damaged.ckpt"], ["cannot be read", "damaged"]),
    (["test", "--config", QUICK, "--ckpt_path", str(SHIPPED)], ["another shape", "width: 128 there, 64 here"]),
    (["test", "--config", QUICK, "--ckpt_path", "last"], ["no last.ckpt of the run 'quickstart'"]),
    (["fit", "--config", QUICK, "--run_name=mine"], ["checkpoints/mine/ holds files outside version_N folders", "--run_name"]),
    (["predict", "--ckpt_path", "{tmp}/no_class.ckpt", "--support", "{tmp}", "--query", "{tmp}"],
     ["does not record its model class"]),
    (["predict", "--ckpt_path", str(SHIPPED), "--support", "{tmp}/none", "--query", "{tmp}/none"],
     ["must both be folders"]),
]


@pytest.fixture(scope="module")
def forked_runs(tmp_path_factory) -> dict:
    """Every USER_ERRORS case, and --help, run as ``python -m ttt_meta`` in a folder of its own:
    {first word (or "--help"): (completed process, folder, its files before)}."""
    cases = [*USER_ERRORS, (["--help"], ["--help"])]
    folders, befores = [], []
    for i in range(len(cases)):
        folder = tmp_path_factory.mktemp(f"case{i}")
        (folder / "damaged.ckpt").write_bytes(b"not a checkpoint")
        _fake_checkpoint(folder / "no_class.ckpt", None)
        (folder / "checkpoints" / "mine").mkdir(parents=True)
        (folder / "checkpoints" / "mine" / "my_model.ckpt").write_bytes(b"a user's own file")
        folders.append(folder)
        befores.append(sorted(p.relative_to(folder) for p in folder.rglob("*")))
    done = ttt_meta_forked([(f, [a.format(tmp=f) for a in args]) for f, (args, _) in zip(folders, cases)])
    return {words[0]: run for (_, words), run in zip(cases, zip(done, folders, befores))}


@pytest.mark.parametrize("words", [w for _, w in USER_ERRORS], ids=[w[0] for _, w in USER_ERRORS])
def test_user_error_is_one_line_without_traceback(forked_runs, words):
    done, folder, before = forked_runs[words[0]]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and error[0] == done.stderr.strip().splitlines()[-1], done.stderr
    for word in words:
        assert word in done.stderr
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # nothing written


def test_debug_brings_the_traceback_back(tmp_path):
    done = ttt_meta(tmp_path, "fit", "--config", QUICK, "--model.init_args.core=gru", env={"TTT_META_DEBUG": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr and "unknown core" in done.stderr


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_quiet_fit_summary_versions_and_resume(tmp_path, capsys):
    """A quiet first fit that says what to do next; a second fit of the same name is version 1 and leaves version
    0's files alone; --ckpt_path last scores the newest; resuming version 0 continues its folders."""
    fit = ["fit", "--config", QUICK, *TINY, "--trainer.max_steps=4"]
    first = ttt_meta(tmp_path, *fit)
    assert first.returncode == 0, first.stderr
    for noise in NOISE:
        assert noise not in first.stdout + first.stderr, noise
    v0 = tmp_path / "checkpoints" / "quickstart" / "version_0"
    best = next(v0.glob("best-*.ckpt"))
    assert "best validation accuracy" in first.stdout and str(best.relative_to(tmp_path)) in first.stdout
    assert "last checkpoint: checkpoints/quickstart/version_0/last.ckpt" in first.stdout
    test_line = next(line for line in first.stdout.splitlines() if " -m ttt_meta test " in line)
    assert "tensorboard --logdir logs" in first.stdout

    v0_files = {p: p.read_bytes() for p in v0.iterdir()}
    run_cli(tmp_path, fit)  # the same config again
    assert {p: p.read_bytes() for p in v0.iterdir()} == v0_files  # untouched
    assert (tmp_path / "checkpoints" / "quickstart" / "version_1" / "last.ckpt").is_file()
    assert (tmp_path / "logs" / "quickstart" / "version_1").is_dir()

    # the printed test command works as printed (its path is the best checkpoint of version 0)
    capsys.readouterr()
    run_cli(tmp_path, shlex.split(test_line.split(" -m ttt_meta ", 1)[1]))
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "95% CI" in printed and "test_results.json" in printed
    run_cli(tmp_path, ["test", "--config", QUICK, *TINY, "--ckpt_path", "last"])
    assert any("version_1/last.ckpt" in p.read_text()
               for p in (tmp_path / "logs" / "quickstart").glob("version_*/test_results.json"))

    run_cli(tmp_path, [*fit[:-1], "--trainer.max_steps=6", "--ckpt_path", str(v0 / "last.ckpt")])
    assert _state(v0 / "last.ckpt")["global_step"] == 6
    assert len(list((tmp_path / "logs" / "quickstart" / "version_0").glob("events.out.tfevents.*"))) == 2
    versions = sorted(p.name for p in (tmp_path / "checkpoints" / "quickstart").iterdir())
    assert versions == ["version_0", "version_1"]  # a resume makes no new version


def test_fits_started_at_once_take_versions_of_their_own(tmp_path):
    """Two fits of one config, in two processes that reach the version reservation at the same moment (a sweep
    started with ``&``): versions 0 and 1, each with its own intact checkpoints, TensorBoard events and config."""
    fit = ["fit", "--config", QUICK, *TINY, "--trainer.max_steps=4"]
    done = ttt_meta_forked([(tmp_path, fit)] * 2, meet_before="ttt_meta.cli:reserve_version")
    assert all(d.returncode == 0 for d in done), [d.stderr[-2000:] for d in done]
    said = sorted(int(re.search(r"run quickstart, version (\d+)", d.stdout).group(1)) for d in done)
    found = {root: {p.name: sorted(f.name for f in p.iterdir()) for p in (tmp_path / root / "quickstart").iterdir()}
             for root in ("checkpoints", "logs")}
    listing = [f"{root}/quickstart/{v}: {', '.join(files)}" for root, runs in found.items()
               for v, files in runs.items()]
    print(f"\ntwo fits at once: versions said {said}; " + "; ".join(sorted(listing)))
    assert said == [0, 1] and sorted(found["checkpoints"]) == sorted(found["logs"]) == ["version_0", "version_1"]
    for n in (0, 1):
        folder = f"checkpoints/quickstart/version_{n}"
        assert _state(tmp_path / folder / "last.ckpt")["global_step"] == 4
        assert len([f for f in found["checkpoints"][f"version_{n}"] if f.startswith("best-")]) == 1
        assert len([f for f in found["logs"][f"version_{n}"] if f.startswith("events.out.tfevents.")]) == 1
        config = yaml.safe_load((tmp_path / "logs" / "quickstart" / f"version_{n}" / "config.yaml").read_text())
        assert config["checkpoint"]["dirpath"] == config["last_checkpoint"]["dirpath"] == folder
        assert config["trainer"]["logger"]["init_args"]["version"] == n


def test_version_taken_meanwhile_is_skipped(tmp_path, monkeypatch):
    """Resolving a config writes nothing; ``reserve_version`` creates both folders of a version or goes on: a
    version whose log folder another run created after the listing, or whose checkpoint folder exists, is skipped,
    and only what it made itself for a skipped version is removed again."""
    from ttt_meta import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["--config", QUICK], run=False).config.checkpoint.dirpath == "checkpoints/quickstart/version_0"
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(cli, "run_versions", lambda folder: {})  # listed before the other runs made their folders
    (tmp_path / "logs" / "r" / "version_0").mkdir(parents=True)
    (tmp_path / "checkpoints" / "r" / "version_1").mkdir(parents=True)
    assert [cli.reserve_version("r"), cli.reserve_version("r")] == [2, 3]
    assert sorted(p.name for p in (tmp_path / "logs" / "r").iterdir()) == ["version_0", "version_2", "version_3"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "r").iterdir()) == ["version_1", "version_2",
                                                                                  "version_3"]


def test_hparams_metrics_are_not_logged_as_zero(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_cli(tmp_path, ["fit", "--config", QUICK, *TINY, "--trainer.max_steps=4"])  # validates at step 4
    events = EventAccumulator(str(tmp_path / "logs" / "quickstart" / "version_0"))
    events.Reload()
    assert "hp/test_acc" not in events.Tags()["scalars"]
    assert [e.value for e in events.Scalars("hp/val_acc")] == pytest.approx(
        [e.value for e in events.Scalars("val/acc")])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """last.ckpt of a 10-step tiny fit (validation every 4 steps)."""
    folder = run_cli(tmp_path_factory.mktemp("whole"), ["fit", "--config", QUICK, *TINY, "--trainer.max_steps=10"])
    return folder / "checkpoints" / "quickstart" / "version_0" / "last.ckpt"


@pytest.mark.parametrize("signum, at, saved_step", [(signal.SIGTERM, "train", 5), (signal.SIGINT, "validation", 8)],
                         ids=["SIGTERM-in-training", "SIGINT-in-validation"])
def test_signal_saves_and_resumes_bitwise(tmp_path, uninterrupted, signum, at, saved_step):
    """The signal lands after training step 5, or during the validation after step 8 (every 4 steps)."""
    gate = f'{{"class_path": "signal_gate.SignalGate", "init_args": {{"at": "{at}", "step": 5}}}}'
    args = ["fit", "--config", QUICK, *TINY, "--trainer.max_steps=10", f"--trainer.callbacks+={gate}"]
    # as many threads as this process's fits, so that the runs compare bitwise
    env = {**os.environ, "TTT_META_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen([sys.executable, "-m", "ttt_meta", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (tmp_path / "ready").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    last = tmp_path / "checkpoints" / "quickstart" / "version_0" / "last.ckpt"
    assert _state(last)["global_step"] == saved_step
    command = err.strip().splitlines()[-1].strip()
    assert " -m ttt_meta fit " in command and command.endswith("--ckpt_path checkpoints/quickstart/version_0/last.ckpt")
    resumed_args = [a for a in shlex.split(command.split(" -m ttt_meta ", 1)[1]) if "signal_gate" not in a]
    run_cli(tmp_path, resumed_args)
    a, b = _state(uninterrupted), _state(last)
    assert b["global_step"] == a["global_step"] == 10
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_fit_then_test_in_process(tmp_path, monkeypatch):
    """fit writes the best and last checkpoints and TensorBoard events; test writes the report of the episodes."""
    from ttt_meta.cli import main

    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", QUICK, *TINY, "--trainer.max_epochs=2"])
    run = tmp_path / "checkpoints" / "quickstart" / "version_0"
    assert (run / "last.ckpt").is_file() and any(run.glob("best-*.ckpt"))
    assert list((tmp_path / "logs" / "quickstart").glob("version_0/events.out.tfevents.*"))
    main(["test", "--config", QUICK, *TINY, "--ckpt_path", str(run / "last.ckpt")])
    (report,) = (tmp_path / "logs" / "quickstart").glob("version_*/test_results.json")
    result = json.loads(report.read_text())
    assert result["episodes"] == 11 and 0 <= result["acc"] <= 1 and 0 < result["ci95"] < 0.5
    assert result["ways"] == 5 and result["dataset"] == "synthetic"
