"""The evaluation path checked by value: per-episode accuracy counted by hand, the 95% interval on a known vector,
and a test run's reported accuracy and interval recomputed from the same checkpoint and episodes."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import DATA

from ttt_meta.cli import main
from ttt_meta.measure import confidence_interval, episode_accuracy
from ttt_meta.runs import build

PROTONET = Path(__file__).parents[1] / "configs" / "omniglot" / "protonet_5w1s.yaml"


def test_episode_accuracy_counts_by_hand():
    logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [9.0, 0.0, 0.0]],
                           [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 1.0]]])
    labels = torch.tensor([[0, 1, 0, 0],    # argmax 0, 1, 2, 0: 3 of 4 right
                           [1, 1, 2, 2]])   # argmax 2, 1, 0, 1: 1 of 4 right
    assert episode_accuracy(logits, labels).tolist() == [0.75, 0.25]


def test_confidence_interval_is_196_sample_std_over_sqrt_n():
    acc = torch.tensor([1.0, 0.5, 0.75, 0.25])
    mean, ci = confidence_interval(acc)
    # mean 0.625; squared deviations 0.140625, 0.015625, 0.015625, 0.140625: sample variance 0.3125 / 3
    assert mean == pytest.approx(0.625, abs=1e-7)
    assert ci == pytest.approx(1.96 * math.sqrt(0.3125 / 3) / 2, abs=1e-7)
    assert confidence_interval(torch.tensor([0.4])) == pytest.approx((0.4, 0.0))


def test_reported_accuracy_is_the_mean_of_the_episodes_recomputed(tmp_path, monkeypatch):
    """test_results.json's accuracy and interval equal those of the per-episode accuracies recomputed here from the
    same checkpoint on the same fixed test episodes (argmax of the model's logits against the labels, by hand)."""
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(PROTONET), "--model.init_args.encoder_channels=4", *DATA, "--data.dataset=synthetic",
            "--data.rotations=false"]  # ProtoNets: episodes of different accuracies from the first steps
    main(["fit", *args, "--trainer.max_steps=2"])
    ckpt = tmp_path / "checkpoints" / "protonet_5w1s" / "version_0" / "last.ckpt"
    main(["test", *args, "--ckpt_path", str(ckpt)])
    (path,) = (tmp_path / "logs" / "protonet_5w1s").glob("version_*/test_results.json")
    report = json.loads(path.read_text())

    cli = build(PROTONET, [arg.removeprefix("--") for arg in args[2:]])
    cli.model.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    cli.model.eval()
    cli.datamodule.setup("test")
    right = []
    with torch.inference_mode():
        for batch in cli.datamodule.test_dataloader():
            predicted = cli.model(batch).argmax(-1)  # [B, NQ]
            right += [(p == y).sum().item() / y.numel() for p, y in zip(predicted, batch["query_labels"])]
    n = len(right)
    mean = sum(right) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in right) / (n - 1))
    assert report["episodes"] == n == 11 and std > 0.01, right  # episodes of different accuracies
    assert report["acc"] == pytest.approx(mean, abs=1e-6)
    assert report["ci95"] == pytest.approx(1.96 * std / math.sqrt(n), abs=1e-6)
