"""Every file in results/ (and every shipped checkpoint's report) carries its provenance and is shown in docs/, and
the generated parts of README.md and docs/ are exactly what scripts/docs.py writes from them."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
RESULTS = sorted([*(ROOT / "results").glob("*.json"), *(ROOT / "checkpoints" / "omniglot").glob("*.json")])
RESULTS.remove(ROOT / "results" / "standing.json")  # generated from the others by scripts/docs.py


def docs_script():
    spec = importlib.util.spec_from_file_location("docs", ROOT / "scripts" / "docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("document", docs_script().DOCUMENTS)
def test_documents_equal_what_the_results_generate(document):
    text = (ROOT / document).read_text()
    assert docs_script().generated(text, ROOT, document) == text, f"{document} is stale: run python scripts/docs.py"


def test_standing_is_what_the_results_generate():
    """results/standing.json, the README summary's source: each cell a row of the results file it names."""
    docs = docs_script()
    standing = json.loads((ROOT / docs.STANDING).read_text())
    assert standing == docs.standing(ROOT), "results/standing.json is stale: run python scripts/docs.py"
    for entry in standing["learners"]:
        for cell in entry["settings"].values():
            rows = json.loads((ROOT / cell["source"]).read_text())["rows"]
            row, = [r for r in rows if r["model"] == cell["row"]]
            assert (row["acc"], row["ci95"]) == (cell["acc"], cell["ci95"])


def test_every_result_and_figure_is_shown():
    shown = "".join((ROOT / d).read_text() for d in docs_script().DOCUMENTS)
    missing = [p.name for p in sorted((ROOT / "results").iterdir())
               if f"results/{p.name}" not in shown and f"`{p.name}`" not in shown]
    assert missing == [], "results shown in no document: cite them in docs/results.md or docs/experiments.md"


def test_readme_is_a_guide():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 450


def test_blocks_are_rewritten_and_the_check_fails_when_stale(tmp_path):
    docs = docs_script()
    (tmp_path / "results").mkdir()
    (tmp_path / "docs").mkdir()
    prov = {"command": "python scripts/x.py"}
    (tmp_path / "results" / "x.json").write_text(json.dumps({"provenance": prov, "markdown": "| a |\n| --- |\n| 1 |\n"}))
    (tmp_path / "results" / "x.png").write_bytes(b"png")
    for name in docs.DOCUMENTS:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("none\n")
    page = tmp_path / "docs" / "results.md"
    page.write_text("intro\n<!-- results/x.json -->\nold table\n<!-- end -->\nmore\n")
    assert docs.main(["--root", str(tmp_path), "--check"]) == 1
    assert docs.main(["--root", str(tmp_path)]) == 0
    assert page.read_text() == ("intro\n<!-- results/x.json -->\n| a |\n| --- |\n| 1 |\n\n(`results/x.json`)\n\n"
                                "![x](../results/x.png)\n<!-- end -->\nmore\n")
    assert docs.main(["--root", str(tmp_path), "--check"]) == 0
    (tmp_path / "results" / "x.json").write_text(json.dumps({"provenance": prov, "markdown": "| a |\n| --- |\n| 2 |\n"}))
    assert docs.main(["--root", str(tmp_path), "--check"]) == 1
    page.write_text("<!-- results/missing.json -->\n<!-- end -->\n")
    with pytest.raises(SystemExit, match="missing.json, which does not exist"):
        docs.main(["--root", str(tmp_path)])


def dirty_parts(value, where: str = "") -> list[str]:
    """Where `value` (a results file's JSON) records a tree that differed from its commit: any "dirty": true."""
    if isinstance(value, dict):
        return [where or "/"] * (value.get("dirty") is True) + [
            d for k, v in value.items() for d in dirty_parts(v, f"{where}/{k}")]
    if isinstance(value, list):
        return [d for i, v in enumerate(value) for d in dirty_parts(v, f"{where}/{i}")]
    return []


def test_dirty_parts_are_found_at_any_depth():
    clean = {"provenance": {"dirty": False}, "rows": [{"training": [{"dirty": False}]}]}
    assert dirty_parts(clean) == []
    assert dirty_parts({"provenance": {"dirty": True}, "rows": [{"training": [{}, {"dirty": True}]}]}) == [
        "/provenance", "/rows/0/training/1"]


@pytest.mark.parametrize("path", RESULTS, ids=[f"{p.parent.name}/{p.stem}" for p in RESULTS])
def test_every_result_says_what_produced_it(path):
    result = json.loads(path.read_text())
    prov = result["provenance"]
    assert re.fullmatch(r"[0-9a-f]{40}", prov["commit"]) and prov["dirty"] is False
    assert dirty_parts(result) == [], "measured on a tree that differed from its commit: re-run it from a clean commit"
    script = prov["command"].split()[1]
    assert prov["command"].startswith("python scripts/") and (ROOT / script).is_file(), prov["command"]
    assert re.match(r"\d{4}-\d\d-\d\dT", prov["date"]) and prov["torch"] and prov["python"]
    assert {"cpu", "cores", "cores_usable", "threads", "gpu"} <= set(prov["hardware"])
    assert result["markdown"].strip()
