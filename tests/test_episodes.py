"""Episodes: shapes, labels, class purity, fixed evaluation sets, independent training streams, rotations, varied
sizes; the data module on synthetic glyphs, Omniglot and a miniImageNet fixture (with augmentation)."""

from pathlib import Path

import pytest
import torch
from fixtures import write_pickles

from ttt_meta.data.datamodule import EpisodeDataModule, FixedEpisodes, TrainEpisodes
from ttt_meta.data.episodes import ClassImages, EpisodeSpec, materialize, sample_episodes


def _tagged(C=12, S=10, size=8) -> ClassImages:
    """Images whose pixel (0, 0) is the class id and pixel (0, 1) the sample id; the rest is a class-free pattern."""
    x = torch.zeros(C, S, 1, size, size, dtype=torch.uint8)
    x[:, :, 0, 0, 0] = torch.arange(C).view(C, 1)
    x[:, :, 0, 0, 1] = torch.arange(S).view(1, S)
    return ClassImages(x, [f"c{i}" for i in range(C)])


def test_episode_shapes_and_labels():
    data, spec = _tagged(), EpisodeSpec(ways=4, shots=2, queries=3)
    idx = sample_episodes(6, spec, 12, 10, torch.Generator().manual_seed(0))
    b = materialize(data.images, idx, spec.shots)
    assert b["support"].shape == (6, 8, 1, 8, 8) and b["query"].shape == (6, 12, 1, 8, 8)
    assert b["support"].dtype == torch.uint8 and b["ways"] == 4
    for e in range(6):
        cls_s, cls_q = b["support"][e, :, 0, 0, 0].long(), b["query"][e, :, 0, 0, 0].long()
        ys, yq = b["support_labels"][e], b["query_labels"][e]
        assert sorted(ys.tolist()) == sorted(list(range(4)) * 2) and sorted(yq.tolist()) == sorted(list(range(4)) * 3)
        for y in range(4):  # one class per label, the same in supports and queries
            assert len(set(cls_s[ys == y].tolist()) | set(cls_q[yq == y].tolist())) == 1
        assert len(set(cls_s.tolist())) == 4
        # no image is both a support and a query
        pairs = lambda x: {tuple(p) for p in x[:, 0, 0, :2].tolist()}  # noqa: E731
        assert not pairs(b["support"][e]) & pairs(b["query"][e])
    assert not torch.equal(b["support_labels"][0], torch.arange(4).repeat_interleave(2))  # order is shuffled


def test_rotations_are_new_classes():
    x = torch.zeros(3, 4, 1, 6, 6, dtype=torch.uint8)
    x[..., 0, 0] = 255  # a mark in the top-left corner
    spec = EpisodeSpec(ways=12, shots=1, queries=1)
    idx = sample_episodes(1, spec, 3, 4, torch.Generator().manual_seed(0), rotations=True)
    assert sorted(idx.classes[0].tolist()) == list(range(12))
    b = materialize(x, idx, 1)
    corners = {(0, 0), (5, 0), (5, 5), (0, 5)}
    for img, y in zip(b["support"][0], b["support_labels"][0], strict=True):
        r = int(idx.classes[0, y]) // 3
        where = tuple(torch.nonzero(img[0])[0].tolist())
        assert where in corners
        assert where == [(0, 0), (5, 0), (5, 5), (0, 5)][r]


def test_classes_of_different_sizes_draw_only_their_own_images():
    """With counts, class c's samples come from its first counts[c]; counts of all S draw what no counts draws."""
    counts = torch.tensor([3, 10, 4, 5] * 3)
    spec = EpisodeSpec(ways=12, shots=1, queries=2)
    idx = sample_episodes(50, spec, 12, 10, torch.Generator().manual_seed(0), rotations=True, counts=counts)
    assert (idx.samples < counts[idx.classes % 12].unsqueeze(-1)).all()
    assert (idx.classes >= 12).any()  # rotated copies keep their class's count
    draw = lambda counts: sample_episodes(8, spec, 12, 10, torch.Generator().manual_seed(1), counts=counts)  # noqa: E731
    a, b = draw(None), draw(torch.full((12,), 10))
    assert torch.equal(a.classes, b.classes) and torch.equal(a.samples, b.samples)


