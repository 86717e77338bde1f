"""TensorBoard inspection: every promised tag is written and finite, report.py reads runs back, predict
classifies folders of images."""

import csv
import io
import math
import runpy
from pathlib import Path

import pytest
import torch
from conftest import QUICK, TINY, run_cli
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util

from ttt_meta.cli import main
from ttt_meta.data.synthetic import make_glyphs
from ttt_meta.learners import MAMLLearner

ROOT = Path(__file__).parents[1]
LAYER_TAGS = ["inner_loss_before", "inner_loss_after", "inner_loss_ratio", "eta_mean", "eta_min", "eta_max",
              "state_change"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 2-epoch quickstart fit (inner-loop scalars and histograms every 2 steps), then a test."""
    args = ["--config", QUICK, *TINY, "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1",
            "--inspect.every_n_steps=2", "--inspect.histogram_every_n_steps=2"]
    return run_cli(tmp_path_factory.mktemp("run"), ["fit", *args],
                   ["test", *args, "--ckpt_path", "checkpoints/quickstart/version_0/last.ckpt"])


def _events(folder: Path) -> dict[str, list]:
    values = {}
    for file in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(file)).Load():
            for v in event.summary.value:
                values.setdefault(v.tag, []).append((v.metadata.plugin_data.plugin_name, v))
    return values


def test_tags_written_and_finite(run):
    fit, test = _events(run / "logs" / "quickstart" / "version_0"), _events(run / "logs" / "quickstart" / "version_1")
    scalars = ["train/loss_step", "train/acc_step", "train/loss_epoch", "train/acc_epoch", "val/loss", "val/acc",
               "lr-AdamW", "hp/val_acc"] + [f"ttt/blocks.{i}.core/{t}" for i in range(2) for t in LAYER_TAGS]
    for tag in scalars:
        assert tag in fit, tag
        assert all(math.isfinite(float(tensor_util.make_ndarray(v.tensor))) for _, v in fit[tag]), tag
    assert len(fit["ttt/blocks.0.core/inner_loss_ratio"]) == 4  # steps 0, 2, 4, 6 of 8
    for i in range(2):
        for name in ("W0", "eta_gate.weight", "theta_kv.weight", "theta_o.weight"):
            assert fit[f"params/blocks.{i}.core.{name}"][0][0] == "histograms"
    for tag in ("val/episode", "ttt/inner_loss_along_supports"):
        plugin, value = fit[tag][-1]
        assert plugin == "images"
        width, height, png = tensor_util.make_ndarray(value.tensor)[:3]
        assert Image.open(io.BytesIO(png)).size == (int(width), int(height))
    assert "_hparams_/experiment" in fit and "config/text_summary" in fit
    assert "hp/test_acc" in test and "_hparams_/session_start_info" in test


def test_report_reads_runs(run, tmp_path):
    report = runpy.run_path(str(ROOT / "scripts" / "report.py"))  # a script, loaded as a namespace

    table = report["main"]([str(run / "logs" / "quickstart"), "--out", str(tmp_path)])
    row = table.splitlines()[2].split("|")
    assert row[1].strip() == "quickstart/version_0" and row[2].strip() == "7" and row[6].strip() == "11"
    for name in ("report.md", "curves.png", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        report["main"]([str(tmp_path), "--out", str(tmp_path / "x")])


def test_maml_support_loss_drops():
    torch.manual_seed(0)
    model = MAMLLearner(ways=3, encoder_channels=4, train_steps=2).train()
    glyphs = make_glyphs(3, 4, image_size=28).images  # [3, 4, 1, 28, 28]
    batch = {"support": glyphs[:, :2].reshape(1, 6, 1, 28, 28), "support_labels": torch.arange(3).repeat_interleave(2)[None],
             "query": glyphs[:, 2:].reshape(1, 6, 1, 28, 28), "ways": 3}
    model.record_inner_loop(True)
    model(batch)
    stats = model.inner_loop_stats()
    assert stats["maml/support_loss_after"] < stats["maml/support_loss_before"]
    model.record_inner_loop(False)
    assert model.inner_loop_stats() == {}


def _write_folders(root: Path, classes: int, per_class: int, invert: bool) -> None:
    glyphs = make_glyphs(classes, per_class, image_size=28, seed=7).images[:, :, 0]
    for c in range(classes):
        for split, ids in (("support", range(2)), ("query", range(2, per_class))):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in ids:
                img = glyphs[c, i].numpy()
                Image.fromarray(255 - img if invert else img).resize((56, 56)).save(folder / f"{i}.png")


def test_predict_folders(run, tmp_path, capsys):
    ckpt = str(run / "checkpoints" / "quickstart" / "version_0" / "last.ckpt")
    _write_folders(tmp_path, 3, 5, invert=True)  # dark strokes on white, as a scan would be
    out = tmp_path / "pred.csv"
    result = main(["predict", "--ckpt_path", ckpt, "--support", str(tmp_path / "support"),
                   "--query", str(tmp_path / "query"), "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 9 and result["queries"] == 9 and 0 <= result["acc"] <= 1
    assert all(abs(sum(float(r[f"p_class_{c}"]) for c in range(3)) - 1) < 1e-3 for r in rows)
    assert "accuracy" in capsys.readouterr().out


def test_predict_errors(run, tmp_path):
    ckpt = str(run / "checkpoints" / "quickstart" / "version_0" / "last.ckpt")
    _write_folders(tmp_path / "six", 6, 3, invert=False)
    with pytest.raises(ValueError, match="at most 5"):
        main(["predict", "--ckpt_path", ckpt, "--support", str(tmp_path / "six" / "support"),
              "--query", str(tmp_path / "six" / "query"), "--out", str(tmp_path / "a.csv")])
    _write_folders(tmp_path / "ok", 3, 3, invert=False)
    (tmp_path / "ok" / "support" / "class_empty").mkdir()
    with pytest.raises(ValueError, match="class_empty holds no images"):
        main(["predict", "--ckpt_path", ckpt, "--support", str(tmp_path / "ok" / "support"),
              "--query", str(tmp_path / "ok" / "query"), "--out", str(tmp_path / "b.csv")])
    (tmp_path / "ok" / "support" / "class_empty").rmdir()
    (tmp_path / "ok" / "query" / "class_0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        main(["predict", "--ckpt_path", ckpt, "--support", str(tmp_path / "ok" / "support"),
              "--query", str(tmp_path / "ok" / "query"), "--out", str(tmp_path / "c.csv")])


def test_inner_loop_stats_equal_quantities_recomputed_from_one_batch():
    """inner_loop_stats on one recorded forward: the supports' inner loss under W0 and under the end state (the end
    state recomputed here with the primal form), their ratio after / before, eta's mean, min and max over the
    writing tokens, and ||W_end - W0|| (mean over episodes), each recomputed from the layer's own input."""
    from ttt_meta.learners import SequenceMetaLearner
    from ttt_meta.measure import random_episodes
    from ttt_meta.nn.ttt import ttt_linear

    torch.manual_seed(0)
    model = SequenceMetaLearner(width=16, depth=1, num_heads=2, encoder_channels=4, max_ways=5, mini_batch_size=4)
    batch = random_episodes(3, 3, 2, 2, 28, channels=1, generator=torch.Generator().manual_seed(0))
    (name, layer), = model.ttt_layers()
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append(args))
    model.record_inner_loop(True)
    with torch.no_grad():
        model(batch)
        stats = {k.rsplit("/", 1)[1]: float(v) for k, v in model.inner_loop_stats().items()}
        x, writers = seen[0]  # [B, T, width], 6 supports
        q, k, v, eta = layer.views(x, writers)
        W0, b0 = layer.W0.expand(3, *layer.W0.shape), layer.b0.expand(3, *layer.b0.shape)
        _, W, b = ttt_linear(q, k, v, eta, W0, b0, layer.ln_weight, layer.ln_bias, 4, form="primal")

        def loss(W, b):  # [B, H, T]: 0.5 ||k + LN(k W + b) - v||^2 per token
            z = k @ W + b.unsqueeze(2)
            ln = torch.nn.functional.layer_norm(z, z.shape[-1:], eps=1e-6) * layer.ln_weight[:, None] + layer.ln_bias[:, None]
            return 0.5 * (k + ln - v).square().sum(-1)

        before, after = loss(W0, b0)[..., :writers].mean(), loss(W, b)[..., :writers].mean()
        change = ((W - W0).square().sum((1, 2, 3)) + (b - b0).square().sum((1, 2))).sqrt().mean()
    assert writers == 6 and (eta[..., writers:] == 0).all() and after < before
    want = {"inner_loss_before": before, "inner_loss_after": after, "inner_loss_ratio": after / before,
            "eta_mean": eta[..., :writers].mean(), "eta_min": eta[..., :writers].min(),
            "eta_max": eta[..., :writers].max(), "state_change": change}
    assert set(stats) == set(want) and stats["eta_min"] < stats["eta_mean"] < stats["eta_max"]
    for key, value in want.items():
        assert stats[key] == pytest.approx(float(value), rel=1e-5), key
