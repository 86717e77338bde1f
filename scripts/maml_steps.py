"""MAML's test accuracy against the number of adaptation steps, for both BatchNorm modes, with the inner loop's
diagnostics.

    TTT_META_THREADS=1 python scripts/maml_steps.py --config configs/omniglot/maml_5w5s.yaml \
        --ckpt checkpoints/maml_5w5s/version_0/last.ckpt --override data.root=/path/to/data --sharpness-episodes 20
    python scripts/maml_steps.py --config configs/omniglot/maml_5w5s.yaml --ckpt last.ckpt --steps 0 1 5 10 \
        --episodes 200 --later-lr 0.1 --out /tmp/checks      # the checks: --later-lr, --rescale-convs
    python scripts/maml_steps.py --config configs/omniglot/maml_5w5s.yaml --ckpt last.ckpt --episodes 20 \
        --override data.dataset=synthetic --out /tmp/out

The MAML checkpoint `--ckpt` of the experiment `--config` (plus ``--override key=value``) adapts to each of the
first `--episodes` of the data module's fixed test episodes (``data.test_seed``) step by step, exactly as its
evaluation forward does (first-order steps of ``inner_lr`` on the support loss, BatchNorm on the supports' batch
statistics); after each step count in `--steps` its queries are scored twice: transductive (the queries
normalised as one batch, MAML's protocol) and with the support set's statistics (``transductive: false``). The
accuracies come with their 95% interval over episodes. Diagnostics of every step count: the mean support loss and
accuracy, the query loss, the fraction of episodes at or below 40% (collapsed) and, per layer (conv1-4, bn1-4,
head), the norm of the adapted weights, of the whole update (from the meta-weights) and of the last step, the last
step relative to the weights it changed, and the cosine between the last step and the one before it (-1: it
undoes it, an oscillation).

``--rescale-convs`` is a check of BatchNorm's scale invariance: after every inner step each convolution's weight
and bias are scaled back to their norm before the step. BatchNorm on batch statistics makes that rescaling leave
the network's function unchanged (up to BatchNorm's eps), but it undoes the growth of the weight norms that
otherwise shrinks the next steps' effective size (a step of lr * g moves w / |w| by about lr |g| / |w|).
``--later-lr LR`` is a check of the steps after the first, which meta-training never took: they use the inner
learning rate LR instead of ``inner_lr``, in the layers of ``--later-lr-layers`` only (default: every layer).
``--sharpness-episodes N`` measures, on the first N episodes, the largest-magnitude eigenvalue of the support
loss's Hessian (all weights; the head's alone) after every step count: a gradient step of lr overshoots along
that direction when lr x eigenvalue > 2.

Writes <out>/maml_steps.json (rows, diagnostics, the Markdown table, provenance) and <out>/maml_steps.png
(accuracy against steps for both modes; support and query losses; per-layer step sizes; the sharpness, when
measured); ``--name`` changes the file names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ttt_meta.checkpointing import check_checkpoint
from ttt_meta.cli import set_threads
from ttt_meta.errors import UserError
from ttt_meta.learners import MAMLLearner
from ttt_meta.measure import (confidence_interval, hardware_text, markdown_table, provenance, pyplot, save_figure,
                              write_results)
from ttt_meta.quiet import learn2learn
from ttt_meta.runs import build

MODES = {"transductive": True, "support_stats": False}
COLLAPSED = 0.4  # an episode at or below this accuracy counts as collapsed


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="a MAML experiment config")
    parser.add_argument("--ckpt", required=True, type=Path, help="a checkpoint of that config (a fit wrote it)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(range(11)), help="adaptation step counts")
    parser.add_argument("--episodes", type=int, default=600, help="the first N fixed test episodes")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides key=value")
    parser.add_argument("--rescale-convs", action="store_true",
                        help="after each inner step, scale each convolution back to its norm before the step")
    parser.add_argument("--later-lr", type=float, default=None,
                        help="inner learning rate of the steps after the first (default: inner_lr)")
    parser.add_argument("--later-lr-layers", nargs="+", default=None,
                        help="the layers --later-lr applies to (conv1.. bn1.. head; default: all)")
    parser.add_argument("--sharpness-episodes", type=int, default=0,
                        help="measure the support loss's sharpness (largest Hessian eigenvalue, of all weights and of "
                             "the head's) at every step count on the first N episodes")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results",
                        help="folder of <name>.json and <name>.png")
    parser.add_argument("--name", default="maml_steps", help="file name of the results")
    args = parser.parse_args(argv)
    if min(args.steps) < 0 or args.episodes < 1:
        parser.error("--steps must be >= 0 and --episodes >= 1")
    args.steps = sorted(set(args.steps))
    return args


def layer_groups(net: nn.Module) -> dict[str, list[int]]:
    """{layer name: indices of its parameters in net.parameters()}: conv1.., bn1.., head (the last linear)."""
    index = {id(p): i for i, p in enumerate(net.parameters())}
    groups, counts = {}, {}
    for module in net.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        kind = ("conv" if isinstance(module, nn.Conv2d) else "bn" if isinstance(module, nn.modules.batchnorm._BatchNorm)
                else "linear" if isinstance(module, nn.Linear) else type(module).__name__.lower())
        counts[kind] = counts.get(kind, 0) + 1
        groups[f"{kind}{counts[kind]}"] = [index[id(p)] for p in own]
    last_linear = [k for k in groups if k.startswith("linear")][-1:]
    return {("head" if k in last_linear else k): v for k, v in groups.items()}


def group_norm(tensors: list[torch.Tensor], ids: list[int]) -> float:
    return torch.sqrt(sum(tensors[i].double().pow(2).sum() for i in ids)).item()


def sharpness(learner: nn.Module, support, labels, ids: list[int] | None = None, iterations: int = 20) -> float:
    """The largest-magnitude eigenvalue of the Hessian of the support loss at `learner`'s weights (those of `ids`
    only, else all), by power iteration on Hessian-vector products from a fixed start. Gradient descent with
    learning rate lr is stable along that direction only while lr * sharpness < 2."""
    params = list(learner.parameters())
    chosen = params if ids is None else [params[i] for i in ids]
    grads = torch.autograd.grad(F.cross_entropy(learner(support), labels), chosen, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen) for p in chosen]
    value = 0.0
    for _ in range(iterations):
        norm = torch.sqrt(sum(x.pow(2).sum() for x in v))
        v = [x / norm for x in v]
        hv = torch.autograd.grad(grads, chosen, grad_outputs=v, retain_graph=True)
        value = sum((a * b).sum() for a, b in zip(hv, v)).item()
        v = [h.detach() for h in hv]
    return value


def cosine(a: list[torch.Tensor], b: list[torch.Tensor], ids: list[int]) -> float:
    dot = sum((a[i].double() * b[i].double()).sum() for i in ids)
    return (dot / max(group_norm(a, ids) * group_norm(b, ids), 1e-30)).item()


def episode_trajectory(model: MAMLLearner, groups: dict, support, labels, query, query_labels, steps: list[int],
                       rescale_convs: bool = False, with_sharpness: bool = False, later_lr: float | None = None,
                       later_lr_layers: list[str] | None = None) -> dict[int, dict]:
    """{k: measurements after k adaptation steps} of one episode, for every k in `steps` (one trajectory)."""
    learner = model.maml.clone()
    theta0 = [p.detach().clone() for p in learner.parameters()]
    previous, last_step, out = theta0, None, {}
    slow = {i for name in (later_lr_layers or groups) for i in groups[name]}
    convs = [ids for name, ids in groups.items() if name.startswith("conv")]
    for k in range(max(steps) + 1):
        theta = [p.detach() for p in learner.parameters()]
        logits = learner(support)
        loss = F.cross_entropy(logits, labels)
        if k in steps:
            row = {"support_loss": loss.item(), "support_acc": (logits.argmax(-1) == labels).float().mean().item()}
            with torch.no_grad():
                for mode, transductive in MODES.items():
                    q = model.score_queries(learner, support, query, transductive)
                    row[mode] = {"acc": (q.argmax(-1) == query_labels).float().mean().item(),
                                 "loss": F.cross_entropy(q, query_labels).item()}
            for name, ids in groups.items():
                delta = [a - b for a, b in zip(theta, previous)]
                now, step = group_norm(theta, ids), group_norm(delta, ids)
                row[name] = {"norm": now, "update": group_norm([a - b for a, b in zip(theta, theta0)], ids),
                             "step": step, "relative_step": step / max(group_norm(previous, ids), 1e-12),
                             # -1: this step undoes the one before (oscillation across a valley)
                             "cos_previous_step": cosine(delta, last_step, ids) if last_step is not None else 0.0}
            if with_sharpness:
                row["sharpness"] = {"all": sharpness(learner, support, labels),
                                    "head": sharpness(learner, support, labels, groups["head"])}
            out[k] = row
        if k == max(steps):
            break
        before = [group_norm(theta, ids) for ids in convs]
        if k >= 1:
            last_step = [a - b for a, b in zip(theta, previous)]
        previous = theta
        if later_lr is None or k == 0:
            learner.adapt(loss, first_order=True)
        else:  # learner.adapt's first-order update, with the rate later_lr for the chosen layers
            lr = learner.lr
            grads = torch.autograd.grad(loss, list(learner.parameters()))
            grads = [g * (later_lr / lr) if i in slow else g for i, g in enumerate(grads)]
            learn2learn().algorithms.maml.maml_update(learner.module, lr, grads)
        if rescale_convs:  # function-preserving under batch-statistics BatchNorm: only the norm growth is undone
            params = list(learner.parameters())
            for ids, norm in zip(convs, before):
                scale = norm / group_norm([p.detach() for p in params], ids)
                for i in ids:
                    params[i].data.mul_(scale)
    return out


def measure(model: MAMLLearner, dm, steps: list[int], episodes: int, rescale_convs: bool = False,
            sharpness_episodes: int = 0, later_lr: float | None = None,
            later_lr_layers: list[str] | None = None) -> list[dict]:
    """Rows (one per step count) averaged over the first `episodes` fixed test episodes."""
    fixed = dm.test_dataloader().dataset
    if episodes > len(fixed):
        raise UserError(f"--episodes {episodes} is more than the {len(fixed)} fixed test episodes. Lower --episodes "
                        f"or pass --override data.test_episodes={episodes}")
    groups = layer_groups(model.maml.module)
    if later_lr is not None and (model.hparams.meta_sgd or set(later_lr_layers or groups) - set(groups)):
        raise UserError(f"--later-lr needs a MAML model (not Meta-SGD) and layers among {list(groups)}, got "
                        f"{later_lr_layers}. Fix --later-lr-layers or leave --later-lr out")
    per_episode = {k: [] for k in steps}
    batch_size = dm.hparams.eval_batch_size
    model.eval()
    with torch.inference_mode(False), torch.enable_grad():
        for start in range(0, episodes, batch_size):
            batch = fixed.__getitems__(list(range(start, min(episodes, start + batch_size))))
            for i, (s, y, q, qy) in enumerate(zip(model.images(batch["support"]), batch["support_labels"],
                                                  model.images(batch["query"]), batch["query_labels"], strict=True)):
                with_sharpness = start + i < sharpness_episodes
                for k, row in episode_trajectory(model, groups, s, y, q, qy, steps, rescale_convs, with_sharpness,
                                                 later_lr, later_lr_layers).items():
                    per_episode[k].append(row)
            print(f"{min(episodes, start + batch_size)}/{episodes} episodes", file=sys.stderr, flush=True)
    rows = []
    for k, eps in per_episode.items():
        row = {"steps": k, "episodes": len(eps)}
        for mode in MODES:
            acc = torch.tensor([e[mode]["acc"] for e in eps])
            mean, ci = confidence_interval(acc)
            row[mode] = {"acc": mean, "ci95": ci, "loss": sum(e[mode]["loss"] for e in eps) / len(eps),
                         "collapsed": (acc <= COLLAPSED + 1e-6).float().mean().item()}
        for key in ("support_loss", "support_acc"):
            row[key] = sum(e[key] for e in eps) / len(eps)
        row["support_loss_median"] = torch.tensor([e["support_loss"] for e in eps]).median().item()
        sharp = [e["sharpness"] for e in eps if "sharpness" in e]
        if sharp:  # lr * sharpness, the stability measure of a gradient step (2: the edge)
            lr = model.hparams.inner_lr
            row["sharpness"] = {"episodes": len(sharp),
                                **{f"lr_x_{key}": sorted(lr * e[key] for e in sharp)[len(sharp) // 2]
                                   for key in ("all", "head")},
                                "unstable": sum(lr * e["all"] > 2 for e in sharp) / len(sharp)}
        row["layers"] = {g: {key: sum(e[g][key] for e in eps) / len(eps) for key in eps[0][g]} for g in groups}
        rows.append(row)
    return rows


def table(rows: list[dict], caption: str) -> str:
    convs = [g for g in rows[0]["layers"] if g.startswith("conv")]
    header = ["steps", "acc % transductive (95% CI)", "acc % support stats (95% CI)", "collapsed T / S %",
              "support loss (mean / median)", "support acc %", "query loss T / S",
              "conv1-4 norm", "conv1-4 step / norm", "head norm", "head step", "head cos(step, previous)"]
    sharp = "sharpness" in rows[0]
    if sharp:
        header += ["lr x sharpness, all / head (median)", "lr x sharpness > 2 %"]
    lines = []
    for r in rows:
        t, s, layers = r["transductive"], r["support_stats"], r["layers"]
        lines.append([r["steps"], f"{100 * t['acc']:.2f} +- {100 * t['ci95']:.2f}",
                      f"{100 * s['acc']:.2f} +- {100 * s['ci95']:.2f}",
                      f"{100 * t['collapsed']:.1f} / {100 * s['collapsed']:.1f}",
                      f"{r['support_loss']:.3g} / {r['support_loss_median']:.3g}", f"{100 * r['support_acc']:.1f}",
                      f"{t['loss']:.3g} / {s['loss']:.3g}",
                      " ".join(f"{layers[g]['norm']:.3g}" for g in convs),
                      " ".join(f"{layers[g]['relative_step']:.3f}" for g in convs),
                      f"{layers['head']['norm']:.3g}", f"{layers['head']['step']:.3g}",
                      f"{layers['head']['cos_previous_step']:.2f}"])
        if sharp:
            h = r["sharpness"]
            lines[-1] += [f"{h['lr_x_all']:.3g} / {h['lr_x_head']:.3g}", f"{100 * h['unstable']:.0f}"]
    note = (f"; sharpness: the largest Hessian eigenvalue of the support loss, over the first "
            f"{rows[0]['sharpness']['episodes']} episodes (a gradient step is unstable where lr x sharpness > 2)"
            if sharp else "")
    return caption + note + "\n\n" + markdown_table(header, lines)


def figure(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    sharp = "sharpness" in rows[0]
    fig, axes = plt.subplots(1, 3 + sharp, figsize=(5 * (3 + sharp), 4.2))
    k = [r["steps"] for r in rows]
    for mode, label in [("transductive", "transductive BatchNorm (queries as a batch)"),
                        ("support_stats", "support-set statistics")]:
        axes[0].errorbar(k, [100 * r[mode]["acc"] for r in rows], yerr=[100 * r[mode]["ci95"] for r in rows],
                         marker="o", capsize=3, label=label)
    axes[0].set(xlabel="adaptation steps", ylabel="test accuracy % (95% CI)", title=title)
    axes[0].legend(fontsize=8)
    axes[1].plot(k, [r["support_loss"] for r in rows], "o-", label="support loss (mean)")
    axes[1].plot(k, [r["support_loss_median"] for r in rows], "o--", label="support loss (median)")
    axes[1].plot(k, [r["transductive"]["loss"] for r in rows], "s-", label="query loss, transductive")
    axes[1].plot(k, [r["support_stats"]["loss"] for r in rows], "s--", label="query loss, support stats")
    axes[1].set(xlabel="adaptation steps", ylabel="cross-entropy", yscale="log", title="losses after k steps")
    axes[1].legend(fontsize=8)
    for g in rows[0]["layers"]:
        if g.startswith("conv") or g == "head":
            axes[2].plot(k[1:], [r["layers"][g]["relative_step"] for r in rows[1:]], "o-", label=g)
    axes[2].set(xlabel="adaptation step k", ylabel="|step k| / |weights before it|", yscale="log",
                title="relative size of each inner step")
    axes[2].legend(fontsize=8)
    if sharp:
        for key, label in [("all", "all weights"), ("head", "head only")]:
            axes[3].plot(k, [r["sharpness"][f"lr_x_{key}"] for r in rows], "o-", label=label)
        axes[3].axhline(2, color="gray", linestyle=":", label="stability edge (2)")
        axes[3].set(xlabel="adaptation steps", ylabel="lr x top Hessian eigenvalue (median)",
                    title=f"support-loss sharpness ({rows[0]['sharpness']['episodes']} episodes)")
        axes[3].legend(fontsize=8)
    for ax in axes:
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    set_threads()
    cli = build(args.config, args.override)
    model, dm = cli.model, cli.datamodule
    if not isinstance(model, MAMLLearner):
        raise UserError(f"{args.config} configures a {type(model).__name__}, not a MAMLLearner. Pass a MAML config")
    ckpt = check_checkpoint(args.ckpt, model)
    model.load_state_dict(ckpt["state_dict"])
    dm.setup("test")
    rows = measure(model, dm, args.steps, args.episodes, args.rescale_convs, args.sharpness_episodes, args.later_lr,
                   args.later_lr_layers)
    prov = provenance(__file__, argv)
    hp = model.hparams
    later = "" if args.later_lr is None else (f", inner lr {args.later_lr} after the first step in "
                                              f"{' '.join(args.later_lr_layers or ['every layer'])}")
    caption = (f"MAML {Path(args.config).name} checkpoint {args.ckpt.name} (trained {ckpt.get('global_step')} steps, "
               f"inner lr {hp.inner_lr}, {hp.train_steps} inner step(s) in training), first {args.episodes} fixed "
               f"test episodes, first-order test-time steps"
               f"{', convolutions rescaled to their norm after each step' if args.rescale_convs else ''}"
               f"{later}; "
               f"T: transductive BatchNorm, S: support-set statistics; {hardware_text(prov)}")
    data = {"config": str(args.config), "ckpt": str(args.ckpt), "train_steps": ckpt.get("global_step"),
            "episodes": args.episodes, "rescale_convs": args.rescale_convs, "later_lr": args.later_lr,
            "later_lr_layers": args.later_lr_layers, "rows": rows}
    write_results(args.out, args.name, data, table(rows, caption), prov)
    figure(rows, Path(args.out) / f"{args.name}.png",
           f"{Path(args.config).stem}{' (convs rescaled)' if args.rescale_convs else ''}{later}")
    return rows


if __name__ == "__main__":
    main()