def test_spec_errors():
    names = [f"c{i}" for i in range(10)]
    with pytest.raises(ValueError, match="ways >= 2"):
        EpisodeSpec(1, 1, 1).check(names, [20] * 10, "train")
    with pytest.raises(ValueError, match="Lower data.eval_ways"):
        EpisodeSpec(30, 1, 1).check(names, [20] * 10, "val")
    with pytest.raises(ValueError, match="Lower data.ways"):
        EpisodeSpec(30, 1, 1).check(names, [20] * 10, "train")
    with pytest.raises(ValueError, match="25 exceeds the 20 samples per class of the test split"):
        EpisodeSpec(5, 10, 15).check(names, [20] * 10, "test")
    with pytest.raises(ValueError, match="6 exceeds the 5 images of c3, the smallest class of the train split.*add "
                                         "images to that class"):
        EpisodeSpec(5, 1, 5).check(names, [9, 9, 7, 5, 6, 9, 9, 9, 9, 5], "train")


def test_fixed_episodes_are_fixed_and_streams_differ():
    data, spec = _tagged(), EpisodeSpec(3, 1, 2)
    a, b = FixedEpisodes(data, spec, 20, seed=5), FixedEpisodes(data, spec, 20, seed=5)
    ea, eb = a.__getitems__(list(range(20))), b.__getitems__(list(range(20)))
    assert all(torch.equal(ea[k], eb[k]) for k in ("support", "query", "query_labels"))
    one = a[3]
    assert torch.equal(one["query"], ea["query"][3])
    s1 = next(iter(TrainEpisodes(data, spec, 4, 10, False, seed=0)))
    s2 = next(iter(TrainEpisodes(data, spec, 4, 10, False, seed=1)))
    assert not torch.equal(s1["support"], s2["support"])
    stream = TrainEpisodes(data, spec, 4, 3, False, seed=0)
    first = list(stream)
    assert [b["batch_index"] for b in first] == [0, 1, 2]
    assert torch.equal(next(iter(stream))["support"], first[0]["support"])  # a batch number gives its batch
    stream.start = 3  # what the data module does as batches are consumed: the next epoch goes on
    assert [b["batch_index"] for b in stream] == [3, 4, 5]
    assert not torch.equal(next(iter(stream))["support"], first[0]["support"])


def test_datamodule_synthetic():
    dm = EpisodeDataModule(dataset="synthetic", ways=5, shots=1, queries=2, eval_queries=4, meta_batch_size=3,
                           train_batches_per_epoch=2, val_episodes=7, test_episodes=9, eval_batch_size=4)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 2 and train[0]["query"].shape[:2] == (3, 10)
    val = list(dm.val_dataloader())
    assert [v["query"].shape[0] for v in val] == [4, 3] and val[0]["query"].shape[1] == 20
    assert sum(t["query"].shape[0] for t in dm.test_dataloader()) == 9
    with pytest.raises(ValueError, match="dataset"):
        EpisodeDataModule(dataset="imagenet")
    with pytest.raises(ValueError, match=r"Lower data.eval_ways \(unset, they take the training values\)"):
        EpisodeDataModule(dataset="synthetic", ways=200).setup("fit")


def test_omniglot_datamodule_real(omniglot_root):
    dm = EpisodeDataModule(dataset="omniglot", root=str(omniglot_root), ways=20, shots=5, queries=15,
                           test_episodes=10, eval_batch_size=10)
    dm.setup("test")
    assert [len(dm.splits[s].names) for s in ("train", "val", "test")] == [1100, 100, 423]
    assert not set(dm.splits["train"].names) & set(dm.splits["test"].names)
    b = next(iter(dm.test_dataloader()))
    assert b["support"].shape == (10, 100, 1, 28, 28) and b["query"].shape == (10, 300, 1, 28, 28)


