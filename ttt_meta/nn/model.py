"""The sequence meta-learner as a plain module: an episode's images in (encode), query logits out (query_logits).

    features  = encoder(image)                                      [B, T, F], T = N*K + N*Q   (encode)
    token     = Linear(features) + code[id[label]]                  queries use the extra "no label" row
    x         = x + core(LN(x), NK)  ;  x = x + MLP(LN(x))           per block; the NK supports write, queries read
    logits    = Linear(LN(x_query))[:, :, id]                       [B, N*Q, N]   (query_logits)
              = Linear(LN(x_query)) @ code[id].T / sqrt(width)      (tied_head)

A stream (the online protocol, ``stream_logits``) is one causal sequence: token t carries image t, and image t-1
with its label (token 0 the "no label" row and no previous image), every token writes, each reads the tokens
before it and itself (``writers=None`` in ``ttt_meta.nn.cores``), and the head reads every position: logits
[B, T, N], step t's from images 0..t and labels 0..t-1.

    e         = Linear(features)                                    [B, T, width]
    token_t   = [e_t[:width/2], e_{t-1}[width/2:]] + code[id[label_{t-1}]]    (e_{-1} = 0: the token shift)

Half the channels carry the previous image, so one token holds a labelled pair (image t-1, label t-1) to write and
the image t to read: a TTT layer's key can be the previous image and its target the label, in one token (with
the label alone beside image t, a core must first carry image t-1 forward before it can bind it to its label).

code [max_ways + 1, width] (``label_rows``) holds a row per label id and, last, the "no label" row. id [B, N] maps
an episode's classes 0..N-1 to rows of the codes and the head: 0..N-1 by default, random ids from [0, max_ways) in
training with data.label_space. With random ids an untied head row is trained only in the episodes that draw it;
the tied head scores a query against the codes through one shared map, which every episode trains (so a model
serves many more ways than it saw in one episode).

label_codes "learned": every row is a trained nn.Embedding row, starting ~N(0, 1): a strong label signal at
initialisation (a weak one kept the model at chance in early experiments). "equiangular": rows 0..M-1 (M =
max_ways) are fixed, a simplex equiangular tight frame (CAML's ELMES, Fifty et al. 2024), scaled like the N(0, 1)
rows, and only the "no label" row is trained:

    code[:M] = sqrt(width * M / (M - 1)) * (I_M - 1 1^T / M) P U^T      [M, width], M <= width + 1
    code[i] . code[j] = width if i == j else -width / (M - 1)           (norm sqrt(width), cosine -1/(M - 1))

with P [M, M-1] an orthonormal basis of the vectors summing to 0 and U [width, M-1] orthonormal columns drawn with
a fixed seed: the same frame for every model of that shape (and a buffer, so a checkpoint keeps it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from .cores import make_core

LABEL_CODES = ("learned", "equiangular")


def simplex_frame(count: int, width: int, seed: int = 0) -> Tensor:
    """`count` rows [count, width] of norm sqrt(width) and pairwise cosine -1/(count - 1): the vertices of a regular
    simplex centred at 0, in a random orthonormal basis of R^width drawn with `seed` (needs 2 <= count <= width + 1)."""
    centred = torch.eye(count, dtype=torch.float64) - 1 / count  # rows: the vertices in R^count, Gram I - 1 1^T / count
    vertices = centred @ torch.linalg.qr(centred[:, :-1]).Q  # [count, count - 1], the same Gram
    gaussian = torch.randn(width, count - 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    codes = vertices @ torch.linalg.qr(gaussian).Q.T  # [count, width]
    return (codes * (width * count / (count - 1)) ** 0.5).float()


class Block(nn.Module):
    """Pre-norm residual block: sequence core, then MLP."""

    def __init__(self, core: nn.Module, width: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1, self.core = nn.LayerNorm(width), core
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor, writers: int | None) -> Tensor:
        x = x + self.core(self.norm1(x), writers)
        return x + self.mlp(self.norm2(x))


class EpisodeSequenceModel(nn.Module):
    """encoder -> tokens -> `depth` blocks of `core` -> N-way head at query positions."""

    def __init__(self, encoder: nn.Module, core: str = "ttt_linear", width: int = 128, depth: int = 2,
                 num_heads: int = 4, max_ways: int = 20, mlp_ratio: int = 4, tied_head: bool = False,
                 label_codes: str = "learned", **core_kwargs):
        super().__init__()
        if label_codes not in LABEL_CODES:
            raise UserError(f"unknown label_codes {label_codes!r}. Set model.init_args.label_codes to one of "
                            f"{list(LABEL_CODES)}")
        if label_codes == "equiangular" and not 2 <= max_ways <= width + 1:
            raise UserError(f"equiangular label codes need 2 <= max_ways <= width + 1, got max_ways {max_ways} and "
                            f"width {width}. Lower model.init_args.max_ways or raise model.init_args.width")
        self.encoder, self.max_ways, self.label_codes = encoder, max_ways, label_codes
        self.embed = nn.Linear(encoder.out_features, width)
        if label_codes == "learned":
            self.label_embed = nn.Embedding(max_ways + 1, width)  # row max_ways: "no label" (queries)
        else:
            self.register_buffer("fixed_label_codes", simplex_frame(max_ways, width))  # [max_ways, width]
            self.no_label_code = nn.Parameter(torch.randn(width))  # queries
        self.blocks = nn.ModuleList(Block(make_core(core, width, num_heads, **core_kwargs), width, mlp_ratio)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.tied_head = tied_head
        self.head = nn.Linear(width, width) if tied_head else nn.Linear(width, max_ways)

    def label_rows(self) -> Tensor:
        """The codes [max_ways + 1, width]: one row per label id, then the "no label" row."""
        if self.label_codes == "learned":
            return self.label_embed.weight
        return torch.cat([self.fixed_label_codes, self.no_label_code[None]])

    def encode(self, *images: Tensor) -> Tensor:
        """images [B, T_i, C, H, W] (float; an episode's supports and queries, or a stream) -> features
        [B, sum T_i, F], in that order: one encoder pass over all of them."""
        x = torch.cat(images, dim=1)
        return self.encoder(x.flatten(0, 1)).view(*x.shape[:2], -1)

    def query_logits(self, features: Tensor, support_labels: Tensor, ways: int,
                     label_ids: Tensor | None = None) -> Tensor:
        """features [B, NK + NQ, F] (``encode``), support_labels [B, NK], label_ids [B, ways] or None (0..ways-1)
        -> logits [B, NQ, ways]: tokens, blocks and head."""
        if ways > self.max_ways:
            raise ValueError(f"{ways}-way episodes but the model was built for at most {self.max_ways} ways")
        B, T, NK = features.shape[0], features.shape[1], support_labels.shape[1]
        if label_ids is not None:
            support_labels = label_ids.gather(1, support_labels)
        labels = torch.cat([support_labels, support_labels.new_full((B, T - NK), self.max_ways)], dim=1)
        codes = self.label_rows()
        x = self.embed(features) + F.embedding(labels, codes)
        for block in self.blocks:
            x = block(x, NK)
        return self.head_logits(x[:, NK:], codes, ways, label_ids)

    def stream_logits(self, features: Tensor, labels: Tensor, ways: int, label_ids: Tensor | None = None) -> Tensor:
        """features [B, T, F] of a stream's images, labels [B, T] -> logits [B, T, ways]; step t's from images
        0..t and labels 0..t-1, token t with the token shift (module doc)."""
        if ways > self.max_ways:
            raise ValueError(f"{ways}-way streams but the model was built for at most {self.max_ways} ways")
        if label_ids is not None:
            labels = label_ids.gather(1, labels)
        codes = self.label_rows()
        x = self.stream_tokens(features, labels, codes)
        for block in self.blocks:
            x = block(x, None)
        return self.head_logits(x, codes, ways, label_ids)

    def stream_tokens(self, features: Tensor, labels: Tensor, codes: Tensor) -> Tensor:
        """features [B, T, F], labels [B, T] (rows of `codes`) -> tokens [B, T, width] with the token shift."""
        previous = torch.cat([labels.new_full((labels.shape[0], 1), self.max_ways), labels[:, :-1]], dim=1)
        e = self.embed(features)  # [B, T, width]
        half = e.shape[-1] // 2
        shifted = torch.cat([e[..., :half], F.pad(e[:, :-1, half:], (0, 0, 1, 0))], dim=-1)  # e_{-1} = 0
        return shifted + F.embedding(previous, codes)

    def head_logits(self, x: Tensor, codes: Tensor, ways: int, label_ids: Tensor | None) -> Tensor:
        """Tokens x [B, T, width] -> logits [B, T, ways] of the episode's classes (label_ids [B, ways] or None:
        0..ways-1)."""
        logits = self.head(self.norm(x))
        if self.tied_head:
            logits = logits @ codes[:self.max_ways].T * codes.shape[1]**-0.5
        if label_ids is None:
            return logits[..., :ways]
        return logits.gather(2, label_ids.unsqueeze(1).expand(*x.shape[:2], ways))
