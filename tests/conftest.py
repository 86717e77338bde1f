import os
from pathlib import Path

import pytest

from ttt_meta.cli import set_threads

os.environ.setdefault("TTT_META_THREADS", str(min(2, os.cpu_count() or 1)))
set_threads()


@pytest.fixture
def omniglot_root() -> Path:
    """The data root holding omniglot/omniglot-py, from TTT_META_DATA; the test is skipped without it."""
    root = os.environ.get("TTT_META_DATA")
    if not root or not (Path(root) / "omniglot" / "omniglot-py").is_dir():
        pytest.skip("real Omniglot not available: set TTT_META_DATA to a folder holding omniglot/omniglot-py")
    return Path(root)


QUICK = str(Path(__file__).parents[1] / "configs" / "quickstart.yaml")
# a tiny quickstart: seconds per fit
DATA = ["--data.train_batches_per_epoch=4", "--data.val_episodes=6", "--data.test_episodes=11",
        "--data.eval_batch_size=4", "--data.meta_batch_size=2", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]
TINY = ["--model.init_args.width=16", "--model.init_args.encoder_channels=4", *DATA]


def run_cli(folder: Path, *commands: list[str]) -> Path:
    """Run ``python -m ttt_meta`` `commands` in `folder` (in this process); returns `folder`."""
    from ttt_meta.cli import main

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for args in commands:
            main(args)
    finally:
        os.chdir(cwd)
    return folder


def nan_loss_at_step(monkeypatch, step: int) -> None:
    """Make SequenceMetaLearner's training loss NaN at global step `step` (and only there)."""
    from ttt_meta.learners import SequenceMetaLearner

    real = SequenceMetaLearner.loss_and_accuracy

    def loss_and_accuracy(self, batch):
        loss, acc = real(self, batch)
        return (loss * float("nan") if self.training and self.global_step == step else loss), acc

    monkeypatch.setattr(SequenceMetaLearner, "loss_and_accuracy", loss_and_accuracy)