def test_loader_workers_draw_different_episodes_every_epoch():
    dm = EpisodeDataModule(dataset="synthetic", ways=3, shots=1, queries=2, meta_batch_size=4,
                           train_batches_per_epoch=4, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    seen = [dm.on_after_batch_transfer(b, 0)["support"] for _ in range(2) for b in loader]  # 2 epochs, consumed
    assert len(seen) == 8
    assert len({x.numpy().tobytes() for x in seen}) == 8  # no batch repeats across workers or epochs


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def datamodule(root: Path, cache: Path, **options) -> EpisodeDataModule:
    dm = EpisodeDataModule(dataset="miniimagenet", root=str(root), cache_dir=str(cache), ways=5, shots=1, queries=2,
                           meta_batch_size=3, train_batches_per_epoch=2, val_episodes=4, eval_batch_size=4, **options)
    dm.setup("fit")
    return dm


def test_episodes_from_miniimagenet(tmp_path, cache):
    dm = datamodule(write_pickles(tmp_path / "miniimagenet").parent, cache)
    assert dm.hparams.image_size == 84 and dm.hparams.rotations is False and dm.image_shape == (3, 84, 84)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["support"].shape == (3, 5, 3, 84, 84) and batch["query"].shape == (3, 10, 3, 84, 84)
    assert batch["support"].dtype == torch.uint8 and sorted(batch["support_labels"][0].tolist()) == list(range(5))
    val = next(iter(dm.val_dataloader()))
    assert val["support"].shape == (4, 5, 3, 84, 84)


def test_augmented_training_stream(tmp_path, cache):
    """Augmentation changes the training images, is the same for the same seed, and leaves validation alone."""
    root = write_pickles(tmp_path / "miniimagenet").parent
    torch.manual_seed(0)
    plain = next(iter(datamodule(root, cache).train_dataloader()))
    streams = []
    for _ in range(2):
        torch.manual_seed(0)
        dm = datamodule(root, cache, augment=True)
        streams.append(next(iter(dm.train_dataloader())))
    assert torch.equal(plain["support_labels"], streams[0]["support_labels"])  # the same episodes...
    assert not torch.equal(plain["support"], streams[0]["support"])  # ...augmented
    assert all(torch.equal(streams[0][k], streams[1][k]) for k in ("support", "query"))
    val = next(iter(dm.val_dataloader()))
    assert torch.equal(val["support"], next(iter(datamodule(root, cache).val_dataloader()))["support"])


def test_training_episodes_of_varied_sizes():
    """ways_up_to / shots_up_to: each batch draws its N and K from the ranges (every pair occurs), the same
    batches for the same seed; without them the stream is the one of a single spec; mistakes are named."""
    dm = EpisodeDataModule(dataset="synthetic", ways=3, ways_up_to=5, shots=1, shots_up_to=2, queries=2,
                           meta_batch_size=2, label_space=6)
    assert [(s.ways, s.shots) for s in dm.train_specs] == [(3, 1), (3, 2), (4, 1), (4, 2), (5, 1), (5, 2)]
    assert (dm.train_spec.ways, dm.train_spec.shots) == (5, 2)
    data = _tagged(C=20, S=10)
    stream = TrainEpisodes(data, dm.train_specs, 2, 60, False, seed=0, label_space=6)
    batches = list(stream)
    sizes = {(b["ways"], b["support"].shape[1] // b["ways"]) for b in batches}
    assert sizes == {(3, 1), (3, 2), (4, 1), (4, 2), (5, 1), (5, 2)}
    for b in batches:
        N = b["ways"]
        assert b["query"].shape[1] == 2 * N and b["label_ids"].shape == (2, N) and b["support_labels"].max() == N - 1
    again = list(stream)
    assert all(torch.equal(a["support"], b["support"]) for a, b in zip(batches, again))
    single = next(iter(TrainEpisodes(data, [EpisodeSpec(3, 1, 2)], 2, 1, False, seed=0)))
    same = next(iter(TrainEpisodes(data, EpisodeSpec(3, 1, 2), 2, 1, False, seed=0)))
    assert torch.equal(single["support"], same["support"])
    with pytest.raises(ValueError, match=r"data.ways_up_to \(2\) is below data.ways \(3\)"):
        EpisodeDataModule(dataset="synthetic", ways=3, ways_up_to=2)
    with pytest.raises(ValueError, match=r"label_space \(4\) must be at least data.ways_up_to \(5\)"):
        EpisodeDataModule(dataset="synthetic", ways=3, ways_up_to=5, label_space=4)


def test_models_are_held_to_every_training_size():
    """A MAML head of 5 ways refuses 5-to-8-way training; a sequence model needs max_ways >= ways_up_to."""
    from ttt_meta.learners import MAMLLearner, SequenceMetaLearner

    dm = EpisodeDataModule(dataset="synthetic", ways=5, ways_up_to=8, label_space=8)
    with pytest.raises(ValueError, match="serves exactly 5 ways"):
        MAMLLearner(ways=5, encoder_channels=4).check_data(EpisodeDataModule(dataset="synthetic", ways=5, ways_up_to=8))
    with pytest.raises(ValueError, match="serves at most 6 ways"):
        SequenceMetaLearner(width=16, encoder_channels=4, max_ways=6).check_data(dm)
    SequenceMetaLearner(width=16, encoder_channels=4, max_ways=8).check_data(dm)
