"""The online protocol: streams drawn as promised, accuracy by instance counted right, every online learner causal
(step t's logits read images 0..t and labels 0..t-1 only) and equal to its reference, and the run's report."""

import csv
import itertools
import json

import pytest
import torch

from ttt_meta.data.datamodule import EpisodeDataModule, TrainEpisodes
from ttt_meta.data.episodes import StreamSpec
from ttt_meta.data.synthetic import make_glyphs
from ttt_meta.errors import UserError
from ttt_meta.learners import (MAMLLearner, OnlineProtoNetLearner, ProtoNetLearner, SequenceMetaLearner,
                               TTTReadoutLearner)
from ttt_meta.learners.protonet import running_prototype_logits
from ttt_meta.measure import accuracy_by_instance, instance_numbers

TINY = dict(width=32, depth=2, num_heads=2, encoder_channels=8, max_ways=5, mini_batch_size=4,
            share_qk=False)  # a separate theta_Q, as the online TTT configs
ONLINE = ["ttt_linear", "ttt_mlp", "lstm", "attention", "protonet", "maml"]


def make(name: str, dtype=torch.float32):
    torch.manual_seed(0)
    if name == "protonet":
        model = OnlineProtoNetLearner(encoder_channels=8)
    elif name == "maml":
        model = MAMLLearner(ways=5, encoder_channels=8, first_order=True, test_steps=2)
    else:
        model = SequenceMetaLearner(core=name, **TINY)
    return model.to(dtype).eval()


def streams(n=2, ways=5, instances=3, seed=0):
    data = make_glyphs(12, image_size=28, seed=3)
    return next(iter(TrainEpisodes(data, StreamSpec(ways, instances), n, 1, False, seed=seed)))


def test_a_stream_shows_every_class_its_instances_in_a_shuffled_order():
    """Each stream holds N classes x S instances, labels 0..N-1 each S times, distinct images; the order is
    shuffled (not class-major) and differs between streams; the same seed gives the same streams."""
    batch = streams(n=4, ways=5, instances=4)
    assert batch["stream"].shape == (4, 20, 1, 28, 28) and batch["ways"] == 5
    for labels, images in zip(batch["stream_labels"], batch["stream"]):
        assert torch.bincount(labels, minlength=5).tolist() == [4] * 5
        assert len({img.numpy().tobytes() for img in images}) == 20
    assert not torch.equal(batch["stream_labels"][0], batch["stream_labels"][0].sort().values)
    assert not torch.equal(batch["stream_labels"][0], batch["stream_labels"][1])
    assert torch.equal(streams(n=4, ways=5, instances=4)["stream"], batch["stream"])


def test_instance_numbers_and_accuracy_by_instance_counted_by_hand():
    labels = torch.tensor([[0, 1, 0, 0, 1, 1]])
    assert instance_numbers(labels).tolist() == [[1, 1, 2, 3, 2, 3]]
    predicted = torch.tensor([[1, 1, 0, 1, 1, 0]])  # right at steps 1, 2, 4
    logits = torch.nn.functional.one_hot(predicted, 2).float()
    # 1st instances: steps 0 (wrong), 1 (right); 2nd: 2 (right), 4 (right); 3rd: 3 (wrong), 5 (wrong)
    assert accuracy_by_instance(logits, labels).tolist() == [[0.5, 1.0, 0.0]]


