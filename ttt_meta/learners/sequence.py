"""SequenceMetaLearner: a whole episode read as one sequence; adaptation happens inside the core's state."""

from __future__ import annotations

import torch
from torch import Tensor

from ..nn.encoders import make_encoder
from ..nn.model import EpisodeSequenceModel
from ..nn.ttt import TTTLayer
from .base import EpisodicLearner
from .protonet import prototype_logits


class SequenceMetaLearner(EpisodicLearner):
    """Conv encoder -> label-carrying support tokens and read-only query tokens -> sequence core -> N-way head;
    on a stream, one causal pass in which token t carries image t and label t-1 (``ttt_meta.nn.model``).

    Args:
        core: "ttt_linear", "ttt_mlp", "lstm" or "attention" (see ``ttt_meta.nn.cores``).
        width, depth, num_heads: token width, number of blocks, heads of the core.
        mini_batch_size, eta_base, share_qk: TTT inner mini-batch, inner learning-rate scale, theta_Q = theta_K
            (TTT cores only).
        lstm_hidden: the LSTM core's hidden size; None: sized to the TTT-Linear core's parameter count.
        form: how a TTT core computes (``ttt_meta.nn.ttt``): "dual", "compiled" (the dual form through
            torch.compile: faster for long sequences after a one-off compile of seconds) or "primal" (reference).
        encoder, encoder_channels, in_channels, image_size: the image encoder and the images it reads.
        max_ways: largest N the label embedding and the head serve.
        tied_head: score queries against the label embeddings (``ttt_meta.nn.model``); for training with
            data.label_space, so a model serves up to max_ways ways.
        label_codes: "learned" (trained label embedding rows) or "equiangular" (rows 0..max_ways-1 fixed to a
            simplex equiangular tight frame, as CAML's ELMES; needs max_ways <= width + 1; ``ttt_meta.nn.model``).
        lr, weight_decay, warmup_steps, lr_schedule: see EpisodicLearner.
    """

    def __init__(self, core: str = "ttt_linear", width: int = 128, depth: int = 2, num_heads: int = 4,
                 mini_batch_size: int = 16, eta_base: float = 1.0, share_qk: bool = True, form: str = "dual",
                 lstm_hidden: int | None = None, encoder: str = "conv4", encoder_channels: int = 64,
                 in_channels: int = 1, image_size: int = 28, max_ways: int = 20, tied_head: bool = False,
                 label_codes: str = "learned", lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 200,
                 lr_schedule: str = "cosine"):
        super().__init__(lr, weight_decay, warmup_steps, lr_schedule)
        self.model = EpisodeSequenceModel(
            make_encoder(encoder, in_channels, encoder_channels, image_size), core=core, width=width, depth=depth,
            num_heads=num_heads, max_ways=max_ways, tied_head=tied_head, label_codes=label_codes,
            mini_batch_size=mini_batch_size, eta_base=eta_base, share_qk=share_qk, form=form, lstm_hidden=lstm_hidden)

    reads_label_ids = True
    learns_online = True
    ways_fix = "Raise model.init_args.max_ways (a checkpoint cannot grow it)"

    def ways_served(self) -> tuple[int, int]:
        """Up to max_ways: the rows of the label embedding and the head."""
        return 2, self.hparams.max_ways

    def ttt_layers(self) -> list[tuple[str, TTTLayer]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, TTTLayer)]

    def forward(self, batch: dict) -> Tensor:
        return self.logit_terms(batch)[0]

    def stream_logits(self, batch: dict) -> Tensor:
        """A stream as one causal sequence (``ttt_meta.nn.model``): logits [B, T, N]."""
        features = self.model.encode(self.images(batch["stream"]))  # [B, T, F]
        return self.model.stream_logits(features, batch["stream_labels"], batch["ways"], batch.get("label_ids"))

    def logit_terms(self, batch: dict, prototype: bool = False) -> tuple[Tensor, Tensor | None]:
        """(the sequence model's logits [B, NQ, N], with `prototype` ProtoNets' logits of the encoder's features
        [B, NQ, N] else None), from one encoder pass (scripts/head_gain.py compares the two)."""
        support_labels, ways = batch["support_labels"], batch["ways"]
        features = self.model.encode(self.images(batch["support"]), self.images(batch["query"]))  # [B, NK + NQ, F]
        logits = self.model.query_logits(features, support_labels, ways, batch.get("label_ids"))
        if not prototype:
            return logits, None
        NK = support_labels.shape[1]
        return logits, prototype_logits(features[:, :NK], support_labels, features[:, NK:], ways)

    def record_inner_loop(self, on: bool) -> None:
        for _, layer in self.ttt_layers():
            layer.record, layer.last_record = on, None

    @torch.no_grad()
    def inner_loss_curves(self, episode: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
        """Per TTT layer, the inner loss of each support token of `episode` (mean over heads) under the initial
        and under the final state: ([NK], [NK]). From the last recorded forward."""
        curves = {}
        for name, layer in self.ttt_layers():
            r = layer.last_record
            if r is not None:
                writes = r["eta"][episode, 0] > 0
                k, v = r["k"][episode], r["v"][episode]  # [H, T, D]; the end state is [B, H, ...]
                before = layer.inner_loss(k, v, r["start"]).mean(0)[writes]
                after = layer.inner_loss(k, v, tuple(t[episode] for t in r["end"])).mean(0)[writes]
                curves[name.removeprefix("model.")] = (before, after)
        return curves

    def inner_loop_stats(self) -> dict[str, Tensor]:
        """Per TTT layer (``TTTLayer.recorded_stats``), tagged ttt/<layer>/<quantity>."""
        return {f"ttt/{name.removeprefix('model.')}/{key}": value for name, layer in self.ttt_layers()
                for key, value in layer.recorded_stats().items()}
