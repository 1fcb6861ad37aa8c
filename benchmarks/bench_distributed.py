"""The spheres over MPI ranks against the one-process trainer, side by side, and the bytes per step.

    .venv/bin/python benchmarks/bench_distributed.py --steps 30 --rounds 3
    .venv/bin/python benchmarks/bench_distributed.py --steps 30 --rounds 3 --precision bf16   # needs cllmd[mkl]

Each round runs, one after the other: the one-process trainer with 2 threads, then
`mpirun -np 1` and `mpirun -np 2` with one thread per rank (TCP over loopback), all on the
same model, data and seed; it prints median tokens/s per contender, the ratio to the
one-process run, whether the final weights are bit-identical, and the payload bytes exchanged
per step, measured (what the ranks handed to MPI) and computed (8 (R-1) P + the batch rows),
then extrapolates the exchange to GPT-2 small on a 10 Gbit/s network. --precision is the
trainer's train.precision (float32 by default, so runs on machines with and without MKL compare).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
SHAPES = {
    "baby": dict(vocab_size=257, n_layer=4, n_head=4, n_embd=128, block_size=64),
    "default": dict(vocab_size=4096, n_layer=4, n_head=4, n_embd=128, block_size=128),
}
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
MCA = ["--oversubscribe", "--bind-to", "none", "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "lo",
       "--mca", "pml", "ob1", "--with-ft", "ulfm"]
GPT2_SMALL_PARAMS = 124_439_808   # 12 layers, 768 wide, vocabulary 50257, context 1024 (tied head)


def inner(args) -> None:
    """One contender: trains args.steps steps after one warm-up step, prints a JSON line (rank 0)."""
    from cllmd.launch import launched, trainer_class
    from cllmd.model import Model, ModelConfig
    from cllmd.tokensource import TokenArraySource
    from cllmd.trainer import TrainConfig
    launch = launched()
    if launch is not None:
        from cllmd import distributed
        distributed.start()
        if launch.rank > 0:
            sys.exit(distributed.run_worker(args.threads))
    tokens = np.frombuffer(DATA.read_bytes()[:400_000], dtype=np.uint8).astype(np.uint32)
    cfg = ModelConfig(**SHAPES[args.model])
    model = Model(cfg, seed=1)
    trainer = trainer_class()(model, TokenArraySource(tokens % cfg.vocab_size, 0.1),
                              TrainConfig(batch_size=12, warmup=5, decay_end_step=1000, eval_interval=0,
                                          precision=args.precision), args.threads)
    trainer.step()  # kernels compiled, buffers allocated, workers set up
    times, tokens_done, step_bytes = [], 0, []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        r = trainer.step()
        times.append(time.perf_counter() - t0)
        tokens_done += r["tokens"]
        step_bytes.append(r.get("bytes_exchanged", 0))
    trainer.close()
    print(json.dumps({"tokens_per_second": tokens_done / sum(times), "parameters": model.num_params,
                      "step_bytes": statistics.median(step_bytes),
                      "batch_bytes": 12 * cfg.block_size * 8 * 2,
                      "sha256": hashlib.sha256(model.flat.tobytes()).hexdigest()}), flush=True)


def run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, env=dict(os.environ, **MPI_ENV), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SHAPES), default="baby")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", choices=["float32", "bf16", "auto"], default="float32",
                   help="the trainer's train.precision (default float32)")
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        return inner(args)
    mpirun = shutil.which("mpirun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if mpirun is None:
        raise SystemExit("no mpirun: pip install 'cllmd[mpi]'")
    me = [sys.executable, str(Path(__file__).resolve()), "--inner", "--model", args.model, "--steps", str(args.steps),
          "--precision", args.precision]
    contenders = {"1 process, 2 threads": me + ["--threads", "2"],
                  "mpirun -np 1, 1 thread": [mpirun, "-np", "1", *MCA, *me, "--threads", "1"],
                  "mpirun -np 2, 1 thread/rank": [mpirun, "-np", "2", *MCA, *me, "--threads", "1"]}
    print(f"load average before: {os.getloadavg()[0]:.2f}; model {args.model}, precision {args.precision}, "
          f"{args.steps} steps x {args.rounds} rounds")
    results: dict[str, list[dict]] = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for name, cmd in contenders.items():
            results[name].append(run(cmd))
    ref = statistics.median(r["tokens_per_second"] for r in results["1 process, 2 threads"])
    sha = results["1 process, 2 threads"][0]["sha256"]
    P = results["1 process, 2 threads"][0]["parameters"]
    for name, rs in results.items():
        tps = statistics.median(r["tokens_per_second"] for r in rs)
        same = all(r["sha256"] == sha for r in rs)
        ranks = 2 if "-np 2" in name else 1
        computed = 8 * (ranks - 1) * P + (rs[0]["batch_bytes"] // 2 if ranks > 1 else 0)
        print(f"{name:<30} {tps:>9,.0f} tokens/s  {tps / ref:5.2f}x  bit-identical: {same}  "
              f"bytes/step measured {rs[0]['step_bytes']:>10,.0f}  computed {computed:>10,}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for R in (2, 4, 8):
        per_step = 8 * (R - 1) * GPT2_SMALL_PARAMS
        # the chain is pipelined in 4 MiB chunks: each link carries P floats of sums and P of weights
        seconds = 2 * 4 * GPT2_SMALL_PARAMS / 1.25e9 + 2 * (R - 1) * (4 << 20) / 1.25e9
        print(f"GPT-2 small ({GPT2_SMALL_PARAMS:,} parameters), R={R}: {per_step / 1e9:.2f} GB per step in all, "
              f"at most {2 * 4 * GPT2_SMALL_PARAMS / 1e9:.2f} GB each way through one rank's link; "
              f"~{seconds:.2f} s per step on 10 Gbit/s")


if __name__ == "__main__":
    main()
