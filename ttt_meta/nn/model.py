"""The sequence meta-learner as a plain module: an episode in, query logits out.

    features  = encoder(image)                                      [B, T, F], T = N*K + N*Q
    token     = Linear(features) + Embedding(id[label])             queries use the extra "no label" row
    x         = x + core(LN(x), write_mask)  ;  x = x + MLP(LN(x))   per block; supports write, queries read
    logits    = Linear(LN(x_query))[:, :, id]                       [B, N*Q, N]
              = Linear(LN(x_query)) @ Embedding.weight[id].T / sqrt(width)   (tied_head)

id [B, N] maps an episode's classes 0..N-1 to rows of the label embedding and the head: 0..N-1 by default,
random ids from [0, max_ways) in training with data.label_space. With random ids an untied head row is trained
only in the episodes that draw it; the tied head scores a query against the label embeddings through one shared
map, which every episode trains (so a model serves many more ways than it saw in one episode).

The label embedding rows start ~N(0, 1): a strong label signal at initialisation (a weak one kept the model at
chance in early experiments).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .cores import make_core


class Block(nn.Module):
    """Pre-norm residual block: sequence core, then MLP."""

    def __init__(self, core: nn.Module, width: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1, self.core = nn.LayerNorm(width), core
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor, write_mask: Tensor) -> Tensor:
        x = x + self.core(self.norm1(x), write_mask)
        return x + self.mlp(self.norm2(x))


class EpisodeSequenceModel(nn.Module):
    """encoder -> tokens -> `depth` blocks of `core` -> N-way head at query positions."""

    def __init__(self, encoder: nn.Module, core: str = "ttt_linear", width: int = 128, depth: int = 2,
                 num_heads: int = 4, max_ways: int = 20, mlp_ratio: int = 4, tied_head: bool = False,
                 **core_kwargs):
        super().__init__()
        self.encoder, self.max_ways = encoder, max_ways
        self.embed = nn.Linear(encoder.out_features, width)
        self.label_embed = nn.Embedding(max_ways + 1, width)  # row max_ways: "no label" (queries)
        self.blocks = nn.ModuleList(Block(make_core(core, width, num_heads, **core_kwargs), width, mlp_ratio)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.tied_head = tied_head
        self.head = nn.Linear(width, width) if tied_head else nn.Linear(width, max_ways)

    def forward(self, support: Tensor, support_labels: Tensor, query: Tensor, ways: int,
                label_ids: Tensor | None = None) -> Tensor:
        """support [B, NK, C, H, W], support_labels [B, NK], query [B, NQ, C, H, W] (float), label_ids [B, ways]
        or None (0..ways-1) -> logits [B, NQ, ways]."""
        if ways > self.max_ways:
            raise ValueError(f"{ways}-way episodes but the model was built for at most {self.max_ways} ways")
        B, NK, NQ = support.shape[0], support.shape[1], query.shape[1]
        images = torch.cat([support, query], dim=1).flatten(0, 1)
        feats = self.encoder(images).view(B, NK + NQ, -1)
        if label_ids is not None:
            support_labels = label_ids.gather(1, support_labels)
        labels = torch.cat([support_labels, support_labels.new_full((B, NQ), self.max_ways)], dim=1)
        x = self.embed(feats) + self.label_embed(labels)
        write_mask = (torch.arange(NK + NQ, device=x.device) < NK).expand(B, -1)
        for block in self.blocks:
            x = block(x, write_mask)
        logits = self.head(self.norm(x[:, NK:]))
        if self.tied_head:
            logits = logits @ self.label_embed.weight[:self.max_ways].T * self.label_embed.embedding_dim**-0.5
        if label_ids is None:
            return logits[..., :ways]
        return logits.gather(2, label_ids.unsqueeze(1).expand(B, NQ, ways))
