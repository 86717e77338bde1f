"""EpisodeDataModule: batches of few-shot episodes for Lightning (train stream, fixed val set, seeded test set)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..errors import UserError
from .augment import augment
from .episodes import IMAGE_KEYS, ClassImages, EpisodeSpec, StreamSpec
from .registry import DATASETS, image_size_or_native

Spec = EpisodeSpec | StreamSpec
PROTOCOLS = ("batch", "online")  # all supports then the queries (EpisodeSpec); one image at a time (StreamSpec)


def resolve_root(root: str | os.PathLike | None) -> Path:
    """`root`, else the environment variable TTT_META_DATA, else ./data."""
    return Path(root or os.environ.get("TTT_META_DATA") or "data").expanduser()


class TrainEpisodes(IterableDataset):
    """The training batches: `batches` meta-batches per epoch, starting at batch number `start`.

    Batch i is drawn with a generator seeded by (seed, i) alone, so the stream is the same with any number of
    loader workers (worker w yields i = start + w, start + w + W, ...), and a resumed run picks it up at any batch.
    Each batch carries its number under "batch_index" (the data module removes it before the learner sees it).
    A batch's episodes share one of `specs` (N-way K-shot), drawn uniformly from the same generator when there
    are several. With `augment`, every image is augmented (``ttt_meta.data.augment``) from the same generator;
    with `label_space`, each episode also carries label_ids [N]: N distinct ids drawn from [0, label_space).
    """

    def __init__(self, data: ClassImages, specs: Spec | list[Spec], meta_batch_size: int, batches: int,
                 rotations: bool, seed: int, start: int = 0, augment: bool = False, label_space: int | None = None):
        specs = list(specs) if isinstance(specs, list | tuple) else [specs]
        self.data, self.specs, self.meta_batch_size, self.batches = data, specs, meta_batch_size, batches
        self.rotations, self.seed, self.start, self.augment, self.label_space = rotations, seed, start, augment, label_space

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        worker = get_worker_info()
        first, step = (0, 1) if worker is None else (worker.id, worker.num_workers)
        C, S = self.data.images.shape[:2]
        for i in range(self.start + first, self.start + self.batches, step):
            gen = torch.Generator().manual_seed(hash((self.seed, i)) % 2**63)
            spec = self.specs[int(torch.randint(len(self.specs), (), generator=gen))] if len(self.specs) > 1 \
                else self.specs[0]
            idx = spec.sample(self.meta_batch_size, C, S, gen, self.rotations, self.data.counts)
            batch = spec.batch(self.data.images, idx)
            if self.augment:
                batch.update({key: augment(batch[key], gen) for key in IMAGE_KEYS if key in batch})
            if self.label_space:
                batch["label_ids"] = torch.rand(len(idx), self.label_space, generator=gen).argsort(-1)[:, :spec.ways]
            yield {**batch, "batch_index": i}


class FixedEpisodes(Dataset):
    """A fixed set of episodes drawn once from `seed`: the same episodes on every run and for every model."""

    def __init__(self, data: ClassImages, spec: Spec, episodes: int, seed: int):
        C, S = data.images.shape[:2]
        self.data, self.spec = data, spec
        self.index = spec.sample(episodes, C, S, torch.Generator().manual_seed(seed), counts=data.counts)

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, ids: list[int]) -> dict[str, torch.Tensor]:
        return self.spec.batch(self.data.images, self.index[torch.as_tensor(ids)])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] if torch.is_tensor(v) else v for k, v in self.__getitems__([i]).items()}


def _identity(batch):
    return batch


class EpisodeDataModule(L.LightningDataModule):
    """Few-shot episodes from Omniglot, miniImageNet, CIFAR-FS, the synthetic glyph set or your own class folders,
    in the batch protocol (supports, then queries) or the online one (a stream: ``ttt_meta.data.episodes``).

    Args:
        dataset: "omniglot", "miniimagenet", "cifarfs", "synthetic" or "folder" (the names in
            ``ttt_meta.data.registry.DATASETS``, which gives each its loader and defaults).
        root: data root holding a folder per data set: ``omniglot/omniglot-py``, ``miniimagenet/`` (learn2learn's
            pickles, or images/ plus train/val/test.csv), ``cifarfs/`` (learn2learn's layout); for "folder", the
            folder that holds train/, val/ and test/ itself (``ttt_meta.data.folder``); default $TTT_META_DATA,
            then ./data. Never written to, except by a download you allow.
        download: fetch the data set into root with torchvision / learn2learn when it is absent.
        cache_dir: where decoded image tensors are cached (default $TTT_META_CACHE, then ~/.cache/ttt_meta).
        protocol: "batch": N-way K-shot episodes with Q queries per class; "online": streams of N classes with
            `instances` images each in random order, every image predicted before its label is given (Santoro
            et al. 2016); shots, queries and their eval_ and _up_to forms are then not used.
        instances: images per class in a stream (online protocol only; default 10, as Santoro et al.).
        ways, shots, queries: N-way K-shot episodes with Q queries per class (training).
        ways_up_to, shots_up_to: train on episodes of varied sizes: each training batch draws its N uniformly from
            [ways, ways_up_to] and its K from [shots, shots_up_to] (one model for several settings; with a
            sequence learner, set data.label_space and model max_ways to at least ways_up_to).
        eval_ways, eval_shots, eval_queries: validation/test episodes with another N, K or Q than training
            (default: the same).
        meta_batch_size: episodes per training batch.
        train_batches_per_epoch: training batches between two validations.
        val_episodes, test_episodes: sizes of the fixed validation set and of the seeded test set.
        eval_batch_size: episodes per validation/test batch.
        rotations: 90-degree rotations as new classes for training (Omniglot's standard augmentation); default
            the data set's own (``registry.DATASETS``): on for omniglot and synthetic, off for the natural
            images.
        augment: random crop with padding, horizontal flip and colour jitter of every training image (the
            standard augmentation of miniImageNet and CIFAR-FS; ``ttt_meta.data.augment``).
        label_space: give the N classes of each training episode N distinct label ids drawn from
            [0, label_space) instead of 0..N-1 (sequence learners), so every label embedding and head row of a
            model with max_ways = label_space is trained and it can be evaluated at up to that many ways.
        image_size: images are square of this side; default the data set's own (``registry.DATASETS``:
            Omniglot 28, miniImageNet 84, CIFAR-FS 32, synthetic 28, folder 84).
        val_seed, test_seed: seeds of the fixed validation and test episodes (independent of the run's seed).
        num_workers: loader workers for the training stream (0: sample in the main process, fastest here).
    """

    def __init__(self, dataset: str = "omniglot", root: str | None = None, download: bool = False,
                 cache_dir: str | None = None, protocol: str = "batch", instances: int | None = None, ways: int = 5,
                 shots: int = 1, queries: int = 15,
                 ways_up_to: int | None = None, shots_up_to: int | None = None,
                 eval_ways: int | None = None, eval_shots: int | None = None, eval_queries: int | None = None,
                 meta_batch_size: int = 16,
                 train_batches_per_epoch: int = 500, val_episodes: int = 200, test_episodes: int = 600,
                 eval_batch_size: int = 50, rotations: bool | None = None, augment: bool = False,
                 image_size: int | None = None, label_space: int | None = None, val_seed: int = 1,
                 test_seed: int = 2, num_workers: int = 0):
        super().__init__()
        if dataset not in DATASETS:
            raise UserError(f"unknown data.dataset {dataset!r}. Set it to one of {tuple(DATASETS)}")
        if protocol not in PROTOCOLS:
            raise UserError(f"unknown data.protocol {protocol!r}. Set it to one of {PROTOCOLS}")
        unused = [f"data.{name}" for name, value in [("shots_up_to", shots_up_to), ("eval_shots", eval_shots),
                                                     ("eval_queries", eval_queries)] if value is not None]
        if protocol == "online" and unused:
            verb, them = ("set", "them") if len(unused) > 1 else ("sets", "it")
            raise UserError(f"{' and '.join(unused)} {verb} the supports and queries of batch episodes; a stream of the "
                            f"online protocol has data.instances images per class instead. Remove {them}")
        if protocol == "batch" and instances is not None:
            raise UserError("data.instances sets the images per class of a stream (data.protocol: online); batch "
                            "episodes have data.shots and data.queries. Remove it, or set data.protocol: online")
        image_size = image_size_or_native(dataset, image_size)
        rotations = DATASETS[dataset].rotations if rotations is None else rotations
        for name, value in [("meta_batch_size", meta_batch_size), ("train_batches_per_epoch", train_batches_per_epoch),
                            ("val_episodes", val_episodes), ("test_episodes", test_episodes),
                            ("eval_batch_size", eval_batch_size), ("image_size", image_size)]:
            if value < 1:
                raise UserError(f"data.{name} must be >= 1, got {value}. Set it to 1 or more")
        for name, low, high in [("ways", ways, ways_up_to), ("shots", shots, shots_up_to)]:
            if high is not None and high < low:
                raise UserError(f"data.{name}_up_to ({high}) is below data.{name} ({low}): training episodes draw "
                                f"their {name} from [data.{name}, data.{name}_up_to]. Raise it or remove it")
        most_ways, option = (ways_up_to, "data.ways_up_to") if ways_up_to else (ways, "data.ways")
        if label_space is not None and label_space < most_ways:
            raise UserError(f"data.label_space ({label_space}) must be at least {option} ({most_ways}): each training "
                            f"episode needs {most_ways} distinct label ids. Raise data.label_space or remove it")
        self.save_hyperparameters(logger=False)  # the CLI logs the whole resolved config instead
        self.hparams.update(image_size=image_size, rotations=rotations)  # the data set's defaults, resolved
        if protocol == "online":
            instances = instances or 10
            self.train_specs: list[Spec] = [StreamSpec(n, instances) for n in range(ways, most_ways + 1)]
            self.eval_spec: Spec = StreamSpec(eval_ways or ways, instances)
        else:
            self.train_specs = [EpisodeSpec(n, k, queries) for n in range(ways, most_ways + 1)
                                for k in range(shots, (shots_up_to or shots) + 1)]
            self.eval_spec = EpisodeSpec(eval_ways or ways, eval_shots or shots, eval_queries or queries)
        self.train_spec = self.train_specs[-1]  # the largest: what the data must be able to give
        self.splits: dict[str, ClassImages] | None = None
        self.train_stream: TrainEpisodes | None = None
        self.resume_at = 0  # the training batch to start from, restored from a checkpoint

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(channels, height, width) of the images; None until the data is set up."""
        return None if self.splits is None else tuple(self.splits["train"].images.shape[2:])

    def prepare_data(self) -> None:
        """Download if allowed, decode once and fill the cache, and check that the splits can give the episodes
        (a loader that caches checks them before it decodes: a bad setting writes nothing); the splits are kept
        for this process's setup (the CLI calls this before the trainer writes anything)."""
        if self.splits is None:
            hp = self.hparams
            splits = DATASETS[hp.dataset].load(resolve_root(hp.root), hp.download, hp.cache_dir, hp.image_size,
                                               self.check_split)
            for split, data in splits.items():
                self.check_split(split, data.names, data.sizes())
            self.splits = splits

    def check_split(self, split: str, names: list[str], sizes: list[int]) -> None:
        """A UserError when the classes `names` of `split`, of sizes[c] images each, cannot give its episodes
        (an ``episodes.SplitCheck``)."""
        (self.train_spec if split == "train" else self.eval_spec).check(names, sizes, split)

    def setup(self, stage: str) -> None:
        self.prepare_data()  # a no-op when this process prepared it (Lightning prepares on one process per node)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _pin_memory(self) -> bool:
        """Page-locked batches when training on a GPU: each batch then moves to it in one asynchronous copy."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        rank, _ = self._rank()
        seed = torch.initial_seed() % 2**31 + 100_003 * rank  # every rank draws its own episodes
        self.train_stream = TrainEpisodes(self.splits["train"], self.train_specs, hp.meta_batch_size,
                                          hp.train_batches_per_epoch, hp.rotations, seed, start=self.resume_at,
                                          augment=hp.augment, label_space=hp.label_space)
        # workers are forked for each epoch, so each epoch's copy of the stream starts at the current batch
        return DataLoader(self.train_stream, batch_size=None, num_workers=hp.num_workers, pin_memory=self._pin_memory())

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if "batch_index" in batch:  # a training batch is consumed (not merely prefetched): the stream moves on
            self.train_stream.start = int(batch.pop("batch_index")) + 1
        return batch

    def state_dict(self) -> dict:
        """The stream's position, saved in checkpoints (Lightning restores it before it asks for the loader)."""
        return {"next_train_batch": self.train_stream.start if self.train_stream is not None else self.resume_at}

    def load_state_dict(self, state: dict) -> None:
        self.resume_at = int(state["next_train_batch"])

    def _fixed(self, split: str, episodes: int, seed: int) -> DataLoader:
        """The fixed episodes of `split`; with several processes, each scores its own share, none twice."""
        rank, world = self._rank()
        fixed = FixedEpisodes(self.splits[split], self.eval_spec, episodes, seed)
        shard = torch.utils.data.Subset(fixed, range(rank, episodes, world)) if world > 1 else fixed
        return DataLoader(shard, batch_size=self.hparams.eval_batch_size, collate_fn=_identity,
                          pin_memory=self._pin_memory())

    def val_dataloader(self) -> DataLoader:
        return self._fixed("val", self.hparams.val_episodes, self.hparams.val_seed)

    def test_dataloader(self) -> DataLoader:
        return self._fixed("test", self.hparams.test_episodes, self.hparams.test_seed)
