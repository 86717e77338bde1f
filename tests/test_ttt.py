"""TTT layers: the dual form equals the primal reference, and both equal plain gradient descent on the inner loss."""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from ttt_meta.nn import ttt
from ttt_meta.nn.ttt import TTTLinear, TTTMLP, ttt_linear, ttt_mlp

B, H, D = 2, 3, 4


def _inputs(T, seed=0, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q, k, v = r(B, H, T, D), r(B, H, T, D), r(B, H, T, D)
    eta = torch.rand(B, H, T, generator=g, dtype=dtype) * scale
    ln = (1 + 0.1 * r(H, D), 0.1 * r(H, D))
    lin = (0.3 * r(H, D, D), 0.1 * r(H, D))
    mlp = (0.3 * r(H, D, 4 * D), 0.1 * r(H, 4 * D), 0.3 * r(H, 4 * D, D), 0.1 * r(H, D))
    return (q, k, v, eta), ln, lin, mlp


def _run(kind, qkve, ln, lin, mlp, m, form, writers=None):
    if kind == "linear":
        z, W, b = ttt_linear(*qkve, *lin, *ln, m, form=form, writers=writers)
        return z, (W, b)
    return ttt_mlp(*qkve, *mlp, *ln, m, form=form, writers=writers)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("T", [1, 3, 16, 37, 64])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_dual_equals_primal(kind, T, m):
    args = _inputs(T, seed=T * 31 + m)
    z_p, s_p = _run(kind, *args, m, "primal")
    z_d, s_d = _run(kind, *args, m, "dual")
    assert z_d.shape == (B, H, T, D)
    assert _rel(z_d, z_p) <= 1e-10
    for a, b in zip(s_d, s_p, strict=True):
        assert a.shape == b.shape and a.shape[0] == B
        assert _rel(a, b) <= 1e-10


def _f(kind, z, state, ln):
    """The inner model f(z) = z + LN(f_res(z)) for one head: z [D]."""
    if kind == "linear":
        W, b = state
        r = z @ W + b
    else:
        W1, b1, W2, b2 = state
        r = F.gelu(z @ W1 + b1, approximate="tanh") @ W2 + b2
    return z + F.layer_norm(r, (D,), ln[0], ln[1], eps=1e-6)


def _loss(kind, state, k, v, eta, ln):
    """sum_j eta_j * 0.5 * ||f(k_j) - v_j||^2 over tokens j of one head."""
    return sum(eta[j] * 0.5 * ((_f(kind, k[j], state, ln) - v[j]) ** 2).sum() for j in range(k.shape[0]))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("form", ["primal", "dual"])
def test_closed_form_gradient_equals_autograd(kind, form):
    """With one mini-batch covering the sequence, W_last = W0 - grad(sum_j eta_j l_j)(W0)."""
    (q, k, v, eta), ln, lin, mlp = _inputs(T=8, seed=1)
    _, state = _run(kind, (q, k, v, eta), ln, lin, mlp, 16, form)
    init = lin if kind == "linear" else mlp
    for b in range(B):
        for h in range(H):
            s0 = tuple(p[h] for p in init)
            grads = torch.func.grad(lambda s: _loss(kind, s, k[b, h], v[b, h], eta[b, h], (ln[0][h], ln[1][h])))(s0)
            for p0, g, got in zip(s0, grads, state, strict=True):
                torch.testing.assert_close(got[b, h], p0 - g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_mini_batch_one_is_online_gradient_descent(kind):
    T = 7
    (q, k, v, eta), ln, lin, mlp = _inputs(T, seed=2)
    z, _ = _run(kind, (q, k, v, eta), ln, lin, mlp, 1, "dual")
    init = lin if kind == "linear" else mlp
    for b in range(B):
        for h in range(H):
            lnh = (ln[0][h], ln[1][h])
            s = tuple(p[h] for p in init)
            for t in range(T):
                g = torch.func.grad(lambda s_: _loss(kind, s_, k[b, h, t:t + 1], v[b, h, t:t + 1], eta[b, h, t:t + 1], lnh))(s)
                s = tuple(p - gp for p, gp in zip(s, g, strict=True))
                torch.testing.assert_close(z[b, h, t], _f(kind, q[b, h, t], s, lnh), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("form", ["primal", "dual"])
def test_read_only_tokens(kind, form):
    """Tokens with eta 0 leave the state alone; permuting them permutes their outputs and nothing else. Saying
    that only the first n_write tokens write (the trailing read-only tokens evaluated after the scan) changes
    nothing either."""
    n_write, n_read, m = 10, 9, 4
    (q, k, v, eta), ln, lin, mlp = _inputs(n_write + n_read, seed=3)
    eta[:, :, n_write:] = 0
    z, state = _run(kind, (q, k, v, eta), ln, lin, mlp, m, form, writers=n_write)
    z_all, state_all = _run(kind, (q, k, v, eta), ln, lin, mlp, m, form)
    torch.testing.assert_close(z_all, z, rtol=1e-12, atol=1e-12)
    for a, b in zip(state_all, state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    w = slice(0, n_write)
    z_w, state_w = _run(kind, (q[:, :, w], k[:, :, w], v[:, :, w], eta[:, :, w]), ln, lin, mlp, m, form)
    for a, b in zip(state, state_w, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z[:, :, w], z_w, rtol=1e-12, atol=1e-12)
    perm = torch.randperm(n_read, generator=torch.Generator().manual_seed(0)) + n_write
    order = torch.cat([torch.arange(n_write), perm])
    z_p, state_p = _run(kind, tuple(x[:, :, order] for x in (q, k, v, eta)), ln, lin, mlp, m, form, writers=n_write)
    torch.testing.assert_close(z_p, z[:, :, order], rtol=1e-12, atol=1e-12)
    for a, b in zip(state_p, state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_batched_initial_state_carries_between_calls():
    """Running two halves with the state carried over equals one call, when the split is at a mini-batch edge."""
    (q, k, v, eta), ln, lin, _ = _inputs(16, seed=4)
    z, W, b = ttt_linear(q, k, v, eta, *lin, *ln, 4)
    a, c = slice(0, 8), slice(8, 16)
    z1, W1, b1 = ttt_linear(q[:, :, a], k[:, :, a], v[:, :, a], eta[:, :, a], *lin, *ln, 4)
    z2, W2, b2 = ttt_linear(q[:, :, c], k[:, :, c], v[:, :, c], eta[:, :, c], W1, b1, *ln, 4)
    torch.testing.assert_close(torch.cat([z1, z2], 2), z)
    torch.testing.assert_close((W2, b2), (W, b))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("form", ["primal", "dual"])
def test_outer_gradients_gradcheck(kind, form):
    """Gradients reach q, k, v, eta, the initial state and the inner LN. The last two tokens are read-only
    (eta a constant 0: the dual form reads them at the end state, outside the scan)."""
    (q, k, v, eta), ln, lin, mlp = _inputs(T=5, seed=5)
    init = lin if kind == "linear" else mlp
    inputs = tuple(x[:1, :1].clone().requires_grad_() for x in (q, k, v, eta[..., :3]))
    params = tuple(p[:1].clone().requires_grad_() for p in (*init, *ln))
    fn = ttt_linear if kind == "linear" else ttt_mlp

    def out(*xs):
        eta_all = torch.cat([xs[3], xs[3].new_zeros(1, 1, 2)], dim=-1)
        res = fn(*xs[:3], eta_all, *xs[4:], 2, form=form, writers=3)
        return res[0], *(res[1:] if kind == "linear" else res[1])

    assert torch.autograd.gradcheck(out, inputs + params)


@pytest.mark.parametrize("cls", [TTTLinear, TTTMLP])
def test_layer_inference_mode_equals_training_forward(cls):
    torch.manual_seed(0)
    layer = cls(width=16, num_heads=2, mini_batch_size=4).double()
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    y = layer(x, 6)
    y.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    with torch.inference_mode():
        y_eval = layer.eval()(x, 6)
    torch.testing.assert_close(y_eval, y.detach())
    assert y.shape == x.shape


@pytest.mark.parametrize("cls", [TTTLinear, TTTMLP])
def test_layer_forms_share_qk(cls):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    writers = 5
    dual = cls(8, 2, mini_batch_size=2, share_qk=False).double()
    primal = cls(8, 2, mini_batch_size=2, share_qk=False, form="primal").double()
    primal.load_state_dict(dual.state_dict())
    torch.testing.assert_close(dual(x, writers), primal(x, writers), rtol=1e-10, atol=1e-12)
    assert {"W0", "b0"} <= {n for n, _ in dual.named_parameters()} or {"W1", "W2"} <= {n for n, _ in dual.named_parameters()}
    assert dual.theta_q is not None and cls(8, 2).theta_q is None


def test_bad_arguments():
    (q, k, v, eta), ln, lin, _ = _inputs(T=5)
    with pytest.raises(ValueError, match="writers"):
        ttt_linear(q, k, v, eta, *lin, *ln, 4, writers=6)
    with pytest.raises(ValueError, match="mini_batch_size"):
        TTTLinear(8, 2, mini_batch_size=0)
    with pytest.raises(ValueError, match="eta_base"):
        TTTLinear(8, 2, eta_base=-1)
    with pytest.raises(ValueError, match="divisible"):
        TTTLinear(10, 3)
    with pytest.raises(ValueError, match="form"):
        TTTMLP(8, 2, form="fast")


@pytest.mark.parametrize("cls", [TTTLinear, TTTMLP])
def test_recorded_inner_loss_matches_the_update(cls):
    """inner_loss at the recorded start state is the loss the layer descends: with one mini-batch, the end state
    equals start - eta-weighted grad of it, and the loss of the writing tokens goes down."""
    torch.manual_seed(0)
    layer = cls(16, 2, mini_batch_size=8, eta_base=1.0).double()
    x = torch.randn(3, 8, 16, dtype=torch.float64)
    layer.record = True
    layer(x, 6)
    r = layer.last_record
    start = tuple(t.expand(3, *t.shape).clone().requires_grad_() for t in r["start"])  # one state per episode
    loss = (r["eta"] * layer.inner_loss(r["k"], r["v"], start)).sum()
    grads = torch.autograd.grad(loss, start)
    for s0, g, end in zip(start, grads, r["end"], strict=True):
        torch.testing.assert_close(s0.detach() - g, end, rtol=1e-9, atol=1e-12)
    before = layer.inner_loss(r["k"], r["v"], r["start"])[..., :6].mean()
    after = layer.inner_loss(r["k"], r["v"], r["end"])[..., :6].mean()
    assert after < before


@pytest.mark.skipif(not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")),
                    reason="form=compiled needs a C++ compiler on CPU (without one it runs the dual form: "
                           "tests/test_devices.py checks that fallback and its notice)")
@pytest.mark.parametrize("cls", [TTTLinear, TTTMLP])
def test_compiled_form_equals_dual(cls):
    """The compiled form is the dual form through torch.compile (a compiled step was built: not the fallback): same
    outputs and gradients, in training and under inference_mode, with read-only tokens and a ragged last
    mini-batch."""
    ttt._compiled.cache_clear()
    torch.manual_seed(0)
    dual = cls(16, 2, mini_batch_size=4).double()
    compiled = cls(16, 2, mini_batch_size=4, form="compiled").double()
    compiled.load_state_dict(dual.state_dict())
    x = torch.randn(3, 15, 16, dtype=torch.float64)
    writers = 10
    outs = []
    for layer in (dual, compiled):
        y = layer(x, writers)
        y.square().sum().backward()
        outs.append((y.detach(), [p.grad for p in layer.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(outs[1][1], outs[0][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x, writers), dual(x, writers), rtol=1e-10, atol=1e-10)
    assert ttt._compiled.cache_info().currsize == 1  # the scan step went through torch.compile


@pytest.mark.parametrize("cls", [TTTLinear, TTTMLP])
def test_inner_loop_stays_float32_under_autocast(cls):
    """bf16 autocast (trainer.precision: bf16-mixed) leaves the inner loop in float32: what it returns equals the
    float32 inner loop on the same views; the layer's output is the float32 one up to bf16 rounding."""
    torch.manual_seed(0)
    layer = cls(16, 2, mini_batch_size=4)
    x = torch.randn(3, 12, 16)
    writers = 8
    want = layer(x, writers)
    calls, inner = [], layer.inner
    layer.inner = lambda *a: calls.append((a, inner(*a))) or calls[-1][1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x, writers)
    (args, (z, state)), = calls
    assert all(t.dtype == torch.float32 for t in (z, *args[:4], *state))
    z32, state32 = inner(*args)
    torch.testing.assert_close(z, z32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, state32, rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_grouped_scan_equals_one_mini_batch_per_call(kind):
    """The compiled form's scan takes G mini-batches per call and pads the last group with eta-0 tokens: with
    G = 3 over 7 mini-batches (3 groups, 2 padding mini-batches) it equals the scan that takes one per call."""

    (q, k, v, eta), ln, lin, mlp = _inputs(T=30, seed=6)
    eta[:, :, 27:] = 0  # trailing read-only tokens, read after the scan
    n = ttt._scan_length(27, 30, 4)
    lw, lb = ln[0].unsqueeze(1), ln[1].unsqueeze(1)
    if kind == "linear":
        W, b = lin[0].expand(B, *lin[0].shape), lin[1].expand(B, *lin[1].shape).unsqueeze(2)
        one = ttt._linear_dual(q, k, v - k, eta, W, b, lw, lb, 4, n)
        grouped = ttt._linear_dual(q, k, v - k, eta, W, b, lw, lb, 4, n, group=3)
    else:
        state = tuple(p.expand(B, *p.shape) for p in mlp)
        state = (state[0], state[1].unsqueeze(2), state[2], state[3].unsqueeze(2))
        one = ttt._mlp_dual(q, k, v - k, eta, state, lw, lb, 4, n)
        grouped = ttt._mlp_dual(q, k, v - k, eta, state, lw, lb, 4, n, group=3)
    torch.testing.assert_close(grouped, one, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("epochs", [1, 3])
def test_readout_is_gradient_descent_on_the_supports(epochs):
    """ttt_readout equals `epochs` steps of batch gradient descent from W = 0, each gradient by torch.func.grad, in
    float64; at one step it is linear attention over the supports: logits[n] = sum_{j in n} eta_j q . k_j."""
    from ttt_meta.nn.ttt import ttt_readout
    g = torch.Generator().manual_seed(0)
    B, NK, NQ, D, N = 2, 6, 4, 5, 3
    q, k = (torch.randn(B, n, D, generator=g, dtype=torch.float64) for n in (NQ, NK))
    y = F.one_hot(torch.randint(0, N, (B, NK), generator=g), N).double()
    eta = torch.rand(B, NK, generator=g, dtype=torch.float64) * 0.2

    def loss(W, b):
        return (eta[b].unsqueeze(-1) * 0.5 * (k[b] @ W - y[b]).square()).sum()

    for b in range(B):
        W = torch.zeros(D, N, dtype=torch.float64)
        for _ in range(epochs):
            W = W - torch.func.grad(loss)(W, b)
        torch.testing.assert_close(ttt_readout(q, k, y, eta, epochs)[b], q[b] @ W, rtol=1e-12, atol=1e-12)
    if epochs == 1:
        attention = (q @ k.transpose(1, 2)) * eta.unsqueeze(1) @ y  # [B, NQ, N]
        torch.testing.assert_close(ttt_readout(q, k, y, eta, 1), attention, rtol=1e-12, atol=1e-12)
    else:  # the later steps change the readout
        assert not torch.allclose(ttt_readout(q, k, y, eta, epochs), ttt_readout(q, k, y, eta, 1))
