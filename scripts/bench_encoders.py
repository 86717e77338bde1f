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
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import peak_tensor_mb  # noqa: E402
from ttt_meta.cli import main as cli_main  # noqa: E402

ENCODERS = {"conv4-32": ["--model.init_args.encoder=conv4", "--model.init_args.encoder_channels=32"],
            "conv4-64": ["--model.init_args.encoder=conv4", "--model.init_args.encoder_channels=64"],
            "resnet12": ["--model.init_args.encoder=resnet12", "--model.init_args.encoder_channels=64"]}
DATASETS = {"miniimagenet": 84, "cifarfs": 32}


def episodes(n: int, ways: int, shots: int, queries: int, size: int, gen: torch.Generator) -> dict:
    """n random episodes in the data module's batch format (uint8 images)."""
    def images(k):
        return torch.randint(0, 256, (n, ways * k, 3, size, size), dtype=torch.uint8, generator=gen)

    def labels(k):
        return torch.arange(ways).repeat_interleave(k).expand(n, -1).contiguous()

    return {"support": images(shots), "support_labels": labels(shots), "query": images(queries),
            "query_labels": labels(queries), "ways": ways}


def timed(fn, repeats: int, min_seconds: float = 3.0) -> float:
    """Median seconds of `fn` over at least `repeats` runs and `min_seconds` in all, after one warm-up."""
    fn()
    times = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < 100):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_peak_mb(step) -> float:
    """Peak live-tensor memory (MB) of one training step, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def measure(dataset: str, setting: str, encoder: str, args) -> dict:
    size = DATASETS[dataset] if not args.quick else 32
    extra = ENCODERS[encoder] + ([f"--model.init_args.encoder_channels={4 if encoder == 'resnet12' else 8}",
                                  "--model.init_args.width=16", f"--model.init_args.image_size={size}"]
                                 if args.quick else [])
    cli = cli_main(["--config", str(ROOT / "configs" / dataset / f"ttt_linear_{setting}.yaml"), *extra], run=False)
    model = cli.model
    ways, shots, queries = 5, int(setting[2:-1]), 15 if not args.quick else 2
    gen = torch.Generator().manual_seed(0)
    test_batch = episodes(args.test_episodes, ways, shots, queries, size, gen)
    train_batch = episodes(args.train_episodes, ways, shots, queries, size, gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def test():
        with torch.inference_mode():
            model(test_batch)

    def train():
        loss, _ = model.loss_and_accuracy(train_batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.eval()
    test_s = timed(test, args.repeats, 0 if args.quick else 3.0)
    test_mb = peak_tensor_mb(model, test_batch)
    model.train()
    train_s = timed(train, args.repeats, 0 if args.quick else 3.0)
    train_mb = train_peak_mb(train)
    return {"dataset": dataset, "image_size": size, "setting": setting, "encoder": encoder,
            "features": model.model.encoder.out_features,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "images_per_episode": ways * (shots + queries),
            "test_episodes_per_s": args.test_episodes / test_s, "test_peak_mb": test_mb,
            "train_episodes_per_s": args.train_episodes / train_s, "train_peak_mb": train_mb,
            "test_episodes": args.test_episodes, "train_episodes": args.train_episodes}


def write(rows: list[dict], meta: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_encoders.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"TTT-Linear meta-learner per encoder ({meta['device']}, {meta['threads']} threads, torch "
             f"{meta['torch']}); 15 queries per class; median of >= {meta['repeats']} runs (>= 3 s) after a warm-up.", "",
             "| data | setting | encoder | params (M) | test episodes/s | test peak MB | train episodes/s | "
             "train peak MB |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['dataset']} {r['image_size']}px | {r['setting']} | {r['encoder']} | {r['params_M']:.2f} | "
                     f"{r['test_episodes_per_s']:.2f} | {r['test_peak_mb']:.0f} | {r['train_episodes_per_s']:.3f} | "
                     f"{r['train_peak_mb']:.0f} |")
    lines += ["", f"Test: batches of {rows[0]['test_episodes']} episodes under inference_mode. Training: steps of "
              f"{rows[0]['train_episodes']} episodes (forward, backward, AdamW). Peak MB: live tensors allocated "
              f"during one batch or step (profiler), weights excluded.", ""]
    text = "\n".join(lines)
    (out / "bench_encoders.md").write_text(text)
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
    torch.set_num_threads(int(os.environ.get("TTT_META_THREADS", os.cpu_count() or 1)))
    rows = []
    for dataset in args.datasets:
        for setting in args.settings:
            for encoder in args.encoders:
                rows.append(measure(dataset, setting, encoder, args))
                print(json.dumps(rows[-1]), flush=True)
    meta = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "repeats": args.repeats, "quick": args.quick}
    print(write(rows, meta, args.out))
    return rows


if __name__ == "__main__":
    main()
