"""Write the README's result tables from results/*.json and checkpoints/omniglot/*.json (the only way they change).

    python scripts/readme_tables.py            # rewrite every generated block of README.md
    python scripts/readme_tables.py --check    # exit 1, naming the blocks, if README.md differs from the results

A generated block is the text between a line ``<!-- results/NAME.json -->`` (or ``checkpoints/omniglot/NAME.json``,
a shipped checkpoint's report) and the next ``<!-- end -->`` line: it
is replaced by that file's "markdown" (the table its script rendered from the same data when it wrote it) and a
line naming the file. tests/test_results.py checks that the committed README equals what this writes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^<!-- ((?:results|checkpoints/omniglot)/[\w.-]+\.json) -->\n(.*?)^<!-- end -->$", re.M | re.S)


def generated(readme: str, root: Path = ROOT) -> str:
    """`readme` with every generated block rewritten from its results file (relative to `root`)."""

    def block(match: re.Match) -> str:
        name = match.group(1)
        path = root / name
        if not path.is_file():
            raise SystemExit(f"error: README.md cites {name}, which does not exist. Run the script that writes it, "
                             f"or remove the block.")
        return f"<!-- {name} -->\n{json.loads(path.read_text())['markdown'].rstrip()}\n\n(`{name}`)\n<!-- end -->"

    return BLOCK.sub(block, readme)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if README.md is out of date")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    new = generated(text, args.readme.parent)
    if args.check:
        stale = [m.group(1) for m, n in zip(BLOCK.finditer(text), BLOCK.finditer(new)) if m.group(0) != n.group(0)]
        if stale:
            print(f"README.md is out of date for {', '.join(stale)}: run python scripts/readme_tables.py")
            return 1
        return 0
    args.readme.write_text(new)
    print(f"{args.readme}: {len(BLOCK.findall(new))} generated blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
