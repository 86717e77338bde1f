"""MAMLLearner (Finn et al. 2017) on learn2learn: per-episode gradient adaptation of Conv4 + a linear head.

Each episode clones the meta-model, takes `train_steps` (training) or `test_steps` (validation, test) gradient steps on the support loss (second order
unless `first_order`), and scores the queries with the adapted clone; the meta-model itself is only changed by
the outer optimiser. BatchNorm uses each task's batch statistics (as in the MAML paper): in training and, by default
(``transductive: true``), in evaluation too, where an episode's queries are normalised as one batch (as in Finn et
al. and learn2learn); ``transductive: false`` normalises the queries with the support set's statistics instead, so
each query's logits depend on the supports and itself only. ``meta_sgd: true``
switches to Meta-SGD (learned per-parameter inner learning rates, initialised at `inner_lr`). Evaluation needs
autograd for the adaptation, so it runs with gradients on inside validation and test.

On a stream (the online protocol) step t adapts a fresh clone on the t labelled images before it and scores image
t alone (step 0 is scored by the meta-model): T adaptations per stream of T images, on up to T - 1 images each,
so a stream costs O(T^2) image passes per adaptation step where a sequence learner's costs O(T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..nn.encoders import make_encoder
from ..quiet import learn2learn
from .base import EpisodicLearner


class MAMLLearner(EpisodicLearner):
    """Args:
        ways: N of the linear head (the episodes' N must match).
        inner_lr: inner-loop learning rate (MAML paper: 0.4 on Omniglot, 0.01 on miniImageNet).
        train_steps, test_steps: adaptation steps in training and in validation/test (paper: 1 and 3 on
            Omniglot 5-way; 5 and 10 on miniImageNet). ``hparams.test_steps`` may be changed after training, to
            score one checkpoint at several step counts.
        first_order: drop the second-order terms of the meta-gradient.
        meta_sgd: learn per-parameter inner learning rates (Meta-SGD).
        transductive: in validation and test, normalise the queries of an episode with their own batch statistics
            (True, the MAML paper's protocol; each query's logits depend on the other queries), or (False) every
            BatchNorm layer normalises the queries with the mean and biased variance that the adapted model's
            forward on the support set has at that layer (each query's logits depend on the supports and itself
            only). Training is the same either way. ``hparams.transductive`` may be changed after training.
        encoder, encoder_channels, in_channels, image_size: the image encoder and the images it reads.
        lr, weight_decay, warmup_steps, lr_schedule: see EpisodicLearner.
    """

    def __init__(self, ways: int = 5, inner_lr: float = 0.4, train_steps: int = 1, test_steps: int = 3,
                 first_order: bool = False, meta_sgd: bool = False, encoder: str = "conv4",
                 encoder_channels: int = 64, in_channels: int = 1, image_size: int = 28, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 200,
                 lr_schedule: str = "cosine", transductive: bool = True):
        super().__init__(lr, weight_decay, warmup_steps, lr_schedule)
        if train_steps < 1 or test_steps < 0:
            raise UserError(f"MAML needs train_steps >= 1 and test_steps >= 0, got {train_steps} and {test_steps}. "
                            f"Set model.init_args.train_steps and test_steps accordingly")
        enc = make_encoder(encoder, in_channels, encoder_channels, image_size, batch_stats=True)
        net = nn.Sequential(enc, nn.Linear(enc.out_features, ways))
        l2l = learn2learn()  # imported here: a run of another learner never loads it
        algo = l2l.algorithms.MetaSGD if meta_sgd else l2l.algorithms.MAML
        self.maml = algo(net, lr=inner_lr, first_order=first_order)
        self.record, self.support_losses = False, []  # (before, after) adaptation, per episode, when recording

    ways_fix = "Set model.init_args.ways to the data's ways (data.ways, data.eval_ways)"
    learns_online = True

    def ways_served(self) -> tuple[int, int]:
        """Exactly the rows of the head."""
        return self.hparams.ways, self.hparams.ways

    def adapt(self, support: Tensor, labels: Tensor, steps: int) -> nn.Module:
        """A clone of the meta-model after `steps` gradient steps on one episode's support loss."""
        learner = self.maml.clone()
        before = None
        # second-order terms only serve the meta-gradient: evaluation adapts first order (same adapted weights)
        first_order = None if self.training else True
        for _ in range(steps):
            loss = F.cross_entropy(learner(support), labels)
            before = loss.detach() if before is None else before
            learner.adapt(loss, first_order=first_order)
        if self.record and before is not None:  # one more support forward, only when recording
            with torch.no_grad():
                self.support_losses.append((before, F.cross_entropy(learner(support), labels)))
        return learner

    def score_queries(self, learner: nn.Module, support: Tensor, query: Tensor,
                      transductive: bool | None = None) -> Tensor:
        """Logits of `query` under an adapted `learner`: the queries normalised as one batch (`transductive`, default
        ``hparams.transductive``; always in training), else with the support set's statistics at every BatchNorm
        layer: one forward of supports and queries together, in which each BatchNorm layer normalises all rows
        with the mean and biased variance of the support rows (per-sample layers elsewhere, so the support rows
        see exactly their own batch statistics). `learner` is left as it was."""
        if transductive is None:
            transductive = self.hparams.transductive
        if self.training or transductive:
            return learner(query)
        n = len(support)
        norms = [m for m in learner.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for bn in norms:  # an instance attribute: this clone's modules only (a clone shares its hook dicts)
            bn.forward = _support_statistics_norm(bn, n)
        try:
            return learner(torch.cat([support, query]))[n:]
        finally:
            for bn in norms:
                del bn.forward

    def record_inner_loop(self, on: bool) -> None:
        self.record, self.support_losses = on, []

    def inner_loop_stats(self) -> dict[str, Tensor]:
        """Support loss of the episodes before and after adaptation (mean), and their ratio."""
        if not self.support_losses:
            return {}
        before, after = (torch.stack(x).mean() for x in zip(*self.support_losses))
        return {"maml/support_loss_before": before, "maml/support_loss_after": after,
                "maml/support_loss_ratio": after / before}

    def check_ways(self, ways: int) -> None:
        if ways != self.hparams.ways:
            raise ValueError(f"{ways}-way episodes but this MAML head has {self.hparams.ways} ways; "
                             f"set model.init_args.ways to the data's ways")

    def stream_logits(self, batch: dict) -> Tensor:
        """Step t: a clone adapted on steps 0..t-1 scores image t (module doc). [B, T, N]."""
        self.check_ways(batch["ways"])
        steps = self.hparams.train_steps if self.training else self.hparams.test_steps
        with torch.inference_mode(False), torch.enable_grad():
            streams, labels = self.images(batch["stream"].clone()), batch["stream_labels"].clone()
            logits = []
            for x, y in zip(streams, labels, strict=True):
                for t in range(len(x)):
                    learner = self.adapt(x[:t], y[:t], steps) if t else self.maml.clone()
                    out = learner(x[t:t + 1])[0]
                    logits.append(out if self.training else out.detach())
        return torch.stack(logits).view(*labels.shape, -1)

    def forward(self, batch: dict) -> Tensor:
        self.check_ways(batch["ways"])
        steps = self.hparams.train_steps if self.training else self.hparams.test_steps
        with torch.inference_mode(False), torch.enable_grad():  # evaluation adapts with autograd too
            support, query = self.images(batch["support"].clone()), self.images(batch["query"].clone())
            labels = batch["support_labels"].clone()
            logits = []
            for s, y, q in zip(support, labels, query, strict=True):
                out = self.score_queries(self.adapt(s, y, steps), s, q)
                logits.append(out if self.training else out.detach())  # evaluation frees each episode's graph
        return torch.stack(logits)


def _support_statistics_norm(bn: nn.modules.batchnorm._BatchNorm, n: int):
    """A forward for `bn` that normalises every row of its input with the statistics of the first `n` rows."""
    def forward(x: Tensor) -> Tensor:
        var, mean = torch.var_mean(x[:n], dim=[0, *range(2, x.dim())], correction=0, keepdim=True)
        shape = mean.shape
        y = (x - mean) * torch.rsqrt(var + bn.eps)  # not F.batch_norm: its running stats take no gradient
        return y if bn.weight is None else y * bn.weight.view(shape) + bn.bias.view(shape)

    return forward
