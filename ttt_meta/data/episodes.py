"""Few-shot episodes sampled by indexing a pre-decoded uint8 image tensor (no PIL, no per-sample Python).

An episode is drawn as indices: N classes, K + Q samples of each, and a shuffle of the support and query
tokens. Materialising gathers the images. Labels are the class's position among the episode's N classes, so
they are a fresh random assignment in every episode.

Batch of episodes (what the learners receive):
    support [B, N*K, C, H, W] uint8, support_labels [B, N*K] int64,
    query   [B, N*Q, C, H, W] uint8, query_labels   [B, N*Q] int64,
    ways    N (an int)
    label_ids [B, N] int64, training batches with data.label_space only: the id a sequence model gives class n

Batch of streams (the online protocol, Santoro et al. 2016: ``StreamSpec``): N classes with S instances each,
shuffled into one sequence; the learner predicts image t's class from images 0..t and labels 0..t-1 (label t
arrives with the next step):
    stream [B, N*S, C, H, W] uint8, stream_labels [B, N*S] int64, ways N (and label_ids as above)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError

ROTATIONS = 4  # 0, 90, 180, 270 degrees: each rotation of a class is a class of its own (training only)
SPLITS = ("train", "val", "test")  # the splits every data set has: disjoint classes for training, validation, test


@dataclass(frozen=True)
class ClassImages:
    """Images of one split, grouped by class: images uint8 [C, S, channels, H, W], names[c] the class name.

    With counts (int64 [C]), class c has only its first counts[c] images, the rest of its S is padding (classes of
    different sizes); without, every class has all S.
    """

    images: Tensor
    names: list[str]
    counts: Tensor | None = None

    def sizes(self) -> list[int]:
        """The number of images of each class."""
        return self.counts.tolist() if self.counts is not None else [self.images.shape[1]] * len(self.names)


# check(split, class names, images per class): raises a UserError when that split cannot give its episodes
SplitCheck = Callable[[str, list[str], list[int]], None]


@dataclass(frozen=True)
class EpisodeSpec:
    """N-way K-shot episodes with Q queries per class."""

    ways: int
    shots: int
    queries: int

    def check(self, names: list[str], sizes: list[int], split: str) -> None:
        """Raise a UserError naming the options to change when the episodes cannot be drawn from the classes
        `names` of `split`, of sizes[c] images each (a message names the smallest class when sizes differ)."""
        prefix = "" if split == "train" else "eval_"  # the options that set this split's episodes
        default = "" if split == "train" else " (unset, they take the training values)"
        if self.ways < 2 or self.shots < 1 or self.queries < 1:
            raise UserError(f"{split} episodes need ways >= 2, shots >= 1 and queries >= 1, got ways={self.ways}, "
                            f"shots={self.shots}, queries={self.queries}. Set data.{prefix}ways, data.{prefix}shots and "
                            f"data.{prefix}queries to such values")
        if self.ways > len(names):
            raise UserError(f"{self.ways}-way episodes need {self.ways} classes but the {split} split has "
                             f"{len(names)}. Lower data.{prefix}ways{default}")
        fewest = min(sizes)
        if self.shots + self.queries > fewest:
            uneven = len(set(sizes)) > 1
            which = (f"images of {names[sizes.index(fewest)]}, the smallest class of" if uneven else
                     "samples per class of")
            raise UserError(f"shots + queries = {self.shots + self.queries} exceeds the {fewest} {which} the {split} "
                            f"split. Lower data.{prefix}shots or data.{prefix}queries{default}"
                            f"{', or add images to that class' if uneven else ''}")


    def sample(self, n: int, num_classes: int, samples_per_class: int, generator: torch.Generator,
               rotations: bool = False, counts: Tensor | None = None) -> EpisodeIndex:
        """The indices of `n` episodes (``sample_episodes``)."""
        return sample_episodes(n, self, num_classes, samples_per_class, generator, rotations, counts)

    def batch(self, images: Tensor, idx: EpisodeIndex) -> dict[str, Tensor]:
        """The batch of episodes `idx` (``materialize``)."""
        return materialize(images, idx, self.shots)


@dataclass(frozen=True)
class StreamSpec:
    """Streams of N classes with S instances each (the online protocol: module doc)."""

    ways: int
    instances: int

    def check(self, names: list[str], sizes: list[int], split: str) -> None:
        """Raise a UserError naming the option to change when the streams cannot be drawn from the classes `names`
        of `split`, of sizes[c] images each."""
        prefix, default = ("", "") if split == "train" else ("eval_", " (unset, it takes data.ways)")
        if self.ways < 2 or self.instances < 1:
            raise UserError(f"{split} streams need ways >= 2 and instances >= 1, got ways={self.ways}, "
                            f"instances={self.instances}. Set data.{prefix}ways and data.instances to such values")
        if self.ways > len(names):
            raise UserError(f"{self.ways}-way streams need {self.ways} classes but the {split} split has "
                            f"{len(names)}. Lower data.{prefix}ways{default}")
        if self.instances > min(sizes):
            raise UserError(f"data.instances = {self.instances} exceeds the {min(sizes)} images of the smallest class "
                            f"of the {split} split. Lower data.instances")

    def sample(self, n: int, num_classes: int, samples_per_class: int, generator: torch.Generator,
               rotations: bool = False, counts: Tensor | None = None) -> EpisodeIndex:
        """The indices of `n` streams: episodes of S supports per class and no queries, the supports' shuffle
        being the stream's order."""
        spec = EpisodeSpec(self.ways, self.instances, 0)
        return sample_episodes(n, spec, num_classes, samples_per_class, generator, rotations, counts)

    def batch(self, images: Tensor, idx: EpisodeIndex) -> dict[str, Tensor]:
        """The batch of streams `idx` (module doc)."""
        episodes = materialize(images, idx, self.instances)
        return {"stream": episodes["support"], "stream_labels": episodes["support_labels"], "ways": self.ways}


