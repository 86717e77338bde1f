"""Ready for GPUs and many machines: a training step reads nothing back from the device, the device-sensitive paths
agree on every device at hand (``-m device``: CPU here, CUDA too where there is one; ``scripts/gpu_check.py``
runs them on a GPU), ``form: compiled`` falls back with a notice, and a fit and a test on two "nodes" (two
torchrun launches on localhost, one CPU process each) train on distinct episodes and count each test episode
once."""

import json
import os
import socket
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import DATA, QUICK, TINY, nan_loss_at_step

import torchmetrics
import ttt_meta
from ttt_meta.cli import main
from ttt_meta.measure import confidence_interval, random_episodes
from ttt_meta.nn import ttt
from ttt_meta.nn.ttt import TTTMLP, TTTLinear
from ttt_meta.quiet import learn2learn

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]

# calls that read a tensor's values back to the host: on a GPU each waits for all queued work (a sync)
READS = [(torch.Tensor, name) for name in ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__",
                                           "__float__", "__index__")] + [(torch, "nonzero")]
# the code whose calls are counted: ours and the libraries our step calls into per step; not ttt_meta/data, which
# gathers episodes on the CPU (in loader workers when data.num_workers > 0) before a batch moves to the device
WATCHED = tuple(str(Path(m.__file__).parent) for m in (ttt_meta, torchmetrics, learn2learn()))
CPU_ONLY = str(Path(ttt_meta.__file__).parent / "data")


