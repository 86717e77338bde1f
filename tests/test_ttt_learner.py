"""The TTT learner family (ttt_meta.learners.readout): context TTT layers over the episode, then the readout.

A context layer equals a float64 reference that trains the inner model on the supports by explicit mini-batch
gradient steps (torch.func.grad) and reads every token at the end state; at initialisation the family is the
readout alone; a query depends on the supports and itself only; the inner-loop scalars equal quantities recomputed
from one batch."""

import pytest
import torch
import torch.nn.functional as F

from ttt_meta.errors import UserError
from ttt_meta.learners import TTTReadoutLearner
from ttt_meta.measure import random_episodes
from ttt_meta.nn.ttt import ttt_readout

TINY = dict(encoder_channels=8, context_heads=2)


def batch_of(ways=3, shots=2, queries=2, B=2, seed=0):
    return random_episodes(B, ways, shots, queries, 28, channels=1, generator=torch.Generator().manual_seed(seed))


def randomise_outputs(model):
    """Give every context layer's zero-initialised output projection random weights (else it adds nothing)."""
    g = torch.Generator().manual_seed(1)
    for layer in model.context:
        w = layer.ttt.theta_o.weight
        w.data.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * 0.3)


def reference_context_layer(layer, x, NK, shots, epochs, mini_batch):
    """x + TTT(LN(x)) in plain loops: per head, the inner TTT-Linear model trained from (W0, b0) by gradient steps
    over the supports read `epochs` times in a row, one step per `mini_batch` consecutive tokens of that stream (the
    sum of their eta-weighted gradients at the step's start, by torch.func.grad), then every token read at the end
    state."""
    ttt = layer.ttt
    y = layer.norm(x)
    _, k, v, eta = ttt.views(torch.cat([y[:, :NK]] * epochs, 1), eta_scale=1 / shots)  # [B, H, epochs*NK, D]
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
    dict(context_mini_batch=2),                                 # sequential mini-batches, one pass
])
def test_context_layer_equals_plain_gradient_steps_on_the_supports(options):
    torch.manual_seed(0)
    model = TTTReadoutLearner(context_layers=1, **TINY, **options).double().eval()
    randomise_outputs(model)
    layer = model.context[0]
    ways, shots = 3, 2
    x = torch.randn(2, ways * shots + 5, model.encoder.out_features, dtype=torch.float64)
    epochs = model.hparams.inner_epochs
    got = layer(x, ways * shots, shots, epochs)
    mini_batch = options.get("context_mini_batch") or ways * shots
    want = reference_context_layer(layer, x, ways * shots, shots, epochs, mini_batch)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, x)


def test_with_no_context_layer_it_is_the_readout_and_context_starts_as_the_identity():
    """A learner with context layers computes, at initialisation, the logits of the readout with the same other
    weights (its layers' outputs start at 0); with trained output projections they differ."""
    torch.manual_seed(0)
    deep = TTTReadoutLearner(context_layers=2, **TINY).eval()
    plain = TTTReadoutLearner(**TINY).eval()
    plain.load_state_dict({k: v for k, v in deep.state_dict().items() if not k.startswith("context.")})
    batch = batch_of()
    with torch.no_grad():
        torch.testing.assert_close(deep(batch), plain(batch), rtol=0, atol=0)
        randomise_outputs(deep)
        assert not torch.allclose(deep(batch), plain(batch), atol=1e-4)


@pytest.mark.parametrize("options", [dict(context_layers=2), dict(context_layers=1, context_mini_batch=2,
                                                                   inner_epochs=2)])
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


def test_inner_loop_stats_of_every_layer_equal_quantities_recomputed_from_one_batch():
    torch.manual_seed(0)
    model = TTTReadoutLearner(context_layers=1, inner_epochs=2, **TINY).eval()
    randomise_outputs(model)
    batch = batch_of()
    model.record_inner_loop(True)
    with torch.no_grad():
        model(batch)
        stats = model.inner_loop_stats()
        r = model.last_record
        loss = lambda W: 0.5 * (r["k"] @ W - r["y"]).square().sum(-1).mean()  # noqa: E731
        before, after = loss(torch.zeros_like(r["end"])), loss(r["end"])
        W1 = ttt_readout(torch.eye(r["k"].shape[-1]).expand(2, -1, -1), r["k"], r["y"], r["eta"], 2)
    torch.testing.assert_close(r["end"], W1)  # the recorded end state is the readout's
    context = model.ttt_layers()[0][1].recorded_stats()
    assert {k for k in stats if k.startswith("ttt/context.0/")} == {f"ttt/context.0/{k}" for k in context}
    assert float(stats["ttt/readout/inner_loss_before"]) == pytest.approx(float(before))
    assert float(stats["ttt/readout/inner_loss_after"]) == pytest.approx(float(after))
    assert float(stats["ttt/readout/inner_loss_ratio"]) == pytest.approx(float(after / before)) and after < before
    change = r["end"].flatten(1).norm(dim=1).mean()
    assert float(stats["ttt/readout/state_change"]) == pytest.approx(float(change))
    assert stats["ttt/readout/eta_min"] <= stats["ttt/readout/eta_mean"] <= stats["ttt/readout/eta_max"]
    assert stats["ttt/context.0/inner_loss_after"] < stats["ttt/context.0/inner_loss_before"]
    model.record_inner_loop(False)
    assert model.inner_loop_stats() == {}


def test_any_ways_and_bad_options_are_named():
    assert TTTReadoutLearner(context_layers=1, **TINY).ways_served() == (2, None)
    for option in [{"context_layers": -1}, {"context_mini_batch": -2}]:
        with pytest.raises(UserError, match="model.init_args." + next(iter(option))):
            TTTReadoutLearner(**option)

