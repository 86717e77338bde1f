"""Write the generated parts of README.md and docs/*.md from results/*.json and the shipped checkpoints' reports
(the only way they change).

    python scripts/docs.py            # rewrite every generated block
    python scripts/docs.py --check    # change nothing; exit 1, naming the blocks, if a document differs

A block is the text between a marker line and the next ``<!-- end -->`` line:
- ``<!-- results/NAME.json -->``: that file's table, rendered as the script that wrote it renders it (``measure.comparison_table``
  for compare.py's files, else the "markdown" it stored), a line naming it, and its figure results/NAME.png if any;
- ``<!-- checkpoints -->``: one table of every shipped checkpoint's report (checkpoints/omniglot/*.json);
- ``<!-- summary -->``: the README's summary, rendered from results/standing.json, with the published Conv-4 numbers
  (PUBLISHED) beside it.

results/standing.json (written first) holds, for each learner a user would pick (SUMMARY) and each of the four
Omniglot settings, the equal-time test accuracy and its 95% interval, the results file and row it comes from (and
that file's commit), its provenance (this command and its sources' commits), and whether the learner reads the episode as a sequence. tests/test_results.py checks that
the committed documents and standing.json equal what this writes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ttt_meta.measure import comparison_table, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/results.md", "docs/experiments.md", "checkpoints/README.md")
BLOCK = re.compile(r"^<!-- (results/[\w.-]+\.json|summary|checkpoints) -->\n(.*?)^<!-- end -->$", re.M | re.S)
SHIPPED = "checkpoints/omniglot"
SETTINGS = ("5w1s", "5w5s", "20w1s", "20w5s")
# learner -> {setting: (results file, row)}: rows of the tables that give each model equal training time by per-step
# costs measured in one process, each learner in the training ways validation chose
_PAIRED = {"5w1s": ("paired_omniglot_5w1s_readout_ways", "_w20"), "5w5s": ("paired_omniglot_5w5s_readout_ways", "_w20"),
           "20w1s": ("paired_omniglot_20w1s_readout", ""), "20w5s": ("paired_omniglot_20w5s_readout", "")}
# the TTT RNN: the readout's steps at 20 ways (the issue-30 search at its full budget), the row validation led or tied
_CONTEXT = {"20w1s": ("search_omniglot_20w1s_full", "ttt_readout_c1_mb5"),
            "20w5s": ("search_omniglot_20w5s_full", "ttt_readout_c1_e2")}
# learner -> (reads the episode as a sequence, {setting: (results file, row)})
SUMMARY = {
    "TTT readout (`ttt_readout`)": (False, {s: (f, "ttt_readout" + w) for s, (f, w) in _PAIRED.items()}),
    "TTT RNN: one context layer, then the readout": (True, _CONTEXT),
    "ProtoNets (`protonet`)": (False, {s: (f, "protonet" + w) for s, (f, w) in _PAIRED.items()}),
    "MAML, 10 test steps (`maml`)": (False, {s: (f"standing_omniglot_{s}_maml", "maml_10") for s in SETTINGS}),
    "Meta-SGD (`metasgd`)": (False, {s: (f"standing_omniglot_{s}_maml", "metasgd") for s in SETTINGS}),
    "softmax attention (`attention`)": (True, {s: (f"standing_omniglot_{s}_sequence", "attention") for s in SETTINGS}),
    "LSTM (`lstm`)": (True, {s: (f"standing_omniglot_{s}_sequence", "lstm") for s in SETTINGS}),
}
STANDING = "results/standing.json"
PUBLISHED = {"MAML (Finn et al. 2017)": ("98.7", "99.9", "95.8", "98.9"),
             "ProtoNets (Snell et al. 2017)": ("98.8", "99.7", "96.0", "98.9"),
             "Meta-SGD (Li et al. 2017)": ("99.5", "99.9", "95.9", "99.0"),
             "SNAIL (Mishra et al. 2018)": ("99.07", "99.78", "97.64", "99.36"),
             "MAML++ (Antoniou et al. 2019)": ("99.47", "99.85", "97.65", "99.33")}


def load(name: str, root: Path) -> dict:
    path = root / name
    if not path.is_file():
        raise SystemExit(f"error: a document cites {name}, which does not exist. Run the script that writes it, or "
                         f"remove the block.")
    return json.loads(path.read_text())


def rendered(name: str, root: Path) -> str:
    """The table of results file `name`: compare.py's rendered from its rows with today's layout, else as stored."""
    result = load(name, root)
    if result["provenance"]["command"].startswith("python scripts/compare.py"):
        return comparison_table(result["rows"], result["meta"], result["provenance"])
    return result["markdown"]


def standing(root: Path) -> dict:
    """results/standing.json's content (module docstring), from the results files SUMMARY names."""
    files = {name: load(f"results/{name}.json", root) for _, cells in SUMMARY.values() for name, _ in cells.values()}
    learners = []
    for learner, (sequence, cells) in SUMMARY.items():
        scores = {}
        for setting, (name, model) in cells.items():
            found = [r for r in files[name]["rows"] if r["model"] == model]
            if len(found) != 1:
                raise SystemExit(f"error: results/{name}.json has {len(found)} rows of {model!r}; fix SUMMARY in "
                                 f"scripts/docs.py")
            scores[setting] = {"acc": found[0]["acc"], "ci95": found[0]["ci95"], "episodes": found[0]["episodes"],
                               "queries": files[name]["meta"]["queries"], "source": f"results/{name}.json",
                               "row": model, "commit": files[name]["provenance"]["commit"]}
        learners.append({"learner": learner, "reads_sequence": sequence, "settings": scores})
    commits = sorted({cell["commit"] for entry in learners for cell in entry["settings"].values()})
    return {"provenance": {"command": "python scripts/docs.py", "source_commits": commits},
            "protocol": "equal training time from per-step costs measured in one process; test accuracy on the same "
            "fixed test episodes per setting", "learners": learners}


