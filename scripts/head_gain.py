"""What a TTT learner's sequence part adds over its own encoder used as a ProtoNet.

    TTT_META_THREADS=1 python scripts/head_gain.py        # every shipped TTT checkpoint (ttt_*)
    python scripts/head_gain.py --names ttt_readout_5w5s --episodes 100 --out /tmp/gain

A TTT learner serves its TTT head's logits (``SequenceMetaLearner``: the head after the TTT blocks;
``TTTReadoutLearner``: the readout); the same encoder's features also give ProtoNets' logits:

    served[q, c] = head(TTT(tokens))[q, c],   prototype[q, c] = -||e(x_q) - mean_{y_s = c} e(x_s)||^2

Each shipped checkpoint (checkpoints/omniglot/<name>.ckpt, built from the config its report names) is scored on
`--episodes` fixed test episodes (``data.test_episodes``: 600 are every table's test set, 100 a report's check set)
two ways from one forward: the served model and the prototype term (its encoder used as a ProtoNet). "served -
ProtoNet" is what test-time training adds over nearest-centroid classification of the same features. The same
forwards record each TTT layer's inner loss of the supports under its initial and under its end state (the mean
over the test batches): what each layer's test-time training did. A checkpoint trained on episodes of varied sizes is scored at each of the
four Omniglot settings, the others at their own. Float32, on the CPU or the GPU at hand.

Writes <out>/<name>.json (default head_gain_omniglot: rows, the Markdown table, provenance).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ttt_meta.checkpointing import check_checkpoint
from ttt_meta.cli import set_threads
from ttt_meta.errors import UserError
from ttt_meta.learners import SequenceMetaLearner, TTTReadoutLearner
from ttt_meta.measure import (confidence_interval, episode_accuracy, hardware_text, markdown_table, provenance,
                              write_results)
from ttt_meta.runs import build

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "omniglot"
SETTINGS = ((5, 1), (5, 5), (20, 1), (20, 5))
TERMS = ("served", "prototype")


def term_accuracies(model: SequenceMetaLearner | TTTReadoutLearner, dm, device: torch.device) -> dict[str, dict]:
    """{term: {"acc", "ci95"}} of the served model and the prototype term on `dm`'s fixed test episodes, and
    "inner_loop": {layer: {"before", "after"}}, each TTT layer's inner loss of the supports under its initial and
    its end state (``inner_loop_stats``), the mean over the test batches."""
    per_episode = {t: [] for t in TERMS}
    inner = []
    model.eval().to(device)
    model.record_inner_loop(True)
    for batch in dm.test_dataloader():
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.inference_mode():
            served, prototype = model.logit_terms(batch, prototype=True)  # [B, NQ, N] each
            inner.append({k: float(v) for k, v in model.inner_loop_stats().items()})
        for term, logits in zip(TERMS, (served, prototype)):
            per_episode[term].append(episode_accuracy(logits, batch["query_labels"]).cpu())
    model.record_inner_loop(False)
    result = {t: dict(zip(("acc", "ci95"), confidence_interval(torch.cat(accs)))) for t, accs in per_episode.items()}
    layers = sorted({k.split("/")[1] for k in inner[0]})
    result["inner_loop"] = {layer: {when: sum(s[f"ttt/{layer}/inner_loss_{when}"] for s in inner) / len(inner)
                                    for when in ("before", "after")} for layer in layers}
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="+", default=None,
                        help="shipped checkpoints (default: every checkpoints/omniglot/ttt_*.ckpt)")
    parser.add_argument("--episodes", type=int, default=600, help="N fixed test episodes (data.test_episodes)")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides key=value (data.root=...)")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="folder of the results file")
    parser.add_argument("--name", default="head_gain_omniglot", help="results file name, without suffix")
    args = parser.parse_args(argv)
    set_threads()
    prov = provenance(__file__, argv)  # the tree as it is when the scoring starts
    names = args.names or sorted(p.stem for p in SHIPPED.glob("ttt_*.ckpt"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in names:
        report_path = SHIPPED / f"{name}.json"
        if not report_path.is_file():
            raise UserError(f"no shipped checkpoint report {report_path}. Name one of "
                            f"{sorted(p.stem for p in SHIPPED.glob('*.json'))}")
        report = json.loads(report_path.read_text())
        config, overrides = ROOT / report["config"], [*report["overrides"], *args.override,
                                                      f"data.test_episodes={args.episodes}"]
        cli = build(config, overrides)
        if not isinstance(cli.model, SequenceMetaLearner | TTTReadoutLearner):
            raise UserError(f"{name} is not a TTT learner (it has no TTT head). Name a ttt_* checkpoint")
        weights = check_checkpoint(SHIPPED / f"{name}.ckpt", cli.model)["state_dict"]
        data, spec = cli.datamodule.hparams, cli.datamodule.eval_spec
        if data.ways_up_to is None and data.shots_up_to is None:  # scored at its own setting
            runs = {f"{spec.ways}w{spec.shots}s": cli}
        else:
            runs = {f"{n}w{k}s": build(config, [*overrides, f"data.eval_ways={n}", f"data.eval_shots={k}"])
                    for n, k in SETTINGS}
        for setting, run in runs.items():
            run.model.load_state_dict(weights)
            run.datamodule.setup("test")
            rows.append({"checkpoint": name, "setting": setting,
                         **term_accuracies(run.model, run.datamodule, device)})
            print(name, rows[-1]["setting"], {t: round(100 * rows[-1][t]["acc"], 2) for t in TERMS}, flush=True)
    caption = (f"What the TTT head adds over its own encoder used as a ProtoNet: each shipped TTT learner on "
               f"{args.episodes} fixed test episodes of Omniglot (15 queries per class), float32; served: the model "
               f"as it serves, ProtoNet: the prototype logits of its encoder's features ({hardware_text(prov)}). Commit {str(prov['commit'])[:10]}"
               f"{' (dirty)' if prov['dirty'] else ''}, {prov['date'][:10]}: `{prov['command']}`")
    lines = [[f"`{r['checkpoint']}`", r["setting"],
              *(f"{100 * r[t]['acc']:.2f} +- {100 * r[t]['ci95']:.2f}" for t in TERMS),
              f"{100 * (r['served']['acc'] - r['prototype']['acc']):+.2f}",
              "; ".join(f"{layer} {v['before']:.3g} -> {v['after']:.3g}" for layer, v in r["inner_loop"].items())]
             for r in rows]
    markdown = caption + "\n\n" + markdown_table(
        ["checkpoint", "scored at", "served acc %", "its encoder as a ProtoNet %",
         "served - ProtoNet", "inner loss of the supports, initial -> end state, per TTT layer"], lines)
    write_results(args.out, args.name, {"episodes": args.episodes, "rows": rows}, markdown, prov)
    print(markdown)
    return rows


if __name__ == "__main__":
    main()
