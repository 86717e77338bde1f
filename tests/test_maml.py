"""MAML's BatchNorm at evaluation: transductive (the queries as one batch, the default) or with the support set's
statistics (each query on its own); and scripts/maml_steps.py end to end."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ttt_meta.learners import MAMLLearner
from ttt_meta.measure import random_episodes

ROOT = Path(__file__).parents[1]


def tiny(**kwargs) -> MAMLLearner:
    torch.manual_seed(0)
    return MAMLLearner(ways=3, encoder_channels=4, image_size=28, test_steps=2, **kwargs)


def episodes(n=2, shots=2, queries=3, seed=0) -> dict:
    return random_episodes(n, 3, shots, queries, 28, channels=1, generator=torch.Generator().manual_seed(seed))


def eval_logits(model, batch):
    model.eval()
    with torch.inference_mode():
        return model(batch)


@pytest.mark.parametrize("transductive", [False, True])
def test_queries_depend_on_other_queries_only_when_transductive(transductive):
    """Changing one query image leaves every other query's logits alone with support statistics, and changes them
    when the queries are normalised as one batch; neither mode leaves anything on the meta-model."""
    model = tiny(transductive=transductive)
    batch = episodes()
    changed = dict(batch, query=batch["query"].clone())
    changed["query"][:, 4] = 255 - changed["query"][:, 4]
    before, after = eval_logits(model, batch), eval_logits(model, changed)
    others = [i for i in range(batch["query"].shape[1]) if i != 4]
    assert not torch.allclose(before[:, 4], after[:, 4])
    if transductive:
        assert (before[:, others] - after[:, others]).abs().max() > 1e-3
    else:
        torch.testing.assert_close(after[:, others], before[:, others], rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())


def reference_logits(model: MAMLLearner, support, labels, query) -> torch.Tensor:
    """Independent float64 reference: Conv4 + head written out, `test_steps` plain gradient steps of `inner_lr` on
    the support loss (batch statistics), then every BatchNorm layer normalises the queries with the mean and biased
    variance the adapted model has on the supports at that layer."""
    p = {k: v.detach().double() for k, v in model.maml.module.named_parameters()}

    def net(p, x, n):  # BatchNorm statistics from the first n rows
        for i in range(4):
            x = F.conv2d(x, p[f"0.net.{4 * i}.weight"], p[f"0.net.{4 * i}.bias"], padding=1)
            ref = x[:n]
            mean = ref.mean((0, 2, 3), keepdim=True)
            var = ((ref - mean) ** 2).mean((0, 2, 3), keepdim=True)
            x = (x - mean) / torch.sqrt(var + 1e-5) * p[f"0.net.{4 * i + 1}.weight"].view(1, -1, 1, 1) \
                + p[f"0.net.{4 * i + 1}.bias"].view(1, -1, 1, 1)
            x = F.max_pool2d(x.relu(), 2)
        return F.linear(x.flatten(1), p["1.weight"], p["1.bias"])

    s, q = support.double() / 255, query.double() / 255
    for _ in range(model.hparams.test_steps):
        p = {k: v.requires_grad_() for k, v in p.items()}
        grads = torch.autograd.grad(F.cross_entropy(net(p, s, len(s)), labels), list(p.values()))
        p = {k: (v - model.hparams.inner_lr * g).detach() for (k, v), g in zip(p.items(), grads)}
    return net(p, torch.cat([s, q]), len(s))[len(s):]


def test_support_statistics_match_a_reference():
    """With transductive False the query logits are the float64 reference's; the transductive ones differ."""
    model = tiny(transductive=False)
    batch = episodes()
    ref = torch.stack([reference_logits(model, s, y, q) for s, y, q in
                       zip(batch["support"], batch["support_labels"], batch["query"])]).float()
    torch.testing.assert_close(eval_logits(model, batch), ref, rtol=1e-4, atol=1e-4)
    model.hparams.transductive = True
    assert (eval_logits(model, batch) - ref).abs().max() > 1e-2


def test_default_is_transductive_and_training_is_unchanged():
    """The default is the MAML paper's transductive BatchNorm; training forwards and meta-gradients are the same
    for both settings."""
    assert MAMLLearner(encoder_channels=4).hparams.transductive is True
    batch = episodes()
    out = {}
    for transductive in (True, False):
        model = tiny(transductive=transductive).train()
        loss, _ = model.loss_and_accuracy(batch)
        loss.backward()
        out[transductive] = model(batch), [p.grad for p in model.parameters()]
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=0)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_maml_steps_script(tmp_path, monkeypatch):
    """scripts/maml_steps.py on a checkpoint of a fresh tiny model: a row per step count, both BatchNorm modes,
    accuracies those of the model's own forward at that many test steps; json, Markdown and figure written."""
    spec = importlib.util.spec_from_file_location("script_maml_steps", ROOT / "scripts" / "maml_steps.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "omniglot" / "maml_5w5s.yaml"
    overrides = ["data.dataset=synthetic", "model.init_args.encoder_channels=4", "data.eval_batch_size=2"]
    from ttt_meta.runs import build

    model = build(config, overrides).model
    torch.manual_seed(1)
    for p in model.parameters():  # a fresh model's head is near zero: spread its logits so accuracies differ
        p.data.add_(0.3 * torch.randn_like(p))
    ckpt = tmp_path / "fresh.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "global_step": 0,
                "pytorch-lightning_version": "2.0.0"}, ckpt)
    rows = script.main(["--config", str(config), "--ckpt", str(ckpt), "--steps", "0", "1", "2", "--episodes", "3",
                        "--out", str(tmp_path), "--override", *overrides])
    assert [r["steps"] for r in rows] == [0, 1, 2]
    dm = build(config, overrides).datamodule
    dm.setup("test")
    batch = dm.test_dataloader().dataset.__getitems__([0, 1, 2])
    for row in rows:
        for transductive, key in [(True, "transductive"), (False, "support_stats")]:
            model.hparams.test_steps, model.hparams.transductive = row["steps"], transductive
            acc = (eval_logits(model, batch).argmax(-1) == batch["query_labels"]).float().mean().item()
            assert row[key]["acc"] == pytest.approx(acc, abs=1e-6)
    assert (tmp_path / "maml_steps.json").exists() and (tmp_path / "maml_steps.png").exists()
