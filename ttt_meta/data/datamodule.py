"""EpisodeDataModule: batches of few-shot episodes for Lightning (train stream, fixed val set, seeded test set)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .episodes import ClassImages, EpisodeSpec, materialize, sample_episodes

DATASETS = ("omniglot", "synthetic")


def resolve_root(root: str | os.PathLike | None) -> Path:
    """`root`, else the environment variable TTT_META_DATA, else ./data."""
    return Path(root or os.environ.get("TTT_META_DATA") or "data").expanduser()


class TrainEpisodes(IterableDataset):
    """An endless stream of meta-batches, `batches` of them per epoch. Each process (rank, loader worker) has its
    own generator, so every one draws different episodes; the stream goes on across epochs."""

    def __init__(self, data: ClassImages, spec: EpisodeSpec, meta_batch_size: int, batches: int, rotations: bool,
                 seed: int):
        self.data, self.spec, self.meta_batch_size, self.batches, self.rotations = data, spec, meta_batch_size, batches, rotations
        self.generator = torch.Generator().manual_seed(seed)
        self.worker_generator = None  # set in each loader worker's copy of the dataset

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        worker = get_worker_info()
        gen, count = self.generator, self.batches
        if worker is not None:  # a generator per worker, seeded by the loader; kept across epochs (persistent)
            if self.worker_generator is None:
                self.worker_generator = torch.Generator().manual_seed(worker.seed)
            gen, count = self.worker_generator, len(range(worker.id, self.batches, worker.num_workers))
        C, S = self.data.images.shape[:2]
        for _ in range(count):
            idx = sample_episodes(self.meta_batch_size, self.spec, C, S, gen, self.rotations)
            yield materialize(self.data.images, idx, self.spec.shots)


class FixedEpisodes(Dataset):
    """A fixed set of episodes drawn once from `seed`: the same episodes on every run and for every model."""

    def __init__(self, data: ClassImages, spec: EpisodeSpec, episodes: int, seed: int):
        C, S = data.images.shape[:2]
        self.data, self.spec = data, spec
        self.index = sample_episodes(episodes, spec, C, S, torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.index)

    def __getitems__(self, ids: list[int]) -> dict[str, torch.Tensor]:
        return materialize(self.data.images, self.index[torch.as_tensor(ids)], self.spec.shots)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] if torch.is_tensor(v) else v for k, v in self.__getitems__([i]).items()}


def _identity(batch):
    return batch


class EpisodeDataModule(L.LightningDataModule):
    """Few-shot episodes from Omniglot or the synthetic glyph set.

    Args:
        dataset: "omniglot" or "synthetic".
        root: data root holding ``omniglot/omniglot-py``; default $TTT_META_DATA, then ./data. Never written to,
            except by a download you allow.
        download: fetch Omniglot into root when it is absent.
        cache_dir: where decoded image tensors are cached (default $TTT_META_CACHE, then ~/.cache/ttt_meta).
        ways, shots, queries: N-way K-shot episodes with Q queries per class (training).
        eval_ways, eval_shots, eval_queries: validation/test episodes with another N, K or Q than training
            (default: the same).
        meta_batch_size: episodes per training batch.
        train_batches_per_epoch: training batches between two validations.
        val_episodes, test_episodes: sizes of the fixed validation set and of the seeded test set.
        eval_batch_size: episodes per validation/test batch.
        rotations: 90-degree rotations as new classes for training (Omniglot's standard augmentation).
        val_seed, test_seed: seeds of the fixed validation and test episodes (independent of the run's seed).
        num_workers: loader workers for the training stream (0: sample in the main process, fastest here).
    """

    def __init__(self, dataset: str = "omniglot", root: str | None = None, download: bool = False,
                 cache_dir: str | None = None, ways: int = 5, shots: int = 1, queries: int = 15,
                 eval_ways: int | None = None, eval_shots: int | None = None, eval_queries: int | None = None,
                 meta_batch_size: int = 16,
                 train_batches_per_epoch: int = 500, val_episodes: int = 200, test_episodes: int = 600,
                 eval_batch_size: int = 50, rotations: bool = True, image_size: int = 28, val_seed: int = 1,
                 test_seed: int = 2, num_workers: int = 0):
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"data.dataset must be one of {DATASETS}, got {dataset!r}")
        for name, value in [("meta_batch_size", meta_batch_size), ("train_batches_per_epoch", train_batches_per_epoch),
                            ("val_episodes", val_episodes), ("test_episodes", test_episodes),
                            ("eval_batch_size", eval_batch_size), ("image_size", image_size)]:
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        self.save_hyperparameters()
        self.train_spec = EpisodeSpec(ways, shots, queries)
        self.eval_spec = EpisodeSpec(eval_ways or ways, eval_shots or shots, eval_queries or queries)
        self.splits: dict[str, ClassImages] | None = None

    @property
    def max_ways(self) -> int:
        return max(self.train_spec.ways, self.eval_spec.ways)

    def prepare_data(self) -> None:
        if self.hparams.dataset == "omniglot":
            self._load()  # downloads if allowed, decodes once and fills the cache (synthetic: nothing to prepare)

    def _load(self) -> dict[str, ClassImages]:
        hp = self.hparams
        if hp.dataset == "synthetic":
            from .synthetic import load_synthetic
            return load_synthetic(image_size=hp.image_size)
        from .omniglot import load_omniglot
        return load_omniglot(resolve_root(hp.root) / "omniglot", download=hp.download, cache_dir=hp.cache_dir,
                             image_size=hp.image_size)

    def setup(self, stage: str) -> None:
        if self.splits is None:
            self.splits = self._load()
        for split, spec in [("train", self.train_spec), ("val", self.eval_spec), ("test", self.eval_spec)]:
            C, S = self.splits[split].images.shape[:2]
            spec.check(C, S, split)

    def _seed(self) -> int:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return torch.initial_seed() % 2**31 + 100_003 * rank

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        stream = TrainEpisodes(self.splits["train"], self.train_spec, hp.meta_batch_size, hp.train_batches_per_epoch,
                               hp.rotations, self._seed())
        return DataLoader(stream, batch_size=None, num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)

    def _fixed(self, split: str, episodes: int, seed: int) -> DataLoader:
        return DataLoader(FixedEpisodes(self.splits[split], self.eval_spec, episodes, seed),
                          batch_size=self.hparams.eval_batch_size, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        return self._fixed("val", self.hparams.val_episodes, self.hparams.val_seed)

    def test_dataloader(self) -> DataLoader:
        return self._fixed("test", self.hparams.test_episodes, self.hparams.test_seed)
