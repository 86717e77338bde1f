"""SequenceMetaLearner's opt-in option fixed equiangular label codes (label_codes), whose default leaves the model as
it was; the prototype logits ProtoNets and scripts/head_gain.py compute."""

import pytest
import torch
import torch.nn.functional as F

from ttt_meta.errors import UserError
from ttt_meta.learners import ProtoNetLearner, SequenceMetaLearner, protonet
from ttt_meta.learners.protonet import prototype_logits
from ttt_meta.measure import random_episodes

TINY = dict(width=16, depth=1, num_heads=2, encoder_channels=4, image_size=28, max_ways=5, mini_batch_size=4)


def tiny(seed=0, **kwargs) -> SequenceMetaLearner:
    torch.manual_seed(seed)
    return SequenceMetaLearner(**{**TINY, **kwargs})


def episodes(n=2, ways=3, shots=2, queries=2, seed=0) -> dict:
    return random_episodes(n, ways, shots, queries, 28, channels=1, generator=torch.Generator().manual_seed(seed))


def with_label_ids(batch: dict, space: int = 5, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(space, generator=gen)[:batch["ways"]] for _ in range(len(batch["support"]))])
    return dict(batch, label_ids=ids)


def features(model, batch: dict):
    """The sequence model's encoder features, split: support [B, NK, F], query [B, NQ, F]."""
    support, query = model.images(batch["support"]), model.images(batch["query"])
    B, NK = support.shape[:2]
    emb = model.model.encoder(torch.cat([support, query], 1).flatten(0, 1)).view(B, NK + query.shape[1], -1)
    return emb[:, :NK], emb[:, NK:]


def pre_option_logits(m, support, support_labels, query, ways):
    """EpisodeSequenceModel's forward as written before the options (label_ids None)."""
    B, NK, NQ = support.shape[0], support.shape[1], query.shape[1]
    feats = m.encoder(torch.cat([support, query], dim=1).flatten(0, 1)).view(B, NK + NQ, -1)
    labels = torch.cat([support_labels, support_labels.new_full((B, NQ), m.max_ways)], dim=1)
    x = m.embed(feats) + m.label_embed(labels)
    for block in m.blocks:
        x = block(x, NK)
    logits = m.head(m.norm(x[:, NK:]))
    if m.tied_head:
        logits = logits @ m.label_embed.weight[:m.max_ways].T * m.label_embed.embedding_dim**-0.5
    return logits[..., :ways]


@pytest.mark.parametrize("tied", [False, True])
def test_defaults_leave_the_model_as_it_was(tied):
    """The defaults: the same state_dict as naming them, a learned label embedding of max_ways + 1 rows, the forward
    (and its training loss) of before, bitwise."""
    model = tiny(tied_head=tied)
    named = tiny(tied_head=tied, label_codes="learned")
    assert model.hparams.label_codes == "learned"
    state, named_state = model.state_dict(), named.state_dict()
    assert list(state) == list(named_state) and all(torch.equal(v, named_state[k]) for k, v in state.items())
    assert state["model.label_embed.weight"].shape == (6, 16)
    assert not any("fixed_label_codes" in k or "no_label_code" in k for k in state)
    batch = episodes()
    with torch.no_grad():
        want = pre_option_logits(model.model, model.images(batch["support"]), batch["support_labels"],
                                 model.images(batch["query"]), batch["ways"])
        assert torch.equal(model(batch), want)


