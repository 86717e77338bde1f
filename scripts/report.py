"""Summarise runs from their files: learning curves and final accuracy, as Markdown and PNG.

    python scripts/report.py logs/ttt_linear_5w1s logs/maml_5w1s --out results/report

A run is a version folder ``logs/<run_name>/version_N`` (one fit and its resumes), or ``logs/<run_name>`` for its
newest fit; its test accuracy is the newest ``test_results.json`` that scored a checkpoint of that fit. Writes
``<out>/report.md``, ``<out>/curves.png`` (validation accuracy and training loss against step, runs overlaid)
and ``<out>/accuracy.png`` (test accuracy with its 95% interval, else the best validation accuracy).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ttt_meta.measure import markdown_table, pyplot, save_figure

CURVES = ("val/acc", "train/loss_step")


def _curves(version: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {tag: {} for tag in CURVES}
    for events in sorted(version.glob("events.out.tfevents.*")):  # a resumed run adds a file per resume
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in CURVES:
            if tag in acc.Tags()["scalars"]:
                curves[tag].update({e.step: e.value for e in acc.Scalars(tag)})
    return curves


def read_run(folder: Path) -> dict:
    """{"name", "curves": {tag: [(step, value)]}, "test": test_results.json or None} of one run.

    `folder` is a version folder ``logs/<run_name>/version_N`` (one fit, with resumes), or ``logs/<run_name>``,
    which means its newest version with training curves. The test result is the version's own
    ``test_results.json``, else the newest one of the run name that scored a checkpoint of that version.
    """
    from ttt_meta.cli import run_versions

    if not folder.is_dir():
        raise FileNotFoundError(f"run folder {folder} does not exist; runs log under logs/<run_name>/version_N")
    if folder.name.startswith("version_"):
        version, siblings = folder, [f for _, f in sorted(run_versions(folder.parent).items())]
        curves = _curves(version)
    else:
        siblings = [f for _, f in sorted(run_versions(folder).items())]
        fits = [(v, c) for v in siblings for c in [_curves(v)] if any(c.values())]
        version, curves = fits[-1] if fits else (None, {tag: {} for tag in CURVES})
    test = None
    for candidate in siblings:
        path = candidate / "test_results.json"
        if path.is_file():
            result = json.loads(path.read_text())
            scored = Path(str(result.get("ckpt_path") or "")).parent
            if candidate == version or (version is not None and scored.name == version.name
                                        and scored.parent.name == version.parent.name):
                test = result
    if not any(curves.values()) and test is None:
        raise FileNotFoundError(f"{folder} holds no TensorBoard events and no test_results.json: not a run folder")
    shown = version or folder
    return {"name": f"{shown.parent.name}/{shown.name}", "curves": {t: sorted(c.items()) for t, c in curves.items()},
            "test": test}


def summary(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        val = r["curves"]["val/acc"]
        steps = max((s for c in r["curves"].values() for s, _ in c), default=0)
        t = r["test"]
        rows.append([r["name"], steps, f"{100 * val[-1][1]:.2f}" if val else "-",
                     f"{100 * max(v for _, v in val):.2f}" if val else "-",
                     f"{100 * t['acc']:.2f} +- {100 * t['ci95']:.2f}" if t else "-", t["episodes"] if t else "-"])
    return markdown_table(["run", "steps", "last val acc %", "best val acc %", "test acc % (95% CI)", "test episodes"],
                          rows)


def plots(runs: list[dict], out: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5.5 * len(CURVES), 4))
    for ax, tag in zip(axes, CURVES):
        for r in runs:
            if r["curves"][tag]:
                steps, values = zip(*r["curves"][tag])
                ax.plot(steps, values, label=r["name"])
        ax.set_xlabel("step")
        ax.set_ylabel(tag)
        ax.legend(fontsize=7)
    save_figure(fig, out / "curves.png")

    names, accs, errs = [], [], []
    for r in runs:
        if r["test"]:
            names.append(r["name"] + " (test)")
            accs.append(100 * r["test"]["acc"])
            errs.append(100 * r["test"]["ci95"])
        elif r["curves"]["val/acc"]:
            names.append(r["name"] + " (best val)")
            accs.append(100 * max(v for _, v in r["curves"]["val/acc"]))
            errs.append(0.0)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    if names:
        ax.barh(names, accs, xerr=errs, color="tab:blue")
        ax.set_xlim(max(0.0, min(accs) - 10), 100)
    ax.set_xlabel("accuracy % (95% CI)")
    save_figure(fig, out / "accuracy.png")


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (logs/<run_name> or a version_* folder)")
    p.add_argument("--out", type=Path, default=Path("results/report"))
    args = p.parse_args(argv)
    runs = [read_run(folder) for folder in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    table = summary(runs)
    (args.out / "report.md").write_text(f"# Runs\n\n{table}\n\n![curves](curves.png)\n\n![accuracy](accuracy.png)\n")
    plots(runs, args.out)
    print(table)
    return table


if __name__ == "__main__":
    main()
