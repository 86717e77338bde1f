"""The TTT learner family (ttt_meta.learners.readout): context TTT layers over the episode, then the readout.

A context layer equals a float64 reference that trains the inner model on the supports by explicit mini-batch
gradient steps (torch.func.grad) and reads every token at the end state; at initialisation the family is the
readout alone; a query depends on the supports and itself only; the readout with a learned W0 and label codes is
gradient descent from W0; the inner-loop scalars equal quantities recomputed from one batch."""

import pytest
import torch
import torch.nn.functional as F

from ttt_meta.errors import UserError
from ttt_meta.learners import TTTReadoutLearner
from ttt_meta.learners.readout import _codes
from ttt_meta.measure import random_episodes
from ttt_meta.nn.ttt import ttt_readout

TINY = dict(encoder_channels=8, context_heads=2)


def batch_of(ways=3, shots=2, queries=2, B=2, seed=0):
    return random_episodes(B, ways, shots, queries, 28, channels=1, generator=torch.Generator().manual_seed(seed))


def randomise_outputs(model):
    """Give every context layer's zero-initialised output projection random weights (else it adds nothing)."""
    g = torch.Generator().manual_seed(1)
    for layer in model.context:
        w = getattr(layer, "ttt", layer).theta_o.weight
        w.data.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * 0.3)


def reference_context_layer(layer, x, labels, ways, shots, epochs, mini_batch):
    """x + TTT(LN(x)) in plain loops: per head, the inner TTT-Linear model trained from (W0, b0) by gradient steps
    over the supports read `epochs` times in a row, one step per `mini_batch` consecutive tokens of that stream (the
    sum of their eta-weighted gradients at the step's start, by torch.func.grad), then every token read at the end
    state."""
    ttt, NK = layer.ttt, labels.shape[1]
    y = layer.norm(x)
    writers = y[:, :NK]
    if layer.label_scale is not None:
        writers = writers + layer.label_scale * _codes(ways, x.shape[-1]).to(x)[labels]
    _, k, v, eta = ttt.views(torch.cat([writers] * epochs, 1), eta_scale=1 / shots)  # [B, H, epochs*NK, D]
    q = ttt.views(y)[0]  # [B, H, T, D]
    lw, lb = ttt.ln_weight, ttt.ln_bias

    def f(z, W, b, h):  # the inner model of head h: z + LN(z W + b)
        return z + F.layer_norm(z @ W + b, z.shape[-1:], eps=1e-6) * lw[h] + lb[h]

    def loss(W, b, h, kk, vv, ee):
        return (ee * 0.5 * (f(kk, W, b, h) - vv).square().sum(-1)).sum()

    B, H = x.shape[0], ttt.num_heads
    out = torch.empty_like(q)
    for i in range(B):
        for h in range(H):
            W, b = ttt.W0[h], ttt.b0[h]
            for s in range(0, epochs * NK, mini_batch):
                part = slice(s, s + mini_batch)
                gW, gb = torch.func.grad(loss, argnums=(0, 1))(W, b, h, k[i, h, part], v[i, h, part], eta[i, h, part])
                W, b = W - gW, b - gb
            out[i, h] = f(q[i, h], W, b, h)
    z = out.transpose(1, 2).reshape(x.shape)
    return x + ttt.theta_o(ttt.post_norm(z))


@pytest.mark.parametrize("options", [
    dict(),                                                     # all supports in one batch, one pass
    dict(inner_epochs=2, context_mini_batch=4),                 # sequential mini-batches, two passes
    dict(context_labels=True, context_mini_batch=2),            # writers carry their label code
])
def test_context_layer_equals_plain_gradient_steps_on_the_supports(options):
    torch.manual_seed(0)
    model = TTTReadoutLearner(context_layers=1, **TINY, **options).double().eval()
    randomise_outputs(model)
    layer = model.context[0]
    ways, shots = 3, 2
    x = torch.randn(2, ways * shots + 5, model.encoder.out_features, dtype=torch.float64)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 0, 1, 1, 0]])
    epochs = model.hparams.inner_epochs
    got = layer(x, labels, ways, shots, epochs)
    mini_batch = options.get("context_mini_batch") or ways * shots
    want = reference_context_layer(layer, x, labels, ways, shots, epochs, mini_batch)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, x)


