"""Training benchmark: cllmd's 12-sphere trainer against the identical PyTorch model, side by side.

    .venv/bin/python benchmarks/bench_train.py --threads 1 2 --steps 40 --rounds 6   # speed, interleaved
    .venv/bin/python benchmarks/bench_train.py --model default --threads 1 2           # the daemon's default shape
    .venv/bin/python benchmarks/bench_train.py --checkpointing --threads 1 2           # its time cost
    .venv/bin/python benchmarks/bench_train.py --quality --steps 2000 --threads 2      # tinyshakespeare val loss
    .venv/bin/python benchmarks/bench_train.py --model 85m --precision float32 bf16 --threads 2 \
        --steps 2 --rounds 3 --autocast                       # bf16 beside float32 and torch's bf16 autocast
    .venv/bin/python benchmarks/bench_train.py --quality --precision float32 bf16 --steps 2000  # val loss of each
    .venv/bin/python benchmarks/bench_train.py --model 85m --precision bf16 --no-torch --daemon-heap  # with the daemon's malloc (page faults)

Speed mode builds one cllmd trainer per thread count up front, then runs rounds in which every
configuration (cllmd and PyTorch, each thread count) takes its turn, so a noisy, shared machine
affects all alike; it prints median ms/step and tokens/s, the cllmd/PyTorch ratio per thread
count and the thread scaling, with the load average before and after. Quality mode trains
nanoGPT's CPU "baby" config at character level (bytes tokenizer) on tinyshakespeare with a
90/10 split and nanoGPT's shakespeare_char optimizer settings, and reports the validation loss
(nanoGPT: ~1.88) and the wall time. PyTorch is optional and never a dependency of cllmd.

--precision lists the trainer's precisions to time (train.precision; bf16 needs cllmd[mkl]):
one trainer per thread count switches between them between rounds (the first step after a
switch is not timed), so the large shapes hold one model's memory, not one per precision.
--autocast also times PyTorch under torch.autocast("cpu", dtype=torch.bfloat16), likewise one
model switching. In quality mode each precision trains from the same seed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from cllmd.model import Model, ModelConfig
from cllmd.reduction import OrderedGradientSum
from cllmd.tokensource import TokenArraySource
from cllmd.trainer import TrainConfig, Trainer

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
SHAPES = {
    "baby": dict(vocab_size=257, n_layer=4, n_head=4, n_embd=128, block_size=64),     # nanoGPT's CPU config
    "default": dict(vocab_size=4096, n_layer=4, n_head=4, n_embd=128, block_size=128),  # cllmd.toml defaults
    "medium": dict(vocab_size=4096, n_layer=8, n_head=8, n_embd=256, block_size=256),
    "85m": dict(vocab_size=257, n_layer=12, n_head=12, n_embd=768, block_size=256),   # GPT-2 small at block 256, bytes
    "gpt2": dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024),  # GPT-2 small (124M)
}


def load_source() -> TokenArraySource:
    if not DATA.exists():
        sys.exit(f"{DATA} is missing")
    tokens = np.frombuffer(DATA.read_bytes(), dtype=np.uint8).astype(np.uint16)
    return TokenArraySource(tokens, 0.1)


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def time_phases(trainer: Trainer) -> dict[str, list[float]]:
    """Wraps node zero's phases of one trainer with timers: {phase: [seconds per call]}."""
    phases: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases.setdefault(name, []).append(time.perf_counter() - t0)
        return wrapper

    trainer._refresh_weight_copies = timed("weight copies", trainer._refresh_weight_copies)
    trainer._sample = timed("sample batch", trainer._sample)
    trainer._dispatch = timed("12 spheres", trainer._dispatch)
    trainer.optimizer.step = timed("AdamW", trainer.optimizer.step)
    return phases


def cllmd_round(trainer: Trainer, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - t0)
    return times


class TorchRunner:
    """The identical model and AdamW in PyTorch, fed batches from the same kind of source."""

    def __init__(self, cfg: ModelConfig, params, source, batch: int):
        import torch
        sys.path.insert(0, str(HERE))
        from torch_reference import TorchGPT
        self.torch = torch
        self.model = TorchGPT(cfg, params)
        self.opt = self.model.configure_optimizer(1e-3, 0.1)
        self.source, self.batch, self.T = source, batch, cfg.block_size
        self.rng = np.random.default_rng(0)

    def round(self, threads: int, steps: int, autocast: bool = False) -> list[float]:
        import contextlib
        torch = self.torch
        torch.set_num_threads(threads)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            x, y = self.source.sample_batch(self.rng, self.batch, self.T)
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                _, loss = self.model(torch.from_numpy(x), torch.from_numpy(y))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            times.append(time.perf_counter() - t0)
        return times


