"""Slim a training checkpoint for shipping: keep the weights and hyperparameters, drop optimiser and loop state.

    python scripts/export_checkpoint.py checkpoints/ttt_linear_5w1s/last.ckpt checkpoints/omniglot/ttt_linear_5w1s.ckpt \
        --report logs/ttt_linear_5w1s/version_1/test_results.json

The slim file still loads with ``python -m ttt_meta test --config ... --ckpt_path ...``; `--report` copies the
test report beside it (same name, .json), which the test suite checks the checkpoint against.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch

KEEP = ("state_dict", "hyper_parameters", "hparams_name", "datamodule_hyper_parameters", "pytorch-lightning_version",
        "epoch", "global_step")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--report", type=Path, help="test_results.json of this checkpoint")
    a = p.parse_args(argv)
    ckpt = torch.load(a.src, map_location="cpu", weights_only=False)
    a.dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: ckpt[k] for k in KEEP if k in ckpt}, a.dst)
    if a.report:
        shutil.copyfile(a.report, a.dst.with_suffix(".json"))
        print(json.loads(a.report.read_text()))
    print(f"{a.dst}: {a.dst.stat().st_size / 2**20:.2f} MB")


if __name__ == "__main__":
    main()