def test_readout_context_layer_adds_the_code_a_readout_fit_to_the_supports_predicts():
    """ReadoutContextLayer equals x + theta_o(k_t W) with W `epochs` gradient steps from 0 on the supports'
    eta-weighted squared error to their label codes, by torch.func.grad (float64), k the unit centred theta_k LN(x)."""
    torch.manual_seed(0)
    model = TTTReadoutLearner(context_layers=1, context_core="readout", inner_epochs=2, **TINY).double().eval()
    randomise_outputs(model)
    layer, (ways, shots), F_ = model.context[0], (3, 2), model.encoder.out_features
    x = torch.randn(2, ways * shots + 5, F_, dtype=torch.float64)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 0, 1, 1, 0]])
    h = layer.theta_k(layer.norm(x))
    k = F.normalize(h - h[:, :6].mean(1, keepdim=True), dim=-1)
    eta = torch.sigmoid(layer.gate(k[:, :6])).squeeze(-1) / shots
    codes = _codes(ways, F_).double()[labels]

    def loss(W, b):
        return (eta[b].unsqueeze(-1) * 0.5 * (k[b, :6] @ W - codes[b]).square()).sum()

    want = []
    for b in range(2):
        W = torch.zeros(F_, F_, dtype=torch.float64)
        for _ in range(2):
            W = W - torch.func.grad(loss)(W, b)
        want.append(x[b] + layer.theta_o(k[b] @ W))
    torch.testing.assert_close(layer(x, labels, ways, shots, 2), torch.stack(want), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("core", ["ttt_mlp", "readout"])
def test_with_no_context_layer_it_is_the_readout_and_context_starts_as_the_identity(core):
    """A learner with context layers computes, at initialisation, the logits of the readout with the same other
    weights (its layers' outputs start at 0); with trained output projections they differ."""
    torch.manual_seed(0)
    deep = TTTReadoutLearner(context_layers=2, context_core=core, **TINY).eval()
    plain = TTTReadoutLearner(**TINY).eval()
    plain.load_state_dict({k: v for k, v in deep.state_dict().items() if not k.startswith("context.")})
    batch = batch_of()
    with torch.no_grad():
        torch.testing.assert_close(deep(batch), plain(batch), rtol=0, atol=0)
        randomise_outputs(deep)
        assert not torch.allclose(deep(batch), plain(batch), atol=1e-4)


@pytest.mark.parametrize("options", [dict(context_layers=2), dict(context_layers=1, context_labels=True,
                                                                   context_mini_batch=2, inner_epochs=2),
                                     dict(context_layers=2, context_core="readout")])
def test_a_query_depends_on_the_supports_and_itself_alone(options):
    torch.manual_seed(0)
    model = TTTReadoutLearner(**TINY, **options).eval()
    randomise_outputs(model)
    batch = batch_of()
    with torch.no_grad():
        logits = model(batch)
        other = dict(batch, query=batch["query"].clone())
        other["query"][:, 0] = 255 - other["query"][:, 0]  # change query 0 only
        changed = model(other)
        torch.testing.assert_close(changed[:, 1:], logits[:, 1:], rtol=0, atol=1e-6)
        assert not torch.allclose(changed[:, 0], logits[:, 0], atol=1e-4)
        support = dict(batch, support=batch["support"].clone())
        support["support"][:, 0] = 255 - support["support"][:, 0]
        assert not torch.allclose(model(support)[:, 1:], logits[:, 1:], atol=1e-4)


@pytest.mark.parametrize("epochs", [1, 3])
def test_readout_from_a_learned_w0_is_gradient_descent_from_it(epochs):
    """ttt_readout with W0 and code targets equals `epochs` gradient steps from W0 by torch.func.grad (float64)."""
    g = torch.Generator().manual_seed(0)
    B, NK, NQ, D, C = 2, 6, 4, 5, 7
    q, k = (torch.randn(B, n, D, generator=g, dtype=torch.float64) for n in (NQ, NK))
    y = torch.randn(B, NK, C, generator=g, dtype=torch.float64)
    eta = torch.rand(B, NK, generator=g, dtype=torch.float64) * 0.2
    W0 = torch.randn(D, C, generator=g, dtype=torch.float64)

    def loss(W, b):
        return (eta[b].unsqueeze(-1) * 0.5 * (k[b] @ W - y[b]).square()).sum()

    for b in range(B):
        W = W0
        for _ in range(epochs):
            W = W - torch.func.grad(loss)(W, b)
        torch.testing.assert_close(ttt_readout(q, k, y, eta, epochs, W0)[b], q[b] @ W, rtol=1e-12, atol=1e-12)


def test_label_codes_with_w0_zero_rank_as_one_hot_targets():
    """With W0 = 0 and one step, code targets give logits N / (N - 1) * S_n - S / (N - 1) where S_n are the one-hot
    readout's (codes of norm sqrt(F) and cosine -1 / (N - 1), divided by F): the same ranking and softmax up to a
    temperature."""
    torch.manual_seed(0)
    codes = TTTReadoutLearner(learned_w0=True, **TINY).eval()
    onehot = TTTReadoutLearner(**TINY).eval()
    onehot.load_state_dict({k: v for k, v in codes.state_dict().items() if k != "W0"})
    ways = 4
    batch = batch_of(ways=ways)
    with torch.no_grad():
        got, s = codes(batch), onehot(batch)
    want = ways / (ways - 1) * s - s.sum(-1, keepdim=True) / (ways - 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("core", ["ttt_linear", "readout"])
def test_inner_loop_stats_of_every_layer_equal_quantities_recomputed_from_one_batch(core):
    torch.manual_seed(0)
    model = TTTReadoutLearner(context_layers=1, context_core=core, inner_epochs=2, learned_w0=True, **TINY).eval()
    randomise_outputs(model)
    with torch.no_grad():
        model.W0.normal_(0, 0.1)
    batch = batch_of()
    model.record_inner_loop(True)
    with torch.no_grad():
        model(batch)
        stats = model.inner_loop_stats()
        r = model.last_record
        loss = lambda W: 0.5 * (r["k"] @ W - r["y"]).square().sum(-1).mean()  # noqa: E731
        before, after = loss(model.W0), loss(r["end"])
        W1 = ttt_readout(torch.eye(r["k"].shape[-1]).expand(2, -1, -1), r["k"], r["y"], r["eta"], 2, model.W0)
    torch.testing.assert_close(r["end"], W1)  # the recorded end state is the readout's
    context = model.ttt_layers()[0][1].recorded_stats()
    assert {k for k in stats if k.startswith("ttt/context.0/")} == {f"ttt/context.0/{k}" for k in context}
    assert float(stats["ttt/readout/inner_loss_before"]) == pytest.approx(float(before))
    assert float(stats["ttt/readout/inner_loss_after"]) == pytest.approx(float(after))
    assert float(stats["ttt/readout/inner_loss_ratio"]) == pytest.approx(float(after / before)) and after < before
    change = (r["end"] - model.W0.detach()).flatten(1).norm(dim=1).mean()
    assert float(stats["ttt/readout/state_change"]) == pytest.approx(float(change))
    assert stats["ttt/readout/eta_min"] <= stats["ttt/readout/eta_mean"] <= stats["ttt/readout/eta_max"]
    assert stats["ttt/context.0/inner_loss_after"] < stats["ttt/context.0/inner_loss_before"]
    model.record_inner_loop(False)
    assert model.inner_loop_stats() == {}


def test_label_codes_bound_the_ways_and_bad_options_are_named():
    model = TTTReadoutLearner(context_layers=1, context_labels=True, **TINY)
    assert model.ways_served() == (2, model.encoder.out_features + 1)
    assert TTTReadoutLearner(context_layers=1, **TINY).ways_served() == (2, None)
    assert TTTReadoutLearner(context_layers=1, context_core="readout", **TINY).ways_served()[1] == 9
    for option in [{"context_core": "lstm"}, {"context_layers": -1}, {"context_mini_batch": -2}]:
        with pytest.raises(UserError, match="model.init_args." + next(iter(option))):
            TTTReadoutLearner(**option)