IMAGE_KEYS = ("support", "query", "stream")  # the keys of a batch that hold images


def targets(batch: dict) -> Tensor:
    """What a batch's logits are scored against: query_labels [B, N*Q] of episodes, stream_labels [B, N*S] of
    streams."""
    return batch["stream_labels"] if "stream" in batch else batch["query_labels"]


def first_episodes(batch: dict, n: int) -> dict:
    """The first `n` episodes (or streams) of a batch: every tensor cut along its batch dimension."""
    return {k: v[:n] if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass(frozen=True)
class EpisodeIndex:
    """Index form of B episodes: classes [B, N] (ids >= C mean rotated copies), samples [B, N, K+Q],
    support_order [B, N*K] and query_order [B, N*Q] (shuffles of the class-major token order)."""

    classes: Tensor
    samples: Tensor
    support_order: Tensor
    query_order: Tensor

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, i) -> "EpisodeIndex":
        return EpisodeIndex(self.classes[i], self.samples[i], self.support_order[i], self.query_order[i])


def sample_episodes(n: int, spec: EpisodeSpec, num_classes: int, samples_per_class: int,
                    generator: torch.Generator, rotations: bool = False, counts: Tensor | None = None) -> EpisodeIndex:
    """Draw `n` episodes' indices; `rotations` multiplies the classes by 4 (rotated copies); with `counts`
    (``ClassImages.counts``), class c's samples are drawn from its first counts[c] only."""
    N, K, Q = spec.ways, spec.shots, spec.queries
    pool = num_classes * (ROTATIONS if rotations else 1)
    classes = torch.rand(n, pool, generator=generator).argsort(-1)[:, :N]
    keys = torch.rand(n, N, samples_per_class, generator=generator)
    if counts is not None:  # padding sorts after every real sample (keys < 1)
        keys.masked_fill_(torch.arange(samples_per_class) >= counts[classes % num_classes].unsqueeze(-1), 2)
    samples = keys.argsort(-1)[..., :K + Q]
    support_order = torch.rand(n, N * K, generator=generator).argsort(-1)
    query_order = torch.rand(n, N * Q, generator=generator).argsort(-1)
    return EpisodeIndex(classes, samples, support_order, query_order)


def materialize(images: Tensor, idx: EpisodeIndex, shots: int) -> dict[str, Tensor]:
    """Gather the episodes of `idx` from images uint8 [C, S, ch, H, W]; returns the batch dict (module doc)."""
    C = images.shape[0]
    B, N, KQ = idx.samples.shape
    base, rot = idx.classes % C, idx.classes // C
    x = images[base.unsqueeze(-1), idx.samples]  # [B, N, K+Q, ch, H, W]
    for r in range(1, ROTATIONS):
        hit = rot == r
        if hit.any():
            x[hit] = torch.rot90(x[hit], r, dims=(-2, -1))
    labels = torch.arange(N).view(1, N, 1).expand(B, N, KQ)

    def tokens(part: slice, order: Tensor) -> tuple[Tensor, Tensor]:
        xs, ys = x[:, :, part].flatten(1, 2), labels[:, :, part].flatten(1, 2)
        return xs[torch.arange(B).unsqueeze(-1), order], ys.gather(1, order)

    support, support_labels = tokens(slice(0, shots), idx.support_order)
    query, query_labels = tokens(slice(shots, KQ), idx.query_order)
    return {"support": support, "support_labels": support_labels, "query": query, "query_labels": query_labels,
            "ways": N}