@pytest.mark.parametrize("name", ONLINE)
def test_a_step_reads_nothing_after_its_image_and_not_its_own_label(name):
    """Changing every image after step t and every label from step t on leaves the logits of steps 0..t as they
    were; changing the image of step t changes step t's."""
    model = make(name)
    batch = streams()
    t = 7
    with torch.no_grad():
        want = model.logits(batch)
        changed = dict(batch, stream=batch["stream"].clone(), stream_labels=batch["stream_labels"].clone())
        changed["stream"][:, t + 1:] = 255 - changed["stream"][:, t + 1:]
        changed["stream_labels"][:, t:] = (changed["stream_labels"][:, t:] + 1) % 5
        got = model.logits(changed)
        changed["stream"][:, t] = 255 - changed["stream"][:, t]
        moved = model.logits(changed)
    torch.testing.assert_close(got[:, :t + 1], want[:, :t + 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(moved[:, t], want[:, t])


@pytest.mark.parametrize("core", ["ttt_linear", "ttt_mlp", "lstm", "attention"])
def test_a_sequence_learner_on_a_stream_equals_its_prefixes(core):
    """Reference: step t's logits are the last logits of the model run on the stream cut after step t (float64);
    for TTT cores in the primal, dual and compiled forms alike (inner mini-batches of 4 cut at every position)."""
    forms = ["primal", "dual", "compiled"] if core.startswith("ttt") else ["dual"]
    batch = streams(instances=2)
    T = batch["stream_labels"].shape[1]
    for form in forms:
        torch.manual_seed(0)
        model = SequenceMetaLearner(core=core, form=form, **TINY).double().eval()
        model.images = lambda x: x.double().div(255)
        with torch.no_grad():
            full = model.logits(batch)
            for t in range(T):
                prefix = dict(batch, stream=batch["stream"][:, :t + 1], stream_labels=batch["stream_labels"][:, :t + 1])
                torch.testing.assert_close(full[:, t], model.logits(prefix)[:, -1], rtol=1e-10, atol=1e-10)


def test_a_stream_token_holds_its_image_and_the_labelled_image_before_it():
    """Token t: the first half of image t's embedding, the second half of image t-1's (zeros at t = 0), plus the code
    of label t-1 (the "no label" row at t = 0), built by hand."""
    model = make("ttt_linear").model
    features, labels = torch.randn(2, 6, model.embed.in_features), torch.randint(0, 5, (2, 6))
    codes = model.label_rows()
    e, half = model.embed(features), model.embed.out_features // 2
    for t in range(6):
        previous_image = e[:, t - 1, half:] if t else torch.zeros_like(e[:, 0, half:])
        previous_label = codes[labels[:, t - 1]] if t else codes[model.max_ways].expand(2, -1)
        want = torch.cat([e[:, t, :half], previous_image], dim=-1) + previous_label
        torch.testing.assert_close(model.stream_tokens(features, labels, codes)[:, t], want)


def test_running_prototypes_equal_a_loop_by_hand():
    """Step t: -squared distance to the mean of the earlier features of each class; an unseen class scores the
    given value (float64)."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 9, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(3, (2, 9), generator=gen)
    unseen = torch.tensor(-7.5, dtype=torch.float64)
    got = running_prototype_logits(features, labels, 3, unseen)
    for b, t, n in itertools.product(range(2), range(9), range(3)):
        earlier = [features[b, s] for s in range(t) if labels[b, s] == n]
        want = -(features[b, t] - torch.stack(earlier).mean(0)).square().sum() if earlier else unseen
        torch.testing.assert_close(got[b, t, n], want, rtol=1e-12, atol=1e-12)


def test_maml_on_a_stream_adapts_on_the_steps_before_each_image():
    """Step t of a stream = the meta-model adapted on steps 0..t-1 (test_steps steps), scoring image t alone; step
    0 = the meta-model itself."""
    model = make("maml")
    batch = streams(n=1)
    x, y = model.images(batch["stream"][0]), batch["stream_labels"][0]
    got = model.logits(batch)[0]
    for t in (0, 1, 6):
        learner = model.adapt(x[:t], y[:t], 2) if t else model.maml
        with torch.no_grad():
            torch.testing.assert_close(got[t], learner(x[t:t + 1])[0].detach(), rtol=1e-5, atol=1e-5)


def test_online_learners_lower_their_stream_loss():
    """Gradients reach everything: 30 steps on one batch of streams more than halve its loss (the new-class
    distance of the online ProtoNet included: it moves)."""
    batch = streams(n=4, ways=5, instances=3)
    for name in ["ttt_linear", "protonet"]:
        model = make(name).train()
        first = model.loss_and_accuracy(batch)[0].item()
        beta = model.log_unseen_distance.item() if name == "protonet" else None
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(30):
            loss, _ = model.loss_and_accuracy(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert model.loss_and_accuracy(batch)[0].item() < 0.5 * first, name
        assert beta is None or model.log_unseen_distance.item() != beta


def test_the_online_protocol_names_its_mistakes():
    with pytest.raises(UserError, match="data.protocol"):
        EpisodeDataModule(dataset="synthetic", protocol="stream")
    with pytest.raises(UserError, match="data.eval_queries.*data.instances"):
        EpisodeDataModule(dataset="synthetic", protocol="online", eval_queries=15)
    with pytest.raises(UserError, match="data.instances.*data.protocol: online"):
        EpisodeDataModule(dataset="synthetic", instances=10)
    dm = EpisodeDataModule(dataset="synthetic", protocol="online", rotations=False)
    assert dm.eval_spec == StreamSpec(5, 10)
    for model in [ProtoNetLearner(encoder_channels=8), TTTReadoutLearner(encoder_channels=8)]:
        with pytest.raises(UserError, match="cannot learn from a stream.*OnlineProtoNetLearner"):
            model.check_data(dm)
    OnlineProtoNetLearner(encoder_channels=8).check_data(dm)


def test_an_online_run_reports_accuracy_by_instance(tmp_path, monkeypatch):
    """fit then test on synthetic streams from the command line: test_results.json holds the accuracy on each of
    the S instances with its interval, and their mean over the instances is the overall accuracy (every class has
    S instances); the console prints them."""
    from ttt_meta.cli import main
    monkeypatch.chdir(tmp_path)
    common = ["--model=ttt_meta.learners.OnlineProtoNetLearner", "--model.init_args.encoder_channels=8",
              "--data.dataset=synthetic", "--data.protocol=online", "--data.instances=4", "--data.rotations=false",
              "--data.meta_batch_size=4", "--data.val_episodes=8", "--data.test_episodes=12",
              "--data.eval_batch_size=5", "--run_name=online"]
    main(["fit", *common, "--data.train_batches_per_epoch=3", "--trainer.max_steps=3"])
    ckpt = next((tmp_path / "checkpoints" / "online").rglob("last.ckpt"))
    main(["test", *common, f"--ckpt_path={ckpt}"])
    report = json.loads(next((tmp_path / "logs").rglob("test_results.json")).read_text())
    assert report["protocol"] == "online" and report["instances"] == 4 and report["episodes"] == 12
    assert [r["instance"] for r in report["by_instance"]] == [1, 2, 3, 4]
    mean = sum(r["acc"] for r in report["by_instance"]) / 4
    assert mean == pytest.approx(report["acc"], abs=1e-6)
    assert all(r["ci95"] > 0 for r in report["by_instance"])


def test_predict_a_stream_from_folders(tmp_path, capsys):
    """predict --stream: each labelled image's probabilities equal the model's step logits on the stream of the
    labelled images (softmax), an unlabelled image's the last step of the labelled stream plus it; instance numbers
    and the printed accuracy counted from the CSV; a labelled image after an unlabelled one is refused."""
    from PIL import Image

    from ttt_meta.cli import main
    from ttt_meta.predict import load_model
    model = make("ttt_linear")  # small logits at initialisation: probabilities far from 0 and 1
    ckpt = tmp_path / "online.ckpt"
    hparams = {"_class_path": "ttt_meta.learners.SequenceMetaLearner", **model.hparams}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, ckpt)
    batch = streams(n=1, ways=3, instances=3)
    folder = tmp_path / "stream"
    folder.mkdir()
    names = [f"{t:03d}.png" for t in range(9)]
    for name, img in zip(names, batch["stream"][0, :, 0]):
        Image.fromarray(img.numpy()).save(folder / name)
    words = ["alpha", "beta", "gamma"]
    labels = [words[y] for y in batch["stream_labels"][0].tolist()]
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(f"{n},{y}\n" for n, y in zip(names[:7], labels)))
    out = tmp_path / "pred.csv"
    result = main(["predict", "--ckpt_path", str(ckpt), "--stream", str(folder), "--labels",
                   str(tmp_path / "labels.csv"), "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    model = load_model(ckpt)
    order = list(dict.fromkeys(labels[:7]))  # labels numbered by first appearance
    ids = torch.tensor([[order.index(y) for y in labels[:7]]])
    with torch.no_grad():
        want = model.logits({"stream": batch["stream"][:, :7], "stream_labels": ids, "ways": 3})[0].softmax(-1)
        last = model.logits({"stream": batch["stream"][:, [*range(7), 8]], "stream_labels": torch.cat(
            [ids, ids[:, :1]], 1), "ways": 3})[0, -1].softmax(-1)
    got = torch.tensor([[float(r[f"p_{n}"]) for n in order] for r in rows])
    torch.testing.assert_close(got[:7], want, atol=1e-4, rtol=0)
    torch.testing.assert_close(got[8], last, atol=1e-4, rtol=0)
    assert [r["label"] for r in rows] == labels[:7] + ["", ""]
    assert [r["instance"] for r in rows[:7]] == [str(labels[:t + 1].count(labels[t])) for t in range(7)]
    right = [r["predicted"] == r["label"] for r in rows[:7]]
    assert result["acc"] == sum(right) / 7 and "accuracy on the labelled images" in capsys.readouterr().out
    (tmp_path / "gap.csv").write_text(f"{names[0]},alpha\n{names[2]},beta\n")
    with pytest.raises(UserError, match="001.png has no label but a later image has"):
        main(["predict", "--ckpt_path", str(ckpt), "--stream", str(folder), "--labels", str(tmp_path / "gap.csv")])
