"""Matrix-product benchmark: GFLOP/s at one thread, float32 and bfloat16, side by side.

    .venv/bin/python benchmarks/bench_gemm.py                  # the four shapes, 5 rounds
    .venv/bin/python benchmarks/bench_gemm.py --rounds 7 --seconds 0.3

Shapes are M x K x N (op(a) [M, K] times b [K, N]): GPT-2 small's QKV projection and MLP
projection at 256 tokens, a square 768 product at 1024 tokens, and the baby config's QKV at 64
tokens. Each round times every way once, in turn, so a noisy machine affects all alike; the
medians are printed. The ways: numpy's matmul (its OpenBLAS), cllmd's gemm from numba (the same
OpenBLAS), MKL's cblas_sgemm and cblas_gemm_bf16bf16f32 through cllmd.kernels.blas (bf16
operands made once, as a per-step weight copy would be), the same bf16 product with the
activation a converted to bf16 each call (cllmd.kernels.bf16.to_bf16), and PyTorch's float32
and bfloat16 matmul. Everything runs on one thread.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from cllmd.kernels import bf16, blas

SHAPES = ((256, 768, 2304), (256, 3072, 768), (1024, 768, 768), (64, 128, 384))


def _rate(fn, flops: float, seconds: float) -> float:
    """GFLOP/s of fn, called in a loop for about `seconds` (after one warm call)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n * flops / dt / 1e9


def ways(M: int, K: int, N: int) -> dict:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(M, K)).astype(np.float32)
    b = rng.normal(size=(K, N)).astype(np.float32)
    c = np.zeros((M, N), np.float32)
    ha, hb = np.zeros((M, K), np.uint16), np.zeros((K, N), np.uint16)
    bf16.to_bf16(ha, a)
    bf16.to_bf16(hb, b)

    def bf16_converting():
        bf16.to_bf16(ha, a)
        blas.gemm_bf16(False, False, 1.0, ha, hb, 0.0, c)

    found = {
        "numpy f32": lambda: np.matmul(a, b, out=c),
        "cllmd gemm f32": lambda: blas.gemm(False, False, 1.0, a, b, 0.0, c),
    }
    if blas.MKL_AVAILABLE:
        found["MKL sgemm"] = lambda: blas.gemm_mkl(False, False, 1.0, a, b, 0.0, c)
        found["MKL bf16"] = lambda: blas.gemm_bf16(False, False, 1.0, ha, hb, 0.0, c)
        found["MKL bf16 +conv a"] = bf16_converting
    try:
        import torch
        torch.set_num_threads(1)
        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
        ba, bb = ta.bfloat16(), tb.bfloat16()
        bc = torch.zeros((M, N), dtype=torch.bfloat16)
        found["torch f32"] = lambda: torch.matmul(ta, tb, out=tc)
        found["torch bf16"] = lambda: torch.matmul(ba, bb, out=bc)
    except ImportError:
        pass
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.25, help="time per way per round")
    args = p.parse_args(argv)
    if not blas.MKL_AVAILABLE:
        print("note: MKL is not installed (pip install 'cllmd[mkl]'): its columns are left out",
              file=sys.stderr)
    with threadpool_limits(limits=1):
        rows = []
        for M, K, N in SHAPES:
            fns = ways(M, K, N)
            rates = {k: [] for k in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    rates[name].append(_rate(fn, 2.0 * M * K * N, args.seconds))
            rows.append((f"{M}x{K}x{N}", {k: statistics.median(v) for k, v in rates.items()}))
    names = list(rows[0][1])
    print("| M x K x N | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for shape, med in rows:
        print(f"| {shape} | " + " | ".join(f"{med[k]:.0f}" for k in names) + " |")
    print(f"\nGFLOP/s, medians of {args.rounds} rounds, 1 thread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
