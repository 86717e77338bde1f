"""Cost of the TTT-Linear meta-learner per image encoder on natural images: test-time and training episodes per
second, and peak tensor memory, on random episodes of the real shapes (accuracy plays no part).

    python scripts/bench_encoders.py                    # miniImageNet 84x84 and CIFAR-FS 32x32, 5w1s and 5w5s
    python scripts/bench_encoders.py --quick            # tiny sizes, seconds (what the tests run)

The model is the shipped config's (configs/<dataset>/ttt_linear_<setting>.yaml) with the encoder swapped. Each
figure is the median of at least --repeats timed runs (and 3 s) after one warm-up. Test: a batch of --test-episodes episodes
evaluated under inference_mode. Training: one optimiser step (forward, backward, AdamW) on --train-episodes
episodes. Peak memory: live tensors allocated during one test batch / one training step (profiler events).
Writes results/bench_encoders.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ttt_meta.cli import set_threads
from ttt_meta.measure import (evaluate, hardware_text, markdown_table, median_seconds, optimizer_step, peak_tensor_mb,
                              printed_rows, provenance, random_episodes, write_results)
from ttt_meta.runs import build

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = {"conv4-32": ["model.init_args.encoder=conv4", "model.init_args.encoder_channels=32"],
            "conv4-64": ["model.init_args.encoder=conv4", "model.init_args.encoder_channels=64"],
            "resnet12": ["model.init_args.encoder=resnet12", "model.init_args.encoder_channels=64"]}
DATASETS = {"miniimagenet": 84, "cifarfs": 32}


def measure(dataset: str, setting: str, encoder: str, args) -> dict:
    """Test and training episodes per second and peak MB of the TTT-Linear model with `encoder`."""
    size = DATASETS[dataset] if not args.quick else 32
    extra = ENCODERS[encoder] + ([f"model.init_args.encoder_channels={4 if encoder == 'resnet12' else 8}",
                                  "model.init_args.width=16", f"model.init_args.image_size={size}"]
                                 if args.quick else [])
    model = build(ROOT / "configs" / dataset / f"ttt_linear_{setting}.yaml", extra).model
    ways, shots, queries = 5, int(setting[2:-1]), 15 if not args.quick else 2
    gen = torch.Generator().manual_seed(0)
    test_batch = random_episodes(args.test_episodes, ways, shots, queries, size, generator=gen)
    train_batch = random_episodes(args.train_episodes, ways, shots, queries, size, generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    min_seconds = 0 if args.quick else 3.0

    def test():
        evaluate(model, test_batch)

    def train():
        optimizer_step(model, optimizer, train_batch)

    model.eval()
    test_s = median_seconds(test, args.repeats, min_seconds)
    test_mb = peak_tensor_mb(test)
    model.train()
    train_s = median_seconds(train, args.repeats, min_seconds)
    train_mb = peak_tensor_mb(train)
    return {"dataset": dataset, "image_size": size, "setting": setting, "encoder": encoder,
            "features": model.model.encoder.out_features,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "images_per_episode": ways * (shots + queries),
            "test_episodes_per_s": args.test_episodes / test_s, "test_peak_mb": test_mb,
            "train_episodes_per_s": args.train_episodes / train_s, "train_peak_mb": train_mb,
            "test_episodes": args.test_episodes, "train_episodes": args.train_episodes}


def write(rows: list[dict], meta: dict, prov: dict, out: Path) -> str:
    header = ["data", "setting", "encoder", "params (M)", "test episodes/s", "test peak MB", "train episodes/s",
              "train peak MB"]
    cells = [[f"{r['dataset']} {r['image_size']}px", r["setting"], r["encoder"], f"{r['params_M']:.2f}",
              f"{r['test_episodes_per_s']:.2f}", f"{r['test_peak_mb']:.0f}", f"{r['train_episodes_per_s']:.3f}",
              f"{r['train_peak_mb']:.0f}"] for r in rows]
    text = "\n".join([
        f"TTT-Linear meta-learner per encoder ({hardware_text(prov)}); "
        f"15 queries per class; median of >= {meta['repeats']} runs (>= 3 s) after a warm-up.", "",
        markdown_table(header, cells), "",
        f"Test: batches of {rows[0]['test_episodes']} episodes under inference_mode. Training: steps of "
        f"{rows[0]['train_episodes']} episodes (forward, backward, AdamW). Peak MB: live tensors allocated "
        f"during one batch or step (profiler), weights excluded.", ""])
    write_results(out, "bench_encoders", {"meta": meta, "rows": rows}, text, prov)
    return text


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--settings", nargs="+", default=["5w1s", "5w5s"], choices=["5w1s", "5w5s"])
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--test-episodes", type=int, default=4)
    parser.add_argument("--train-episodes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny models and images: a functional check")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    set_threads()
    rows = printed_rows(measure(dataset, setting, encoder, args) for dataset in args.datasets
                        for setting in args.settings for encoder in args.encoders)
    meta = {"repeats": args.repeats, "quick": args.quick}
    print(write(rows, meta, provenance(__file__, argv), args.out))
    return rows


if __name__ == "__main__":
    main()