def speed(args) -> dict:
    cfg = ModelConfig(**SHAPES[args.model])
    source = load_source()
    print(f"{args.model} model {SHAPES[args.model]}, batch {args.batch}, {args.rounds} rounds of "
          f"{args.steps} steps per configuration; precisions {' '.join(args.precision)}; {load()}", flush=True)
    variants = [False, True] if args.checkpointing else [False]
    trainers = {}
    for threads in args.threads:
        for ck in variants:
            tr = Trainer(Model(cfg, seed=0), source,
                         TrainConfig(batch_size=args.batch, warmup=10, grad_checkpointing=ck,
                                     precision=args.precision[0]), threads=threads)
            tr.step()  # warm up (numba cache load, buffers)
            trainers[threads, ck] = tr
    phases = {key: time_phases(tr) for key, tr in trainers.items()} if args.phases else {}
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    print(f"GIL switch interval {sys.getswitchinterval() * 1e3:g} ms", flush=True)
    ref = None
    torch_ways = ["float32"] + (["autocast"] if args.autocast else [])
    if not args.no_torch:
        try:
            ref = TorchRunner(cfg, Model(cfg, seed=0).params, source, args.batch)
            for threads in args.threads:
                for way in torch_ways:
                    ref.round(threads, 1, way == "autocast")
        except ImportError:
            print("PyTorch is not installed: timing cllmd alone", file=sys.stderr)
    precisions = list(args.precision) + (["bf16 rows"] if args.rows else [])
    keys = [(threads, ck, p) for (threads, ck) in trainers for p in precisions]
    sums: dict = {}  # trainer -> (its own gradient sum, one without direct matrices)

    def use_rows(tr: Trainer, rows: bool) -> bool:
        """tr's gradient sum: its own, or one where every gradient goes through rows committed
        whole (the second round's path, as MPI's chain still does); True when just made."""
        made = id(tr) not in sums
        if made:
            sums[id(tr)] = (tr.gradsum, OrderedGradientSum(tr.model.flat.size, tr.model.dtype, rows=tr.pool.size))
        gs = sums[id(tr)][1 if rows else 0]
        tr.gradsum, tr.grad = gs, gs.grad
        return made and rows
    times = {key: [] for key in keys}
    cpu = {key: 0.0 for key in keys}
    faults = {key: 0 for key in keys}  # minor page faults of the process during the key's steps
    waits = {key: [0.0, 0] for key in keys}  # seconds spheres waited for their turn, matrices deferred
    ref_times = {(threads, way): [] for threads in args.threads for way in torch_ways}
    for _ in range(args.rounds):  # every configuration takes a turn in every round
        for threads, ck, precision in keys:
            tr = trainers[threads, ck]
            want = "bf16" if precision == "bf16 rows" else precision
            if tr.precision != want:
                tr.update_config(precision=want)
                tr.step()  # not timed: the workspaces reallocate for the other precision
            if args.rows and use_rows(tr, precision == "bf16 rows"):
                tr.step()  # not timed: the rows' pages are touched for the first time
            c0, w0, d0 = time.process_time(), tr.gradsum.waited_s, tr.gradsum.deferred
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[threads, ck, precision] += cllmd_round(tr, args.steps)
            cpu[threads, ck, precision] += time.process_time() - c0
            faults[threads, ck, precision] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            waits[threads, ck, precision][0] += tr.gradsum.waited_s - w0
            waits[threads, ck, precision][1] += tr.gradsum.deferred - d0
            if ref is not None and not ck and precision == args.precision[-1]:
                for way in torch_ways:
                    ref_times[threads, way] += ref.round(threads, args.steps, way == "autocast")
    for tr in trainers.values():
        tr.close()
    tokens = args.batch * cfg.block_size
    results = {}
    for (threads, ck, precision), ts in times.items():
        med = statistics.median(ts)
        row = {"cllmd_ms_per_step": 1e3 * med, "cllmd_tokens_per_second": tokens / med,
               "cllmd_cpu_ms_per_step": 1e3 * cpu[threads, ck, precision] / len(ts),
               "cllmd_minor_faults_per_step": round(faults[threads, ck, precision] / len(ts))}
        if precision == "bf16" or (precision == "auto" and trainers[threads, ck].precision == "bf16") \
                or precision == "bf16 rows":
            # the spheres' waits for their turn on a weight matrix (cllmd.kernels.ordered)
            row["turn_wait_ms_per_step"] = 1e3 * waits[threads, ck, precision][0] / len(ts)
            row["deferred_per_step"] = waits[threads, ck, precision][1] / len(ts)
        if ref is not None and not ck:
            for way in torch_ways:
                tmed = statistics.median(ref_times[threads, way])
                suffix = "" if way == "float32" else "_autocast"
                row.update({f"torch{suffix}_ms_per_step": 1e3 * tmed, f"torch{suffix}_tokens_per_second": tokens / tmed,
                            f"ratio{suffix}": tmed / med})
        label = f"{threads}{' checkpointing' if ck else ''}{'' if precision == args.precision[0] else ' ' + precision}"
        results[label] = row
        print(f"threads={threads}{' checkpointing' if ck else ''} {precision}: "
              + ", ".join(f"{k} {v:,.2f}" for k, v in row.items()), flush=True)
        if args.phases and precision == args.precision[-1]:
            print("  median ms per step (all precisions): " + ", ".join(
                f"{name} {1e3 * statistics.median(v):.2f}" for name, v in phases[threads, ck].items()))
    base = results[str(args.threads[0])]["cllmd_tokens_per_second"]
    for threads in args.threads[1:]:
        print(f"cllmd scaling {threads} vs {args.threads[0]} thread(s): "
              f"{results[str(threads)]['cllmd_tokens_per_second'] / base:.2f}x")
        if ref is not None:
            tbase = results[str(args.threads[0])]["torch_tokens_per_second"]
            print(f"torch scaling {threads} vs {args.threads[0]} thread(s): "
                  f"{results[str(threads)]['torch_tokens_per_second'] / tbase:.2f}x")
    if args.checkpointing:
        for threads in args.threads:
            a, b = results[str(threads)], results[f"{threads} checkpointing"]
            print(f"checkpointing time cost at {threads} thread(s): "
                  f"{b['cllmd_ms_per_step'] / a['cllmd_ms_per_step'] - 1:+.1%} per step")
    print(load())
    return results


