"""SequenceMetaLearner: a whole episode read as one sequence; adaptation happens inside the core's state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..measure import episode_accuracy
from ..nn.encoders import make_encoder
from ..nn.model import EpisodeSequenceModel
from ..nn.ttt import TTTLayer
from .base import EpisodicLearner
from .protonet import prototype_logits


class SequenceMetaLearner(EpisodicLearner):
    """Conv encoder -> label-carrying support tokens and read-only query tokens -> sequence core -> N-way head.

    Args:
        core: "ttt_linear", "ttt_mlp", "lstm" or "attention" (see ``ttt_meta.nn.cores``).
        width, depth, num_heads: token width, number of blocks, heads of the core.
        mini_batch_size, eta_base, share_qk: TTT inner mini-batch, inner learning-rate scale, theta_Q = theta_K
            (TTT cores only).
        normalize_qk: L2-normalise the TTT cores' queries and keys per head (``ttt_meta.nn.ttt.TTTLayer``), so a
            query reads the supports by cosine similarity.
        inner_epochs: passes of the TTT cores' inner model over the supports; the queries read the state after the
            last.
        lstm_hidden: the LSTM core's hidden size; None: sized to the TTT-Linear core's parameter count.
        form: how a TTT core computes (``ttt_meta.nn.ttt``): "dual", "compiled" (the dual form through
            torch.compile: faster for long sequences after a one-off compile of seconds) or "primal" (reference).
        encoder, encoder_channels, in_channels, image_size: the image encoder and the images it reads.
        max_ways: largest N the label embedding and the head serve.
        tied_head: score queries against the label embeddings (``ttt_meta.nn.model``); for training with
            data.label_space, so a model serves up to max_ways ways.
        label_codes: "learned" (trained label embedding rows) or "equiangular" (rows 0..max_ways-1 fixed to a
            simplex equiangular tight frame, as CAML's ELMES; needs max_ways <= width + 1; ``ttt_meta.nn.model``).
        proto_aux_weight: w > 0 adds w * CE(prototype logits of the encoder's features) (``prototype_logits``) to
            the training loss, from the same encoder pass; logged as train/proto_aux_loss. train/loss is the sum;
            validation and test report the sequence model's loss alone.
        prototype_residual: add ProtoNets' logits of the encoder's features to the sequence model's, a hybrid whose
            sequence part learns a correction to the prototype classifier:
            logits = head(blocks(tokens)) - ||e(query) - c_n||^2, c_n the mean support feature of class n.
        head_aux_weight: w > 0 (with prototype_residual) adds w * CE(the sequence model's logits alone) to the
            training loss, so that the TTT head learns to classify by itself rather than leave it to the prototype
            term; logged as train/head_aux_loss.
        lr, weight_decay, warmup_steps, lr_schedule: see EpisodicLearner.
    """

    def __init__(self, core: str = "ttt_linear", width: int = 128, depth: int = 2, num_heads: int = 4,
                 mini_batch_size: int = 16, eta_base: float = 1.0, share_qk: bool = True, form: str = "dual",
                 normalize_qk: bool = False, inner_epochs: int = 1, lstm_hidden: int | None = None,
                 encoder: str = "conv4", encoder_channels: int = 64, in_channels: int = 1, image_size: int = 28,
                 max_ways: int = 20, tied_head: bool = False, label_codes: str = "learned",
                 proto_aux_weight: float = 0.0, prototype_residual: bool = False, head_aux_weight: float = 0.0,
                 lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 200, lr_schedule: str = "cosine"):
        super().__init__(lr, weight_decay, warmup_steps, lr_schedule)
        for name, weight in (("proto_aux_weight", proto_aux_weight), ("head_aux_weight", head_aux_weight)):
            if weight < 0:
                raise UserError(f"{name} must be >= 0, got {weight}. Set model.init_args.{name} to 0 (off) or a "
                                f"positive weight")
        if head_aux_weight > 0 and not prototype_residual:
            raise UserError("head_aux_weight adds the loss of the sequence model's logits apart from the prototype "
                            "term's, so it needs prototype_residual: true (without it that loss is the training loss "
                            "itself). Set model.init_args.prototype_residual=true or head_aux_weight=0")
        self.model = EpisodeSequenceModel(
            make_encoder(encoder, in_channels, encoder_channels, image_size), core=core, width=width, depth=depth,
            num_heads=num_heads, max_ways=max_ways, tied_head=tied_head, label_codes=label_codes,
            mini_batch_size=mini_batch_size, eta_base=eta_base, share_qk=share_qk, form=form,
            normalize_qk=normalize_qk, inner_epochs=inner_epochs, lstm_hidden=lstm_hidden)

    reads_label_ids = True
    ways_fix = "Raise model.init_args.max_ways (a checkpoint cannot grow it)"

    def ways_served(self) -> tuple[int, int]:
        """Up to max_ways: the rows of the label embedding and the head."""
        return 2, self.hparams.max_ways

    def ttt_layers(self) -> list[tuple[str, TTTLayer]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, TTTLayer)]

    def forward(self, batch: dict) -> Tensor:
        return self.served_logits(*self.logit_terms(batch))

    def served_logits(self, head: Tensor, prototype: Tensor | None) -> Tensor:
        """The logits the learner serves from its two terms (``logit_terms``): the hybrid's sum, else the head's."""
        return head + prototype if self.hparams.prototype_residual else head

    def logit_terms(self, batch: dict, prototype: bool | None = None) -> tuple[Tensor, Tensor | None]:
        """(the sequence model's logits [B, NQ, N], the prototype logits of the encoder's features [B, NQ, N] or
        None), from one encoder pass; the prototype term where `prototype` says, by default where an option uses it.
        The hybrid's logits are their sum."""
        support_labels, ways = batch["support_labels"], batch["ways"]
        features = self.model.encode(self.images(batch["support"]), self.images(batch["query"]))  # [B, NK + NQ, F]
        head = self.model.query_logits(features, support_labels, ways, batch.get("label_ids"))
        if prototype is None:
            prototype = self.hparams.prototype_residual or self.training and self.hparams.proto_aux_weight > 0
        if not prototype:
            return head, None
        NK = support_labels.shape[1]
        return head, prototype_logits(features[:, :NK], support_labels, features[:, NK:], ways)

    def loss_and_accuracy(self, batch: dict) -> tuple[Tensor, Tensor]:
        """EpisodicLearner's; in training with an auxiliary weight the loss is CE(logits) + proto_aux_weight *
        CE(prototype logits) + head_aux_weight * CE(the sequence model's logits), all from one encoder pass, and the
        accuracy the learner's."""
        hp = self.hparams
        if not (self.training and (hp.proto_aux_weight > 0 or hp.head_aux_weight > 0)):
            return super().loss_and_accuracy(batch)
        y = batch["query_labels"].flatten()
        head, prototype = self.logit_terms(batch)
        logits = self.served_logits(head, prototype)
        loss = F.cross_entropy(logits.flatten(0, 1), y)
        for name, weight, term in (("proto_aux_loss", hp.proto_aux_weight, prototype),
                                   ("head_aux_loss", hp.head_aux_weight, head)):
            if weight > 0:
                aux = F.cross_entropy(term.flatten(0, 1), y)
                if self._trainer is not None:  # a Lightning run, not a bare call
                    self.log(f"train/{name}", aux, on_step=True, on_epoch=True, batch_size=len(logits))
                loss = loss + weight * aux
        return loss, episode_accuracy(logits, batch["query_labels"])

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

    @torch.no_grad()
    def inner_loop_stats(self) -> dict[str, Tensor]:
        """Per TTT layer: inner loss of the support tokens under W0 and under the final state (and their ratio),
        the inner learning rate of the writing tokens (mean, min, max), and ||W_end - W0|| (mean over episodes)."""
        stats = {}
        for name, layer in self.ttt_layers():
            r = layer.last_record
            if r is None:
                continue
            tag, writes = f"ttt/{name.removeprefix('model.')}", r["eta"] > 0
            before = layer.inner_loss(r["k"], r["v"], r["start"])[writes].mean()
            after = layer.inner_loss(r["k"], r["v"], r["end"])[writes].mean()
            eta = r["eta"][writes]
            change = sum((e - s).square().flatten(1).sum(1) for s, e in zip(r["start"], r["end"], strict=True))
            stats.update({f"{tag}/inner_loss_before": before, f"{tag}/inner_loss_after": after,
                          f"{tag}/inner_loss_ratio": after / before, f"{tag}/eta_mean": eta.mean(),
                          f"{tag}/eta_min": eta.min(), f"{tag}/eta_max": eta.max(),
                          f"{tag}/state_change": change.sqrt().mean()})
        return stats
