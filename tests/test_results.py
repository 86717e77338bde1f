"""Every file in results/ (and every shipped checkpoint's report) carries its provenance, and the README's result tables are exactly what
scripts/readme_tables.py generates from them."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
RESULTS = sorted([*(ROOT / "results").glob("*.json"), *(ROOT / "checkpoints" / "omniglot").glob("*.json")])


def readme_tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "scripts" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_equal_what_the_results_generate():
    readme = (ROOT / "README.md").read_text()
    assert readme_tables().generated(readme) == readme, "README.md is stale: run python scripts/readme_tables.py"


def test_every_readme_block_cites_a_results_file_and_the_check_fails_when_stale(tmp_path):
    tables = readme_tables()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "x.json").write_text(json.dumps({"markdown": "| a |\n| --- |\n| 1 |\n"}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results/x.json -->\nold table\n<!-- end -->\nmore\n")
    assert tables.main(["--readme", str(readme), "--check"]) == 1
    assert tables.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == "intro\n<!-- results/x.json -->\n| a |\n| --- |\n| 1 |\n\n(`results/x.json`)\n<!-- end -->\nmore\n"
    assert tables.main(["--readme", str(readme), "--check"]) == 0
    (tmp_path / "results" / "x.json").write_text(json.dumps({"markdown": "| a |\n| --- |\n| 2 |\n"}))
    assert tables.main(["--readme", str(readme), "--check"]) == 1
    readme.write_text("<!-- results/missing.json -->\n<!-- end -->\n")
    with pytest.raises(SystemExit, match="missing.json, which does not exist"):
        tables.main(["--readme", str(readme)])


@pytest.mark.parametrize("path", RESULTS, ids=[f"{p.parent.name}/{p.stem}" for p in RESULTS])
def test_every_result_says_what_produced_it(path):
    result = json.loads(path.read_text())
    prov = result["provenance"]
    assert re.fullmatch(r"[0-9a-f]{40}", prov["commit"]) and isinstance(prov["dirty"], bool)
    script = prov["command"].split()[1]
    assert prov["command"].startswith("python scripts/") and (ROOT / script).is_file(), prov["command"]
    assert re.match(r"\d{4}-\d\d-\d\dT", prov["date"]) and prov["torch"] and prov["python"]
    assert {"cpu", "cores", "cores_usable", "threads", "gpu"} <= set(prov["hardware"])
    assert result["markdown"].strip()
