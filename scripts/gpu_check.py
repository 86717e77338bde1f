"""ttt_meta on a GPU in one command (about 10 minutes on one H100), and the same path on CPU in seconds.

    python scripts/gpu_check.py                  # on a machine with CUDA: results/gpu_*.json, a summary table
    python scripts/gpu_check.py --minutes 5      # longer training runs
    python scripts/gpu_check.py --smoke          # CPU, tiny, seconds: every step below runs (tests/test_devices.py)

1. The device-sensitive tests (``pytest -m device``: TTT forms, bf16 inner loop, compiled form, a training step
   of each learner under ``torch.cuda.set_sync_debug_mode("warn")``) on the GPU -> gpu_tests.json.
2. TTT-Linear on Omniglot 5w1s and 20w1s, each for ``--minutes`` of training steps in bf16-mixed, scored on the
   600 fixed test episodes (``scripts/compare.py``, runs ``compare_omniglot_<setting>_ttt_linear_gpu``)
   -> gpu_compare_omniglot_5w1s.json, gpu_compare_omniglot_20w1s.json.
3. The episodes bench: test-time ms per episode of TTT-Linear and MAML-10 at 5w1s, 5w5s and 20w5s
   -> gpu_bench_episodes.json.
4. The layers bench up to T=8192: TTT-Linear and TTT-MLP (primal, dual, compiled), the LSTM, attention
   -> gpu_bench_layers.json.
Steps 2 to 4 run the scripts named, each in its own process. Then one summary table, printed and written as
gpu_check.json (with provenance, like every results file).

``--smoke`` runs the same four steps on CPU with tiny settings (one device test, synthetic data, seconds of
training at 5w1s only, short sequences, no compiled form: its compilation takes longer than the rest) into a
fresh folder (``--out`` to choose it), never into results/.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ttt_meta.cli import command_line
from ttt_meta.errors import UserError
from ttt_meta.measure import hardware_text, markdown_table, provenance, write_results

ROOT = Path(__file__).resolve().parents[1]
# bench_layers.py's layers but the compiled forms (their compilation takes longer than the rest of --smoke)
SMOKE_LAYERS = [f"{core} {form}" for core in ("ttt_linear", "ttt_mlp") for form in ("primal", "dual")]
SMOKE_LAYERS += ["lstm", "attention"]
SETTINGS = ("5w1s", "20w1s")
TINY = ["data.dataset=synthetic", "data.rotations=false", "data.val_episodes=4", "data.test_episodes=8",
        "data.eval_batch_size=4", "data.meta_batch_size=2", "data.train_batches_per_epoch=4",
        "model.init_args.width=32", "model.init_args.encoder_channels=4", "trainer.enable_progress_bar=false"]


def run_tests(out: Path, smoke: bool, prov: dict) -> dict:
    """``pytest -m device`` (smoke: one of them) on this machine: {"passed", "failed", "returncode", "summary"}. The
    device tests live in tests/test_devices.py (tests/test_devices.py checks that no other file has one)."""
    select = ["-k", "ttt_forms_agree and TTTLinear"] if smoke else []
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "device", *select,
                           str(ROOT / "tests" / "test_devices.py")], cwd=ROOT, capture_output=True, text=True)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    result = {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0),
              "returncode": done.returncode, "summary": summary,
              "failures": [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]}
    write_results(out, "gpu_tests", result, f"`pytest -m device` on {hardware_text(prov)}: {summary}\n", prov)
    return result


def script(name: str, args: list[str], out: Path, result: str) -> dict:
    """Run ``scripts/<name>.py args --name result --out out`` in its own process; its results file's contents."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args, "--name", result, "--out", str(out)],
                   check=True)
    return json.loads((out / f"{result}.json").read_text())


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the same steps on CPU, tiny, in seconds")
    p.add_argument("--minutes", type=float, default=2.0, help="training time per setting (training steps only)")
    p.add_argument("--out", type=Path, help="where the results go (default results/; --smoke: a fresh folder)")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise UserError("scripts/gpu_check.py measures a GPU, and torch sees no CUDA device here "
                        f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a machine with "
                        "an NVIDIA GPU and a CUDA build of torch, or add --smoke to run its steps on CPU in seconds")
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.smoke else ROOT / "results")
    prov = provenance(__file__, argv)
    tests = run_tests(out, args.smoke, prov)

    minutes = 0.05 if args.smoke else args.minutes
    accuracy = {}
    for setting in SETTINGS[:1] if args.smoke else SETTINGS:
        overrides = ["--override", *TINY] if args.smoke else []
        compared = script("compare", ["--setting", setting, "--minutes", str(minutes), "--val-every",
                                      str(10 * minutes), "--models", "ttt_linear", "--variants", "gpu", *overrides],
                          out, f"gpu_compare_omniglot_{setting}")
        accuracy[setting] = compared["rows"][0]

    episodes = script("bench_episodes", ["--models", "ttt_linear", "maml_10", "--settings",
                                         *(["5w1s", "--episode-batch", "2", "--repeats", "1", "--min-seconds", "0"]
                                           if args.smoke else ["5w1s", "5w5s", "20w5s"])],
                      out, "gpu_bench_episodes")["ratios"]["maml_10 / ttt_linear"]
    layer_rows = script("bench_layers", ["--layers", *SMOKE_LAYERS, "--lengths", "16", "32", "--batch", "1",
                                         "--width", "16", "--repeats", "1", "--min-seconds", "0", "--fit-from", "16"]
                        if args.smoke else [], out, "gpu_bench_layers")["rows"]
    longest = max(r["T"] for r in layer_rows)

    cells = [["device tests", f"{tests['passed']} passed, {tests['failed']} failed"]]
    cells += [[f"TTT-Linear {s} test acc ({r['precision']}, {minutes:g} min)",
               f"{100 * r['acc']:.2f} +- {100 * r['ci95']:.2f}% ({r['train_steps']} steps, "
               f"{r['test_ms_per_episode']:.1f} ms / episode)"] for s, r in accuracy.items()]
    cells += [[f"MAML-10 / TTT-Linear per episode, {s}", f"{ratio:.2f}x"] for s, ratio in episodes.items()]
    cells += [[f"{r['layer']} at T={longest}", f"{r['ms']:.1f} ms, {r['peak_mb']:.0f} MB"]
              for r in layer_rows if r["T"] == longest]
    text = (f"scripts/gpu_check.py{' --smoke' if args.smoke else ''} on {hardware_text(prov)}, commit "
            f"{str(prov['commit'])[:10]}, {prov['date'][:10]}\n\n{markdown_table(['check', 'result'], cells)}\n")
    write_results(out, "gpu_check", {"tests": tests, "accuracy": accuracy, "episode_cost_ratio": episodes,
                                     "layers_at_longest": [r for r in layer_rows if r["T"] == longest]}, text, prov)
    print(f"\n{text}\nresults in {out}")
    if tests["failed"] or tests["returncode"]:
        print(f"device tests failed: {tests['failures'] or tests['summary']}", file=sys.stderr)
    return text


if __name__ == "__main__":
    command_line(main)
