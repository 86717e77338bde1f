"""SequenceMetaLearner's opt-in options: the auxiliary ProtoNets loss (proto_aux_weight), the prototype logits added
to the head's (prototype_residual), the hybrid's head trained apart (head_aux_weight) and fixed equiangular label codes
(label_codes), the TTT cores' normalised queries and keys (normalize_qk) and inner epochs; their defaults leave the
model as it was."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from ttt_meta.errors import UserError
from ttt_meta.learners import ProtoNetLearner, SequenceMetaLearner, protonet
from ttt_meta.learners.base import EpisodicLearner
from ttt_meta.learners.protonet import prototype_logits
from ttt_meta.measure import episode_accuracy, random_episodes

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
    named = tiny(tied_head=tied, label_codes="learned", proto_aux_weight=0.0, prototype_residual=False,
                 head_aux_weight=0.0, normalize_qk=False, inner_epochs=1)
    hp = model.hparams
    assert (hp.label_codes, hp.proto_aux_weight, hp.prototype_residual, hp.head_aux_weight) == ("learned", 0.0, False,
                                                                                               0.0)
    state, named_state = model.state_dict(), named.state_dict()
    assert list(state) == list(named_state) and all(torch.equal(v, named_state[k]) for k, v in state.items())
    assert state["model.label_embed.weight"].shape == (6, 16)
    assert not any("fixed_label_codes" in k or "no_label_code" in k for k in state)
    batch = episodes()
    with torch.no_grad():
        want = pre_option_logits(model.model, model.images(batch["support"]), batch["support_labels"],
                                 model.images(batch["query"]), batch["ways"])
        assert torch.equal(model(batch), want)
        loss = model.loss_and_accuracy(batch)[0]  # training mode: no auxiliary term
        assert torch.equal(loss, EpisodicLearner.loss_and_accuracy(model, batch)[0])


def test_ttt_options_reach_every_layer():
    """normalize_qk and inner_epochs are set on every TTT layer and change the logits; the parameters are the same."""
    model, changed = tiny(depth=2), tiny(depth=2, normalize_qk=True, inner_epochs=2)
    assert [(layer.normalize_qk, layer.inner_epochs) for _, layer in changed.ttt_layers()] == [(True, 2)] * 2
    changed.load_state_dict(model.state_dict())
    batch = episodes()
    with torch.no_grad():
        assert not torch.allclose(model(batch), changed(batch))


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


def test_proto_aux_loss_is_added_in_training_from_one_encoder_pass():
    weight = 0.7
    model = tiny(proto_aux_weight=weight)
    batch = with_label_ids(episodes())
    calls = []
    model.model.encoder.register_forward_hook(lambda *args: calls.append(1))
    loss, acc = model.loss_and_accuracy(batch)
    assert len(calls) == 1
    y = batch["query_labels"]
    with torch.no_grad():
        logits = model(batch)  # training mode, as the step: BatchNorm with the batch's statistics
        support, query = features(model, batch)
        centres = torch.stack([support[:, batch["support_labels"][0] == n].mean(1) for n in range(3)], 1)
        proto_loss = F.cross_entropy((-(query[:, :, None] - centres[:, None]).square().sum(-1)).flatten(0, 1),
                                     y.flatten())
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), y.flatten()) + weight * proto_loss)
    assert proto_loss > 0 and torch.equal(acc, episode_accuracy(logits, y))
    loss.backward()
    assert model.model.encoder.net[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():  # validation and test: the sequence model's loss alone
        assert torch.equal(model.loss_and_accuracy(batch)[0], EpisodicLearner.loss_and_accuracy(model, batch)[0])


@pytest.mark.parametrize("training", [True, False])
def test_prototype_residual_adds_prototype_logits_from_one_encoder_pass(training):
    """logits = the same weights' sequence logits + -||e(query) - c_n||^2 (by hand), with random label ids, in
    training and in evaluation, from one encoder pass; the state_dict is the pure model's."""
    hybrid, pure = tiny(tied_head=True, prototype_residual=True), tiny(tied_head=True)
    assert list(hybrid.state_dict()) == list(pure.state_dict())
    pure.load_state_dict(hybrid.state_dict())
    hybrid.train(training), pure.train(training)
    batch = with_label_ids(episodes())
    calls = []
    hybrid.model.encoder.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        got = hybrid(batch)
        assert len(calls) == 1
        support, query = features(pure, batch)
        centres = torch.stack([support[:, batch["support_labels"][0] == n].mean(1) for n in range(3)], 1)
        want = pure(batch) - (query[:, :, None] - centres[:, None]).square().sum(-1)
    torch.testing.assert_close(got, want)


def test_head_aux_loss_trains_the_hybrids_head_apart():
    """loss = CE(head + prototype) + w * CE(head), the head the same weights' pure model's logits, from one encoder
    pass; evaluation reports the hybrid's loss alone."""
    weight = 0.5
    hybrid, pure = tiny(prototype_residual=True, head_aux_weight=weight), tiny()
    pure.load_state_dict(hybrid.state_dict())
    batch = with_label_ids(episodes())
    calls = []
    hybrid.model.encoder.register_forward_hook(lambda *args: calls.append(1))
    loss, acc = hybrid.loss_and_accuracy(batch)
    assert len(calls) == 1
    y = batch["query_labels"].flatten()
    with torch.no_grad():
        head, logits = pure(batch), hybrid(batch)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), y) +
                               weight * F.cross_entropy(head.flatten(0, 1), y))
    assert torch.equal(acc, episode_accuracy(logits, batch["query_labels"]))
    hybrid.eval()
    with torch.no_grad():
        assert torch.equal(hybrid.loss_and_accuracy(batch)[0], EpisodicLearner.loss_and_accuracy(hybrid, batch)[0])


def test_proto_aux_loss_is_logged(tmp_path):
    model = tiny(proto_aux_weight=0.5, warmup_steps=1)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([episodes(seed=s) for s in range(2)],
                                                                       batch_size=None))
    assert torch.isfinite(trainer.callback_metrics["train/proto_aux_loss_step"])
    assert "train/loss_step" in trainer.callback_metrics


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
    with pytest.raises(UserError, match=r"model.init_args.proto_aux_weight"):
        tiny(proto_aux_weight=-1.0)
    with pytest.raises(UserError, match=r"model.init_args.head_aux_weight"):
        tiny(prototype_residual=True, head_aux_weight=-1.0)
    with pytest.raises(UserError, match=r"model.init_args.prototype_residual=true or head_aux_weight=0"):
        tiny(head_aux_weight=1.0)
