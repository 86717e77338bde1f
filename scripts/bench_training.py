"""Meta-training throughput: episodes per second of ``fit`` for each model, in float32 and bf16.

    python scripts/bench_training.py                                      # results/bench_training.{json,md}
    python scripts/bench_training.py --models ttt_readout protonet --train-precisions bf16-mixed \
        --train-settings 5w1s 5w5s 20w1s 20w5s --name bench_training_compare
    python scripts/bench_training.py --train-dataset synthetic --train-steps 5 --out /tmp/b
    python scripts/bench_training.py --models ttt_linear lstm maml --train-precisions fastest \
        --train-settings online_5way online_15way --name bench_training_online

Episodes per second of ``fit`` (Lightning's loop, data loading included, no validation) for each model's experiment
configs/omniglot/<model>_<setting>.yaml on --train-dataset in float32 and in bf16 autocast (trainer.precision
bf16-mixed), timed over --train-steps steps after 3 warm-up steps (in a temporary folder), all in one process, so
that the ratios between models do not carry the machine's speed, which varies between runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from ttt_meta.cli import set_threads
from ttt_meta.measure import StepClock, hardware_text, markdown_table, provenance, write_results
from ttt_meta.runs import build, training_precision

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 3


def measure_training(model: str, setting: str, precision: str, args) -> dict:
    """Training episodes per second of ``fit`` of `model` at `setting` and trainer `precision`."""
    clock = StepClock(WARMUP)
    steps = WARMUP + args.train_steps
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            cli = build(ROOT / "configs" / "omniglot" / f"{model}_{setting}.yaml",
                        [f"data.dataset={args.train_dataset}", f"trainer.max_steps={steps}",
                         "trainer.limit_val_batches=0", f"trainer.precision={precision}",
                         f"data.train_batches_per_epoch={steps}"])
            cli.trainer.callbacks.append(clock)
            cli.trainer.fit(cli.model, cli.datamodule)
        finally:
            os.chdir(cwd)
    episodes_per_step = cli.datamodule.hparams.meta_batch_size
    return {"model": model, "setting": setting, "precision": precision, "dataset": args.train_dataset,
            "steps": args.train_steps, "episodes_per_step": episodes_per_step,
            "train_episodes_per_s": args.train_steps * episodes_per_step / clock.seconds,
            "step_seconds": clock.seconds / args.train_steps}


def write(rows: list[dict], prov: dict, args) -> str:
    table = markdown_table(["model", "setting", "precision", "data", "episodes per step", "episodes/s", "s per step"],
                           [[r["model"], r["setting"], r["precision"], r["dataset"], r["episodes_per_step"],
                             f"{r['train_episodes_per_s']:.1f}", f"{r['step_seconds']:.3f}"] for r in rows])
    text = (f"fit episodes/s ({hardware_text(prov)}; {args.train_steps} steps after {WARMUP} warm-up steps, data "
            f"loading included, one process). Commit {str(prov['commit'])[:10]}{' (dirty)' if prov['dirty'] else ''}, "
            f"{prov['date'][:10]}: `{prov['command']}`\n\n{table}\n")
    write_results(args.out, args.name, {"rows": rows}, text, prov)
    return text


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ttt_linear"], help="experiments <model>_<setting>.yaml")
    parser.add_argument("--train-settings", nargs="+", default=["5w1s", "20w5s"],
                        choices=["5w1s", "5w5s", "20w1s", "20w5s", "online_5way", "online_15way"])
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--train-precisions", nargs="+", default=["32-true", "bf16-mixed"],
                        help="trainer.precision values; bf16-mixed pays on CPUs with native bf16 (AVX512-BF16, AMX); "
                        "'fastest': each model at the precision compare.py trains it (runs.training_precision)")
    parser.add_argument("--train-dataset", default="omniglot", choices=["omniglot", "synthetic"],
                        help="omniglot reads data.root / TTT_META_DATA like the app")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--name", default="bench_training", help="results file name, without suffix")
    args = parser.parse_args(argv)
    set_threads()
    prov = provenance(__file__, argv)
    rows = [measure_training(model, setting, training_precision(model) if precision == "fastest" else precision, args)
            for setting in args.train_settings for precision in args.train_precisions for model in args.models]
    print(write(rows, prov, args))
    return rows


if __name__ == "__main__":
    main()
