"""Exact resume, multi-process DDP, and a clear error (with nothing written) for every bad input."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import DATA, QUICK, TINY, nan_loss_at_step, run_cli

from ttt_meta.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"


class Interrupt(Exception):
    pass


class InterruptAt(L.Callback):
    """Kills the run (an exception) after optimiser step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Interrupt


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_resume_is_exact(tmp_path, monkeypatch):
    """Killed after step 7 (last.ckpt holds step 6, mid-epoch) and resumed == never interrupted, bitwise."""
    args = ["fit", "--config", QUICK, *TINY, "--trainer.max_steps=10", "--last_checkpoint.every_n_steps=3"]
    for run in ("whole", "killed"):
        (tmp_path / run).mkdir()
    monkeypatch.chdir(tmp_path / "whole")
    whole = main(args)
    monkeypatch.chdir(tmp_path / "killed")
    killed = main(args[1:], run=False)
    killed.trainer.callbacks.append(InterruptAt(7))
    with pytest.raises(Interrupt):
        killed.trainer.fit(killed.model, killed.datamodule)
    last = tmp_path / "killed" / "checkpoints" / "quickstart" / "version_0" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 6
    resumed = main(args + ["--ckpt_path", str(last)])
    a, b = _weights(tmp_path / "whole" / "checkpoints" / "quickstart" / "version_0" / "last.ckpt"), _weights(last)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.trainer.global_step == whole.trainer.global_step == 10
    assert resumed.trainer.callback_metrics["val/acc"] == whole.trainer.callback_metrics["val/acc"]
    assert resumed.datamodule.train_stream.start == whole.datamodule.train_stream.start == 10


def test_train_stream_independent_of_workers():
    from ttt_meta.data.datamodule import EpisodeDataModule

    def first_batches(workers, start=0):
        dm = EpisodeDataModule(dataset="synthetic", ways=3, shots=1, queries=1, meta_batch_size=2,
                               train_batches_per_epoch=5, num_workers=workers)
        dm.setup("fit")
        dm.load_state_dict({"next_train_batch": start})
        return [(b["batch_index"], b["support"]) for b in dm.train_dataloader()]

    main_process, workers, later = first_batches(0), first_batches(2), first_batches(0, start=3)
    assert [i for i, _ in main_process] == [i for i, _ in workers] == [0, 1, 2, 3, 4]
    assert [i for i, _ in later] == [3, 4, 5, 6, 7]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(main_process, workers))
    assert torch.equal(later[0][1], main_process[3][1])
    assert not torch.equal(main_process[0][1], main_process[1][1])


DDP_CONFIGS = ["quickstart.yaml", "omniglot/maml_5w1s.yaml"]


