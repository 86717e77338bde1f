"""Shipped configs: each resolves (parts composed, as `python -m ttt_meta fit --config F` does) to the settings it
had before the configs were composed from parts (tests/expected_configs.json, recorded at commit 2c2b0d4, with
the TTT Omniglot settings chosen since on validation; options added since then are not compared), and composition
reports a broken part."""

import json
from pathlib import Path

import pytest
import yaml

from ttt_meta.cli import main
from ttt_meta.errors import MissingInput, UserError

ROOT = Path(__file__).parents[1]
EXPECTED = json.loads((ROOT / "tests" / "expected_configs.json").read_text())["configs"]


def resolved(config: Path) -> dict:
    cli = main(["--config", str(config)], run=False)
    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))


def test_every_experiment_is_recorded():
    """Every experiment file of before is still there, and every experiment of today was there before."""
    experiments = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/*.yaml")) + sorted(
        str(p.relative_to(ROOT)) for folder in ("omniglot", "miniimagenet", "cifarfs")
        for p in (ROOT / "configs" / folder).glob("*.yaml"))
    assert sorted(experiments) == sorted(EXPECTED)


def differences(got, expected, where: str = "") -> list[str]:
    """The recorded settings that `got` does not have (options added since the recording are not compared)."""
    if isinstance(expected, dict) and isinstance(got, dict):
        return [d for k, v in expected.items() for d in differences(got.get(k), v, f"{where}.{k}")]
    return [] if got == expected else [f"{where}: {got!r}, recorded {expected!r}"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_resolves_to_its_recorded_settings(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run versions counted in an empty folder, as when they were recorded
    assert differences(resolved(ROOT / name), EXPECTED[name]) == []


def test_parts_merge_in_order_and_own_keys_win(tmp_path, monkeypatch):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "a.yaml").write_text("data:\n  ways: 3\n  shots: 2\n")
    (tmp_path / "parts" / "b.yaml").write_text("compose: [a.yaml]\ndata:\n  shots: 4\n")
    (tmp_path / "run.yaml").write_text(f"compose: [{ROOT / 'configs' / 'quickstart.yaml'}, parts/b.yaml]\n"
                                       "data:\n  queries: 2\n")
    monkeypatch.chdir(tmp_path)
    cli = main(["--config", str(tmp_path / "run.yaml")], run=False)
    assert (cli.config.data.ways, cli.config.data.shots, cli.config.data.queries) == (3, 4, 2)
    assert cli.config.data.dataset == "synthetic" and cli.config.run_name == "quickstart"  # the quickstart's own


def test_broken_composition_is_named(tmp_path):
    (tmp_path / "missing.yaml").write_text("compose: [nowhere.yaml]\n")
    with pytest.raises(MissingInput, match="missing.yaml composes nowhere.yaml, which is not a file"):
        main(["--config", str(tmp_path / "missing.yaml")], run=False)
    (tmp_path / "loop.yaml").write_text("compose: [loop.yaml]\n")
    with pytest.raises(UserError, match="composes loop.yaml, which composes .* again"):
        main(["--config", str(tmp_path / "loop.yaml")], run=False)
    (tmp_path / "bad.yaml").write_text("compose: nowhere.yaml\n")
    with pytest.raises(UserError, match="compose must be a list"):
        main(["--config", str(tmp_path / "bad.yaml")], run=False)