def summary(root: Path) -> str:
    """The README's summary table from results/standing.json, with PUBLISHED, and a caption whose numbers (test
    episodes, queries) are those of its cells."""
    header = ["learner", *SETTINGS, "sources", "reads a sequence"]
    lines, scored = [], set()
    for entry in json.loads((root / STANDING).read_text())["learners"]:
        cells = entry["settings"]
        row = [entry["learner"]]
        for setting in SETTINGS:
            cell = cells.get(setting)
            row.append(f"{100 * cell['acc']:.2f} +- {100 * cell['ci95']:.2f}" if cell else "-")
            if cell:
                scored.add((cell["episodes"], cell["queries"]))
        sources = ", ".join(sorted({f"`{Path(c['source']).stem}`" for c in cells.values()}))
        lines.append([*row, sources, "yes" if entry["reads_sequence"] else "no"])
    lines += [[f"*published: {name}*", *(f"*{v}*" for v in values), "Conv-4, the paper's own protocol", ""]
              for name, values in PUBLISHED.items()]
    (episodes, queries), = scored  # every cell on the same number of episodes and queries
    return (markdown_table(header, lines) + f"\n\nTest accuracy % +- 95% interval on the same {episodes} fixed test "
            f"episodes per setting ({queries} queries per class), every learner trained for ProtoNets' training time at "
            f"that setting, its steps from per-step costs measured in one process; the TTT RNN for the readout's steps, "
            f"which cost it more time (`{STANDING}`). Full tables: [docs/results.md](docs/results.md).")


def shipped(root: Path) -> str:
    """One table of the shipped checkpoints: each report's own row (export_checkpoint.report_table)."""
    reports = sorted((root / SHIPPED).glob("*.json"))
    return ("| checkpoint | setting | test acc % (episodes) | check set acc % (episodes) | training |\n"
            "| --- | --- | --- | --- | --- |\n" + "".join(json.loads(p.read_text())["markdown"] for p in reports))


def generated(text: str, root: Path = ROOT, document: str = "README.md") -> str:
    """`text` (of `document`, relative to `root`) with every generated block rewritten from the files under `root`."""
    up = "../" * document.count("/")  # from the document's folder to the root

    def block(match: re.Match) -> str:
        name = match.group(1)
        if name == "summary":
            return f"<!-- summary -->\n{summary(root).rstrip()}\n<!-- end -->"
        if name == "checkpoints":
            return f"<!-- checkpoints -->\n{shipped(root).rstrip()}\n<!-- end -->"
        figure = Path(name).with_suffix(".png")
        shown = f"\n\n![{figure.stem}]({up}{figure})" if (root / figure).is_file() else ""
        return f"<!-- {name} -->\n{rendered(name, root).rstrip()}\n\n(`{name}`){shown}\n<!-- end -->"

    return BLOCK.sub(block, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a document is out of date")
    parser.add_argument("--root", type=Path, default=ROOT, help="the folder holding the documents and results/")
    args = parser.parse_args(argv)
    stale = []
    if "<!-- summary -->" in (args.root / "README.md").read_text():  # the summary's source first
        path = args.root / STANDING
        new = json.dumps(standing(args.root), indent=1) + "\n"
        if (path.read_text() if path.is_file() else None) != new:
            if args.check:
                stale.append(STANDING)
            else:
                path.write_text(new)
                print(f"{STANDING}: rewritten")
    for document in DOCUMENTS:
        path = args.root / document
        text = path.read_text()
        new = generated(text, args.root, document)
        if args.check:
            stale += [f"{document}: {m.group(1)}" for m, n in zip(BLOCK.finditer(text), BLOCK.finditer(new))
                      if m.group(0) != n.group(0)]
        elif new != text:
            path.write_text(new)
            print(f"{document}: rewritten ({len(BLOCK.findall(new))} generated blocks)")
    if stale:
        print(f"out of date: {'; '.join(stale)}. Run python scripts/docs.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