class ReadBacks:
    """While ``on``, records (where, what) for every READS call, and every boolean-mask indexing, made directly
    from WATCHED code."""

    def __init__(self, monkeypatch):
        self.on, self.seen = False, []
        for owner, name in READS:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name))
        getitem = torch.Tensor.__getitem__

        def masked_getitem(x, index):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self._note("boolean-mask indexing")
            return getitem(x, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", masked_getitem)

    def _note(self, what: str) -> None:
        caller = sys._getframe(2)
        where = caller.f_code.co_filename
        if self.on and where.startswith(WATCHED) and not where.startswith(CPU_ONLY):
            self.seen.append((f"{where}:{caller.f_lineno}", what))

    def _wrap(self, fn, name):
        def counted(*args, **kwargs):
            self._note(name)
            return fn(*args, **kwargs)

        return counted


class CountSteps(L.Callback):
    """Counts reads from the start of training step `first` to the start of step `last` (all hooks between)."""

    def __init__(self, reads: ReadBacks, first: int = 1, last: int = 3):
        self.reads, self.first, self.last = reads, first, last

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.reads.on = self.first <= trainer.global_step < self.last


OMNIGLOT_ON_SYNTHETIC = ["--model.init_args.encoder_channels=4", *DATA, "--data.dataset=synthetic",
                         "--data.rotations=false"]
STEP_CASES = {
    "ttt_linear": [QUICK, *TINY],
    "ttt_mlp": [QUICK, *TINY, "--model.init_args.core=ttt_mlp"],
    "lstm": [QUICK, *TINY, "--model.init_args.core=lstm"],
    "attention": [QUICK, *TINY, "--model.init_args.core=attention"],
    "ttt_options": [QUICK, *TINY, "--model.init_args.label_codes=equiangular",
                    "--model.init_args.tied_head=true", "--data.label_space=5", "--data.ways=3",
                    "--data.ways_up_to=5", "--data.shots_up_to=2"],
    "protonet": [str(CONFIGS / "omniglot" / "protonet_5w1s.yaml"), *OMNIGLOT_ON_SYNTHETIC],
    "maml": [str(CONFIGS / "omniglot" / "maml_5w1s.yaml"), *OMNIGLOT_ON_SYNTHETIC],
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_training_step_reads_nothing_back(case, tmp_path, monkeypatch):
    """Two whole training steps (forward, loss, backward, optimiser, every callback and hook) of each learner call
    nothing that reads a tensor back (no .item(), bool(), nonzero(), mask indexing) in our code or the libraries
    it drives per step: on a GPU the step never waits for the device. (The logger and the divergence check read
    the loss every trainer.log_every_n_steps steps; not in these two.)"""
    monkeypatch.chdir(tmp_path)
    config, *extra = STEP_CASES[case]
    cli = main(["--config", config, *extra, "--trainer.max_steps=4", "--trainer.log_every_n_steps=50"], run=False)
    reads = ReadBacks(monkeypatch)
    cli.trainer.callbacks.append(CountSteps(reads))
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 4
    assert reads.seen == []


class SyncWarnings(L.Callback):
    """On CUDA: torch.cuda.set_sync_debug_mode("warn") from the start of step `first` to the start of `last`."""

    def __init__(self, first: int = 1, last: int = 3):
        self.first, self.last = first, last

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode(1 if self.first <= trainer.global_step < self.last else 0)

    def on_train_end(self, trainer, pl_module) -> None:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["ttt_linear", "ttt_options", "lstm", "attention", "protonet", "maml"])
def test_fit_steps_on_gpu_never_synchronise(case, tmp_path, monkeypatch):
    """Two whole training steps of a Lightning fit on the GPU in bf16-mixed (Lightning's loop, our hooks and
    callbacks) make no synchronising CUDA call: torch's sync debug mode warns at each."""
    monkeypatch.chdir(tmp_path)
    config, *extra = STEP_CASES[case]
    cli = main(["--config", config, *extra, "--trainer.max_steps=4", "--trainer.log_every_n_steps=50",
                "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed"], run=False)
    cli.trainer.callbacks.append(SyncWarnings())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 4
    assert [str(w.message) for w in caught if "synchroniz" in str(w.message)] == []


def test_read_backs_are_seen(monkeypatch):
    """The counter above can fail: it sees the .item() inside ttt_meta.measure.confidence_interval."""
    reads = ReadBacks(monkeypatch)
    reads.on = True
    confidence_interval(torch.rand(5))
    assert any(what == "item" and "measure.py" in where for where, what in reads.seen)


def test_divergence_is_found_at_the_next_log_step(tmp_path, monkeypatch):
    """A NaN loss at step 3 is read at the next log step (5): the run stops there, naming step 3, before any
    checkpoint is written (last.ckpt every 7 steps, no validation until epoch 10). tests/test_reliability.py has the
    other reading point: a checkpoint write after the bad step."""
    monkeypatch.chdir(tmp_path)
    nan_loss_at_step(monkeypatch, 3)
    with pytest.raises(FloatingPointError, match="not finite at step 3"):
        main(["fit", "--config", QUICK, *TINY, "--trainer.max_steps=10", "--last_checkpoint.every_n_steps=7",
              "--trainer.log_every_n_steps=5", "--trainer.check_val_every_n_epoch=10"])
    run = tmp_path / "checkpoints" / "quickstart" / "version_0"
    assert not (run / "last.ckpt").exists() and not list(run.glob("best-*"))


def test_compiled_form_falls_back_to_dual_with_a_notice(monkeypatch):
    """Without a compiler for the device, form=compiled says so once and computes the dual form."""
    ttt._can_compile.cache_clear()
    monkeypatch.setattr(ttt.shutil, "which", lambda name: None)
    monkeypatch.setattr(ttt.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.warns(UserWarning, match="form=compiled needs a C.. compiler on cpu; .* dual form"):
            assert not ttt._can_compile("cpu")
        with pytest.warns(UserWarning, match="Triton"):
            assert not ttt._can_compile("cuda")
        torch.manual_seed(0)
        dual, compiled = TTTLinear(8, 2, mini_batch_size=2), TTTLinear(8, 2, mini_batch_size=2, form="compiled")
        compiled.load_state_dict(dual.state_dict())
        x = torch.randn(2, 7, 8)
        assert torch.equal(compiled(x, 4), dual(x, 4))
    finally:
        ttt._can_compile.cache_clear()


# ----------------------------------------------------------------------------------------------- on every device
@pytest.mark.device
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [TTTLinear, TTTMLP])
def test_ttt_forms_agree_on_device(device, cls):
    """float64 primal = dual on the device, and the device's dual = the CPU's."""
    torch.manual_seed(0)
    dual = cls(16, 2, mini_batch_size=4).double()
    primal = cls(16, 2, mini_batch_size=4, form="primal").double()
    primal.load_state_dict(dual.state_dict())
    x = torch.randn(3, 13, 16, dtype=torch.float64)
    want = dual(x, 9)
    dual.to(device), primal.to(device)
    got = dual(x.to(device), 9)
    torch.testing.assert_close(got, primal(x.to(device), 9), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.device
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_keeps_the_inner_loop_float32_on_device(device):
    torch.manual_seed(0)
    layer = TTTLinear(16, 2, mini_batch_size=4).to(device)
    calls, inner = [], layer.inner
    layer.inner = lambda *a: calls.append(a) or inner(*a)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(torch.randn(2, 10, 16, device=device), 6)
    assert y.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in calls[0][:4])


@pytest.mark.device
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_form_on_device(device):
    """form=compiled (Triton on CUDA, C++ on CPU) goes through torch.compile and equals the dual form on the device;
    skipped, naming why, where no compiler is at hand (the fallback is the test above)."""
    with warnings.catch_warnings(record=True) as notices:
        warnings.simplefilter("always")
        ttt._can_compile.cache_clear()
        if not ttt._can_compile(torch.device(device).type):
            pytest.skip(str(notices[-1].message))
    ttt._compiled.cache_clear()
    torch.manual_seed(0)
    dual = TTTLinear(16, 2, mini_batch_size=4).to(device)
    compiled = TTTLinear(16, 2, mini_batch_size=4, form="compiled").to(device)
    compiled.load_state_dict(dual.state_dict())
    x = torch.randn(2, 15, 16, device=device)
    torch.testing.assert_close(compiled(x, 10), dual(x, 10), rtol=1e-4, atol=1e-4)
    assert ttt._compiled.cache_info().currsize == 1  # the scan step went through torch.compile


def _learner(config: str, overrides: list[str], tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return main(["--config", config, *overrides], run=False).model


@pytest.mark.device
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["ttt_linear", "lstm", "attention", "protonet", "maml"])
def test_training_step_on_device(device, case, tmp_path, monkeypatch):
    """A training step (forward, backward, optimiser) of each learner on the device: finite, the same loss as on
    the CPU, and, on CUDA, no synchronisation (torch.cuda.set_sync_debug_mode("error") raises at any)."""
    config, *extra = STEP_CASES[case]
    model = _learner(config, extra, tmp_path, monkeypatch)
    hp = model.hparams
    batch = random_episodes(2, 5, 1, 2, hp.image_size, hp.in_channels)
    cpu_loss = model.loss_and_accuracy(batch)[0].detach()
    model.to(device)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=device == "cuda")
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = model.loss_and_accuracy(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.detach().cpu(), cpu_loss, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------- two nodes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(folder: Path, args: list[str]) -> None:
    """``torchrun --nnodes 2 --node_rank R --master_addr 127.0.0.1 ... -m ttt_meta ARGS`` for R = 0 and 1 at once,
    one CPU process per node, as a launcher on two machines would start them."""
    port = _free_port()
    env = {**os.environ, "TTT_META_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}

    def node(rank: int) -> subprocess.CompletedProcess:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                    f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "ttt_meta"]
        return subprocess.run([*launcher, *args, "--trainer.num_nodes=2", "--trainer.devices=1",
                               "--trainer.strategy=ddp", "--trainer.accelerator=cpu"],
                              cwd=folder, env=env, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        for done in pool.map(node, [0, 1]):
            assert done.returncode == 0, done.stderr[-3000:]


def test_two_nodes_fit_and_test(tmp_path, monkeypatch):
    """Each node's process trains on episodes of its own (no training batch on both), rank 0 alone writes the
    run's one version, and the test counts each of the 11 test episodes once over the two nodes, with the accuracy
    and interval one process reports for the same checkpoint (ProtoNets: episodes of different accuracies)."""
    log = '{"class_path": "episode_log.EpisodeLog"}'
    common = ["--config", str(CONFIGS / "omniglot" / "protonet_5w1s.yaml"), *OMNIGLOT_ON_SYNTHETIC, "--run_name=nodes"]
    _two_nodes(tmp_path, ["fit", *common, "--trainer.max_steps=3", f"--trainer.callbacks+={log}"])
    ranks = [json.loads((tmp_path / f"episodes_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["global_rank"], r["node_rank"], r["world_size"]) for r in ranks] == [(0, 0, 2), (1, 1, 2)]
    assert all(len(r["batches"]) == 3 for r in ranks)
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"])
    assert [p.name for p in (tmp_path / "checkpoints" / "nodes").iterdir()] == ["version_0"]
    assert [p.name for p in (tmp_path / "logs" / "nodes").iterdir()] == ["version_0"]
    _two_nodes(tmp_path, ["test", *common, "--ckpt_path", "checkpoints/nodes/version_0/last.ckpt"])
    monkeypatch.chdir(tmp_path)
    main(["test", *common, "--ckpt_path", "checkpoints/nodes/version_0/last.ckpt"])  # one process
    two, one = (json.loads((tmp_path / "logs" / "nodes" / f"version_{n}" / "test_results.json").read_text())
                for n in (1, 2))
    assert two["episodes"] == one["episodes"] == 11 and two["episodes_per_process"] == [6, 5] and one["ci95"] > 0.01
    assert two["acc"] == pytest.approx(one["acc"], abs=1e-6) and two["ci95"] == pytest.approx(one["ci95"], abs=1e-6)


# ----------------------------------------------------------------------------------------------- gpu_check.py
def test_device_tests_live_in_this_file():
    """scripts/gpu_check.py runs ``pytest -m device`` on this file alone."""
    marked = [p.name for p in Path(__file__).parent.glob("test_*.py")
              if p.name != "test_devices.py" and "mark.device" in p.read_text()]
    assert marked == []


def test_gpu_check_smoke(tmp_path):
    """``scripts/gpu_check.py --smoke``: every step of the GPU check on CPU, its files with provenance and one summary
    table; without --smoke on a machine with no GPU, one paragraph saying what to do, no traceback."""
    env = {**os.environ, "TTT_META_THREADS": "1"}
    script = str(ROOT / "scripts" / "gpu_check.py")
    done = subprocess.run([sys.executable, script, "--smoke", "--out", str(tmp_path / "out")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    files = {p.name for p in (tmp_path / "out").glob("*.json")}
    assert files == {"gpu_tests.json", "gpu_compare_omniglot_5w1s.json", "gpu_bench_episodes.json",
                     "gpu_bench_layers.json", "gpu_check.json"}
    check = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert check["provenance"]["command"].startswith("python scripts/gpu_check.py --smoke")
    assert check["tests"]["passed"] == 1 and check["tests"]["failed"] == 0
    assert set(check["accuracy"]) == {"5w1s"} and check["episode_cost_ratio"]["5w1s"] > 0
    assert "| device tests | 1 passed, 0 failed |" in done.stdout and check["markdown"] in done.stdout
    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, script], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert refused.returncode == 2 and refused.stderr.startswith("error: scripts/gpu_check.py measures a GPU")
        assert "Traceback" not in refused.stderr and "--smoke" in refused.stderr