def test_prototype_logits_by_hand_and_protonet_uses_them(monkeypatch):
    torch.manual_seed(0)
    support, query = torch.randn(2, 6, 5), torch.randn(2, 4, 5)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 0, 1, 0, 1]])
    got = prototype_logits(support, labels, query, 3)
    assert got.shape == (2, 4, 3)
    for b in range(2):
        for n in range(3):
            centre = support[b][labels[b] == n].mean(0)
            for q in range(4):
                assert abs(got[b, q, n] + (query[b, q] - centre).square().sum()) < 1e-5

    model = ProtoNetLearner(encoder_channels=4).eval()
    batch = episodes()
    calls = []
    monkeypatch.setattr(protonet, "prototype_logits", lambda *a: calls.append(1) or prototype_logits(*a))
    with torch.no_grad():
        logits = model(batch)
        images = model.images(torch.cat([batch["support"], batch["query"]], 1))
        emb = model.encoder(images.flatten(0, 1)).view(2, 12, -1)
    assert calls == [1]
    onehot = F.one_hot(batch["support_labels"], 3).float()  # ProtoNetLearner's computation before it was shared
    protos = onehot.transpose(1, 2) @ emb[:, :6] / onehot.sum(1).unsqueeze(-1)
    assert torch.equal(logits, -torch.cdist(emb[:, 6:], protos).square())


def test_logit_terms_give_the_served_logits_and_the_encoders_prototype_logits():
    """logit_terms(prototype=True): the served logits and -||e(query) - c_n||^2 of the same encoder pass (by hand)."""
    model = tiny().eval()
    batch = with_label_ids(episodes())
    calls = []
    model.model.encoder.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        served, prototype = model.logit_terms(batch, prototype=True)
        assert len(calls) == 1
        support, query = features(model, batch)
        centres = torch.stack([support[:, batch["support_labels"][0] == n].mean(1) for n in range(3)], 1)
        torch.testing.assert_close(prototype, -(query[:, :, None] - centres[:, None]).square().sum(-1))
        assert torch.equal(served, model(batch)) and model.logit_terms(batch)[1] is None


@pytest.mark.parametrize("ways", [5, 17])
def test_equiangular_codes_are_a_fixed_simplex_frame(ways):
    model = tiny(label_codes="equiangular", max_ways=ways)
    codes = model.model.fixed_label_codes
    assert codes.shape == (ways, 16) and not codes.requires_grad
    norms = codes.norm(dim=1)
    torch.testing.assert_close(norms, torch.full((ways,), 4.0), rtol=1e-5, atol=1e-5)
    cosines = (codes @ codes.T) / (norms[:, None] * norms[None])
    want = torch.full((ways, ways), -1 / (ways - 1)).fill_diagonal_(1.0)
    torch.testing.assert_close(cosines, want, rtol=0, atol=1e-5)
    assert all(p.data_ptr() != codes.data_ptr() for p in model.parameters())
    assert "model.fixed_label_codes" in model.state_dict() and "model.label_embed.weight" not in model.state_dict()
    assert model.model.label_rows().shape == (ways + 1, 16)
    again = tiny(label_codes="equiangular", max_ways=ways).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    assert torch.equal(tiny(7, label_codes="equiangular", max_ways=ways).model.fixed_label_codes, codes)


@pytest.mark.parametrize("tied", [False, True])
def test_equiangular_codes_train_and_serve_label_ids(tied):
    """A training step: finite loss, the codes get no gradient and stay, the "no label" row and the rest move; with
    tied_head, the head scores queries against the fixed codes of the episode's label ids."""
    model = tiny(label_codes="equiangular", tied_head=tied)
    m = model.model
    batch = with_label_ids(episodes())
    codes, before = m.fixed_label_codes.clone(), {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss, _ = model.loss_and_accuracy(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert m.fixed_label_codes.grad is None and m.no_label_code.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(m.fixed_label_codes, codes)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"model.no_label_code", "model.embed.weight", "model.head.weight"} <= moved
    if tied:
        heads = []
        m.head.register_forward_hook(lambda module, args, out: heads.append(out))
        with torch.no_grad():
            logits = model(batch)
        want = torch.einsum("bqw,bnw->bqn", heads[0], codes[batch["label_ids"]]) / 4
        torch.testing.assert_close(logits, want)


def test_bad_options_are_named():
    with pytest.raises(UserError, match=r"model.init_args.max_ways or raise model.init_args.width"):
        tiny(label_codes="equiangular", max_ways=18)
    with pytest.raises(UserError, match=r"model.init_args.label_codes to one of \['learned', 'equiangular'\]"):
        tiny(label_codes="orthogonal")
