"""Ablation of the crystalline options against the default, on tinyshakespeare (bytes, baby config).

    .venv/bin/python benchmarks/bench_ablation.py --steps 2000 --seeds 1337 7

Trains the nanoGPT "baby" config (4 layers, 4 heads, 128 wide, block 64, batch 12, lr 1e-3
cosine to 1e-4, warmup 100) with each option on and off, same seeds and data, and prints the
validation loss on 2,400 fixed windows of the last 10% of the text.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from bench_train import SHAPES, load_source

from cllmd.model import Model, ModelConfig
from cllmd.trainer import TrainConfig, Trainer

VARIANTS = {
    "default": {},
    "lattice init": {"init": "lattice"},
    "clock positions": {"clock_positions": True},
    "both": {"init": "lattice", "clock_positions": True},
}


def run(options: dict, seed: int, steps: int, threads: int, source) -> float:
    cfg = ModelConfig(**{**SHAPES["baby"], **options})
    tc = TrainConfig(batch_size=12, lr=1e-3, min_lr=1e-4, warmup=100, decay_end_step=steps, beta2=0.99,
                     eval_windows=2400, seed=seed)  # nanoGPT's shakespeare_char settings, as bench_train --quality
    trainer = Trainer(Model(cfg, seed=seed), source, tc, threads=threads)
    for _ in range(steps):
        trainer.step()
    loss = trainer.evaluate()["val_loss"]
    trainer.close()
    return loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    source = load_source()
    results = {}
    for name, options in VARIANTS.items():
        t0 = time.perf_counter()
        losses = [run(options, seed, args.steps, args.threads, source) for seed in args.seeds]
        results[name] = {"val_loss": losses, "mean": statistics.mean(losses)}
        print(f"{name:16s} val loss {' '.join(f'{x:.4f}' for x in losses)}  mean {statistics.mean(losses):.4f}"
              f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