def quality(args) -> dict:
    source = load_source()
    outs = {}
    for precision in args.precision:
        # nanoGPT's config/train_shakespeare_char.py: lr 1e-3 cosine to 1e-4 over 2000 steps after
        # 100 warmup steps, AdamW betas (0.9, 0.99), weight decay 0.1, clipping at 1.0
        cfg = TrainConfig(batch_size=12, lr=1e-3, min_lr=1e-4, warmup=100, decay_end_step=args.steps,
                          grad_clip=1.0, weight_decay=0.1, beta2=0.99, eval_windows=2400, seed=args.seed,
                          precision=precision)
        trainer = Trainer(Model(ModelConfig(**SHAPES["baby"]), seed=args.seed), source, cfg, threads=args.threads[0])
        print(f"baby config, {args.steps} steps, {args.threads[0]} thread(s), seed {args.seed}, "
              f"precision {trainer.precision}; {load()}", flush=True)
        t0 = time.perf_counter()
        for step in range(args.steps):
            r = trainer.step()
            if (step + 1) % 250 == 0:
                print(f"step {step + 1}: train loss {r['loss']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        seconds = time.perf_counter() - t0
        ev = trainer.evaluate()
        trainer.close()
        out = {"steps": args.steps, "precision": trainer.precision, "val_loss": round(ev["val_loss"], 4),
               "seconds": round(seconds, 1), "tokens_per_second": round(args.steps * 12 * 64 / seconds),
               "threads": args.threads[0], "seed": args.seed}
        print(json.dumps(out), flush=True)
        outs[precision] = out
    if len(outs) > 1:
        first, *rest = outs.values()
        for o in rest:
            print(f"val loss {o['precision']} - {first['precision']}: {o['val_loss'] - first['val_loss']:+.4f} nats")
    print(load())
    return outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", choices=sorted(SHAPES), default="baby")
    p.add_argument("--steps", type=int, default=40, help="steps per round (quality: total steps)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--checkpointing", action="store_true", help="also time trainers with gradient checkpointing")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--switch-interval", type=float, help="override the GIL switch interval (seconds)")
    p.add_argument("--phases", action="store_true", help="also time node zero's phases of each step")
    p.add_argument("--quality", action="store_true", help="train the baby config and report val loss")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--precision", nargs="+", choices=("auto", "float32", "bf16"), default=["float32"],
                   help="the trainer's precisions to run (train.precision)")
    p.add_argument("--rows", action="store_true",
                   help="also time bf16 with every gradient through rows committed whole (no direct matrices)")
    p.add_argument("--autocast", action="store_true",
                   help='also time PyTorch under torch.autocast("cpu", dtype=torch.bfloat16)')
    p.add_argument("--daemon-heap", action="store_true",
                   help="fix malloc's mmap threshold as the daemon does (cllmd/heap.py): a step's fresh "
                        "large arrays then show as page faults")
    args = p.parse_args()
    if args.daemon_heap:
        from cllmd.heap import return_large_blocks
        return_large_blocks()
    quality(args) if args.quality else speed(args)


if __name__ == "__main__":
    main()
