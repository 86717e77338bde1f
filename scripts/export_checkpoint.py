"""Ship a reference checkpoint: weights only, with a report that scores it and says where it came from.

    python scripts/export_checkpoint.py --config configs/omniglot/ttt_linear_5w1s.yaml \\
        --ckpt checkpoints/compare_omniglot_5w1s_ttt_linear/version_0/best-3000-0.9850.ckpt --name ttt_linear_5w1s

Writes checkpoints/omniglot/<name>.ckpt (the weights and hyperparameters; no optimiser or loop state: a few MB)
and <name>.json: the test accuracy with its 95% interval on the config's fixed test episodes (600; of streams
also by instance), the accuracy on the first check set of 100 fixed test episodes that
tests/test_shipped_checkpoints.py requires again through the CLI (to within one query; a stream's every step is
one), the config and overrides it is scored with, the training the source checkpoint
records (ttt_meta.runs.TrainingClock: seconds, steps, commits), and the provenance of this export. The export
is written to a new file: an existing one is never replaced (pass --replace to do so on purpose).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ttt_meta.checkpointing import check_checkpoint
from ttt_meta.cli import set_threads
from ttt_meta.data.episodes import StreamSpec
from ttt_meta.measure import provenance, write_results
from ttt_meta.runs import TrainingClock, build, callback_state, score

ROOT = Path(__file__).resolve().parents[1]
KEEP = ("state_dict", "hyper_parameters", "hparams_name", "datamodule_hyper_parameters", "pytorch-lightning_version",
        "epoch", "global_step")
CHECK_EPISODES = 100


def report_table(name: str, report: dict) -> str:
    """The report as one Markdown row (the README's table of shipped checkpoints)."""
    test, check = report["test"], report["check"]
    trained = report["training"]
    how = (f"{trained['seconds'] / 60:.0f} min, {trained['steps']:,} steps" if trained.get("seconds") is not None
           else trained.get("note", "-"))
    return (f"| `{name}` | {report['setting']} | {100 * test['acc']:.2f} +- {100 * test['ci95']:.2f} "
            f"({test['episodes']}) | {100 * check['acc']:.2f} ({check['episodes']}) | {how} |\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="the experiment config the model was trained with")
    parser.add_argument("--ckpt", type=Path, required=True, help="a checkpoint a fit wrote (or a shipped one)")
    parser.add_argument("--name", required=True, help="file name under --out, without suffix")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides key=value it was trained with")
    parser.add_argument("--training-note", default=None,
                        help="how it was trained, when the checkpoint records no TrainingClock")
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "omniglot")
    parser.add_argument("--replace", action="store_true", help="replace an existing export of that name")
    args = parser.parse_args(argv)
    set_threads()
    prov = provenance(__file__, argv)
    target = args.out / f"{args.name}.ckpt"
    if target.exists() and not args.replace:
        raise SystemExit(f"error: {target} exists. Choose another --name, or pass --replace to replace it.")
    cli = build(args.config, args.override)
    ckpt = check_checkpoint(args.ckpt, cli.model)
    cli.model.load_state_dict(ckpt["state_dict"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    test = score(cli.model, cli.datamodule, device)
    check_cli = build(args.config, [*args.override, f"data.test_episodes={CHECK_EPISODES}"])
    check_cli.model.load_state_dict(ckpt["state_dict"])
    check = score(check_cli.model, check_cli.datamodule, device)
    clock = callback_state(ckpt, TrainingClock)
    training = {"steps": ckpt["global_step"]}
    if clock:
        training.update(seconds=clock["seconds"], segments=clock["segments"])
    if args.training_note:
        training["note"] = args.training_note
    spec = cli.datamodule.eval_spec
    if isinstance(spec, StreamSpec):  # every step of a stream is a prediction
        setting, predictions = f"online {spec.ways}-way", spec.ways * spec.instances
    else:
        setting, predictions = f"{spec.ways}w{spec.shots}s", spec.ways * spec.queries
    report = {"config": str(args.config.resolve().relative_to(ROOT)) if args.config.resolve().is_relative_to(ROOT)
              else str(args.config), "overrides": args.override, "source": str(args.ckpt),
              "setting": f"{cli.datamodule.hparams.dataset} {setting}",
              "test": {k: test[k] for k in ("acc", "ci95", "episodes", "by_instance") if k in test},
              "check": {"acc": check["acc"], "episodes": check["episodes"], "queries": predictions},
              "training": training, "model": type(cli.model).__name__, "hparams": dict(cli.model.hparams)}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({k: ckpt[k] for k in KEEP if k in ckpt}, target)
    write_results(args.out, args.name, report, report_table(args.name, report), prov)
    print(report_table(args.name, report), f"{target}: {target.stat().st_size / 2**20:.2f} MB", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
