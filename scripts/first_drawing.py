"""A character's 1st drawing in a stream: what caps it, for stream learners, on validation streams.

    TTT_META_THREADS=1 python scripts/first_drawing.py \\
        --run configs/omniglot/ttt_linear_online_5way.yaml checkpoints/omniglot/ttt_linear_online_5way.ckpt \\
        --run configs/omniglot/lstm_online_5way.yaml checkpoints/compare_omniglot_online_5way_lstm/version_0/last.ckpt

At the 1st drawing of a class the right answer is a label no earlier step was given; labels are shuffled per
stream, so the unused labels are exchangeable and no learner beats guessing one of them uniformly. With u labels
unused when the class first shows (u = N, N-1, ..., 1 over a stream), the ceiling is

    ceiling = mean over 1st drawings of 1/u            (5 classes: (1/5 + 1/4 + 1/3 + 1/2 + 1) / 5 = 45.7%)

and a learner's 1st-drawing accuracy is about P(it answers with an unused label) * ceiling: a learner that cannot
recognise images (answers "unused" always) reaches the ceiling, one that recognises them must also tell a new
character from the ones it has seen (novelty). Per checkpoint, on `--episodes` fixed validation streams
(``data.val_episodes``, ``data.val_seed``; never the test streams): the accuracy at the 1st and 2nd drawing and
overall, the share of 1st drawings answered with an unused label, and the same with a novelty bias: every unused
label's logit + delta, the trade between the 1st drawing and the later ones. Float32, CPU or GPU.

Writes <out>/<name>.json (default results/first_drawing_online_omniglot.json: rows, the Markdown table, provenance).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from ttt_meta.checkpointing import check_checkpoint
from ttt_meta.cli import set_threads
from ttt_meta.data.episodes import targets
from ttt_meta.measure import (accuracy_by_instance, confidence_interval, evaluate, hardware_text, instance_numbers,
                              markdown_table, provenance, write_results)
from ttt_meta.runs import build

ROOT = Path(__file__).resolve().parents[1]
DELTAS = (0.0, 1.0, 2.0, 3.0)


def first_drawing_terms(logits: torch.Tensor, labels: torch.Tensor, deltas=DELTAS) -> dict:
    """Step logits [B, T, N] and labels [B, T] of streams -> per-stream tensors [B]: "ceiling" (mean 1/u over
    the 1st drawings), "unused" (share of 1st drawings answered with a label no earlier step had), and per delta
    {"first", "second", "overall"}: accuracies with every unused label's logit + delta."""
    N = logits.shape[-1]
    onehot = F.one_hot(labels, N)
    unused = (onehot.cumsum(1) - onehot) == 0  # [B, T, N]: label n given at no step before t
    first = instance_numbers(labels) == 1  # [B, T]: step t is its class's 1st drawing
    per_first = lambda x: (x * first).sum(1) / first.sum(1)  # noqa: E731  [B, T] -> [B], mean over 1st drawings
    answered_unused = unused.gather(2, logits.argmax(-1, keepdim=True)).squeeze(-1)
    terms = {"ceiling": per_first(1 / unused.sum(-1).clamp(min=1)),  # u >= 1 at a 1st drawing
             "unused": per_first(answered_unused.float())}
    for delta in deltas:
        biased = logits + delta * unused
        by_instance = accuracy_by_instance(biased, labels)  # [B, S]
        terms[delta] = {"first": by_instance[:, 0], "second": by_instance[:, 1],
                        "overall": (biased.argmax(-1) == labels).float().mean(1)}
    return terms


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs=2, action="append", required=True, metavar=("CONFIG", "CKPT"),
                        help="a stream config and a checkpoint of it (repeat for more)")
    parser.add_argument("--episodes", type=int, default=1000, help="fixed validation streams (data.val_episodes)")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides key=value (data.root=...)")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="folder of the results file")
    parser.add_argument("--name", default="first_drawing_online_omniglot", help="results file name, no suffix")
    args = parser.parse_args(argv)
    set_threads()
    prov = provenance(__file__, argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for config, ckpt in args.run:
        cli = build(config, [*args.override, f"data.val_episodes={args.episodes}"])
        model, dm = cli.model, cli.datamodule
        model.load_state_dict(check_checkpoint(Path(ckpt), model)["state_dict"])
        model.eval().to(device)
        dm.setup("validate")
        parts = []
        for batch in dm.val_dataloader():
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            parts.append(first_drawing_terms(evaluate(model, batch).float(), targets(batch)))
        cat = lambda key, sub=None: torch.cat([p[key] if sub is None else p[key][sub] for p in parts]).cpu()  # noqa: E731
        ci = lambda t: dict(zip(("acc", "ci95"), confidence_interval(t)))  # noqa: E731
        rows.append({"config": config, "ckpt": ckpt, "streams": len(cat("ceiling")), "ways": dm.eval_spec.ways,
                     "ceiling": cat("ceiling").mean().item(), "unused": ci(cat("unused")),
                     "by_delta": [{"delta": d, **{k: ci(cat(d, k)) for k in ("first", "second", "overall")}}
                                  for d in DELTAS]})
        print(Path(config).stem, {k: rows[-1][k] for k in ("ceiling", "unused")}, flush=True)
    pct = lambda r: f"{100 * r['acc']:.1f} +- {100 * r['ci95']:.1f}"  # noqa: E731
    caption = (f"A character's 1st drawing: {args.episodes} fixed validation streams of Omniglot per checkpoint, "
               f"float32 ({hardware_text(prov)}). Ceiling: guessing uniformly among the labels not yet given; unused: "
               f"the share of 1st drawings the model answers with such a label; delta: added to those labels' logits. "
               f"Commit {str(prov['commit'])[:10]}{' (dirty)' if prov['dirty'] else ''}, {prov['date'][:10]}: "
               f"`{prov['command']}`")
    lines = [[f"`{Path(r['config']).stem}`", f"{100 * r['ceiling']:.1f}", pct(r["unused"]), f"{d['delta']:g}",
              pct(d["first"]), pct(d["second"]), pct(d["overall"])] for r in rows for d in r["by_delta"]]
    markdown = caption + "\n\n" + markdown_table(
        ["config", "1st-drawing ceiling %", "1st drawings answered unused %", "delta", "1st drawing %",
         "2nd drawing %", "all steps %"], lines)
    write_results(args.out, args.name, {"episodes": args.episodes, "rows": rows}, markdown, prov)
    print(markdown)
    return rows


if __name__ == "__main__":
    main()