@pytest.fixture(scope="module")
def ddp_reports(tmp_path_factory) -> dict:
    """For each DDP_CONFIGS entry: a 2-step gloo DDP fit on 2 CPU processes, then a DDP test of its last.ckpt,
    the two configs side by side (a DDP start is mostly waiting: rank 1 imports while rank 0 waits for it).
    {config: test_results.json}."""
    env = {**os.environ, "TTT_META_THREADS": "1"}

    def fit_and_test(config: str) -> dict:
        folder = tmp_path_factory.mktemp("ddp")
        extra = TINY if config == "quickstart.yaml" else [
            "--model.init_args.encoder_channels=4", *DATA, "--data.dataset=synthetic", "--data.rotations=false"]
        args = ["--config", str(CONFIGS / config), *extra, "--run_name=ddp"]
        ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
        ckpt = ["--ckpt_path", "checkpoints/ddp/version_0/last.ckpt"]
        for sub in (["fit", *args, *ddp, "--trainer.max_steps=2"], ["test", *args, *ddp, *ckpt], ["test", *args, *ckpt]):
            done = subprocess.run([sys.executable, "-m", "ttt_meta", *sub], cwd=folder, env=env, capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
        reports = sorted((folder / "logs" / "ddp").glob("version_*/test_results.json"), key=lambda p: p.parent.name)
        return [json.loads(p.read_text()) for p in reports]  # [two processes, one process]

    with ThreadPoolExecutor(len(DDP_CONFIGS)) as pool:
        return dict(zip(DDP_CONFIGS, pool.map(fit_and_test, DDP_CONFIGS)))


@pytest.mark.parametrize("config", DDP_CONFIGS)
def test_ddp_two_processes(ddp_reports, config):
    """gloo DDP on 2 CPU processes: training runs, and the test report counts each of 11 episodes once, with the
    accuracy and interval one process reports for the same checkpoint on the same episodes."""
    two, one = ddp_reports[config]
    assert two["episodes"] == one["episodes"] == 11 and two["episodes_per_process"] == [6, 5]
    assert one["episodes_per_process"] == [11] and (one["ci95"] > 0.01 or config == "quickstart.yaml")  # 2 steps:
    # the quickstart's sequence model still predicts one class, every episode at chance; MAML's episodes differ
    assert two["acc"] == pytest.approx(one["acc"], abs=1e-6) and two["ci95"] == pytest.approx(one["ci95"], abs=1e-6)


def _no_output(path: Path) -> bool:
    return not (path / "logs").exists() and not (path / "checkpoints").exists()


BAD_CONFIGS = [
    (["--data.ways=1"], "ways >= 2"),
    (["--data.shots=0"], "shots >= 1"),
    (["--data.queries=0"], "queries >= 1"),
    (["--data.eval_ways=200"], "200-way episodes need 200 classes"),
    (["--data.shots=15", "--data.queries=10"], "samples"),
    (["--model.init_args.mini_batch_size=0"], "mini_batch_size must be >= 1"),
    (["--model.init_args.eta_base=-1"], "eta_base must be >= 0"),
    (["--model.init_args.image_size=8", "--data.image_size=8"], "too small"),
    (["--model.init_args.core=gru"], "unknown core"),
    (["--data.dataset=cifar"], "unknown data.dataset"),
    (["--data.ways=10"], "serves at most 5 ways"),
]


@pytest.mark.parametrize("extra, message", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_config(tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        main(["fit", "--config", QUICK, *TINY, *extra])
    assert _no_output(tmp_path)


def test_unknown_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICK, "--data.no_such_key=1"])
    assert "no_such_key" in capsys.readouterr().err
    assert _no_output(tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """last.ckpt of a 2-step quickstart run."""
    path = run_cli(tmp_path_factory.mktemp("trained"), ["fit", "--config", QUICK, *TINY, "--trainer.max_steps=2"])
    return path / "checkpoints" / "quickstart" / "version_0" / "last.ckpt"


def test_bad_checkpoints(tmp_path, monkeypatch, trained):
    monkeypatch.chdir(tmp_path)
    test = ["test", "--config", QUICK, *TINY]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(test + ["--ckpt_path", "nope.ckpt"])
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(trained.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cannot be read"):
        main(test + ["--ckpt_path", str(broken)])
    with pytest.raises(ValueError, match=r"SequenceMetaLearner of another shape.*width: 16 there, 32 here"):
        main(test + ["--model.init_args.width=32", "--ckpt_path", str(trained)])
    with pytest.raises(ValueError, match=r"another shape.*core: 'ttt_linear' there, 'lstm' here"):
        main(test + ["--model.init_args.core=lstm", "--ckpt_path", str(trained)])
    with pytest.raises(ValueError, match=r"holds a SequenceMetaLearner, not the configured MAMLLearner"):
        main(["test", "--config", str(CONFIGS / "omniglot" / "maml_5w1s.yaml"), *DATA, "--data.dataset=synthetic",
              "--ckpt_path", str(trained)])
    assert _no_output(tmp_path)
    with pytest.warns(UserWarning, match="eta_base: 1.0 there, 0.5 here"):  # runs, with the configured eta_base
        main(test + ["--model.init_args.eta_base=0.5", "--ckpt_path", str(trained)])


def test_nan_loss_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nan_loss_at_step(monkeypatch, 3)
    with pytest.raises(FloatingPointError, match="at step 3"):
        main(["fit", "--config", QUICK, *TINY, "--trainer.max_steps=10", "--last_checkpoint.every_n_steps=2"])
    last = torch.load(tmp_path / "checkpoints" / "quickstart" / "version_0" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A write that dies half way leaves the previous checkpoint intact and no temporary file behind."""
    from ttt_meta import checkpointing

    target = tmp_path / "last.ckpt"
    io = checkpointing.AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)

    def dies_half_way(obj, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_last_checkpoint_is_written_after_the_final_validation(tmp_path, monkeypatch):
    """A run stopped by a callback (as TrainingClock stops a budgeted run) at a step where last.ckpt was just
    saved validates once more; its last.ckpt must then name the best checkpoint of that final validation."""
    from ttt_meta.runs import TrainingClock, build

    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            trainer.should_stop = trainer.global_step == 4

    monkeypatch.chdir(tmp_path)
    cli = build(QUICK, [a[2:] for a in TINY] + ["trainer.max_steps=-1", "trainer.max_epochs=-1",
                                                "last_checkpoint.every_n_steps=2", "trainer.val_check_interval=3",
                                                "trainer.check_val_every_n_epoch=null",
                                                "model.init_args.lr_schedule=constant"])
    cli.trainer.callbacks[:0] = [TrainingClock(), StopAt()]
    cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = torch.load(tmp_path / "checkpoints" / "quickstart" / "version_0" / "last.ckpt", weights_only=False)
    best = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))["best_model_path"]
    assert ckpt["global_step"] == 4 and Path(best).is_file()
    assert [point["step"] for point in ckpt["callbacks"]["TrainingClock"]["curve"]] == [3, 4]
