"""Attention of new positions over one sequence's KV cache (inference: no saved activations).

Shapes: q [N, >= C] (its first C columns are the queries: a whole qkv row may be given),
out [N, C] (N new positions of one sequence, head h at channels h*hs:(h+1)*hs);
k, v [NH, capacity, hs] (the cache, already holding the new positions' keys and values);
row i sits at position first + i and attends to keys 0 .. first + i (causal).

A few rows (decoding steps) are computed one at a time, by the same instructions whatever N
is. Many rows (a prompt's pass) go through BLAS, two gemms per head (scores, then the
probabilities times the values): measured on GPT-2 small's shape with a 1,000-token prompt,
the row loop made attention the larger part of the pass. The two ways differ by rounding only.
"""
import math

import numpy as np

from . import blas
from ._jit import reduction_kernel as kernel
from .blas import gemm
from .vecmath import fast_exp, row_max

GEMM_ROWS = 16  # from this many new positions on, attention runs as gemms
BLOCK = 128     # query rows per pair of gemms


def kv_attention(out, q, k, v, first):
    """out [N, C] = attention of q's rows over the cache k, v (positions first .. first+N-1)."""
    if q.shape[0] >= GEMM_ROWS and blas.AVAILABLE:
        kv_attention_gemm(out, q, k, v, first)
    else:
        kv_attention_rows(out, q, k, v, first)


def kv_append_attention(out, qkv, k, v, first):
    """Stores the keys and values of qkv [N, 3C] (q | k | v) at positions first.. of the cache,
    then out = attention of its queries: one sequence's share of a layer in one or two calls."""
    kv_store(k, v, qkv, first)
    # qkv whole, not a column slice: a slice of one row is C-contiguous and of several is not,
    # which numba would compile twice (rounding differently); the kernels read q's columns only
    kv_attention(out, qkv, k, v, first)


@kernel
def kv_store(k, v, qkv, first):
    N = qkv.shape[0]
    NH, _, hs = k.shape
    C = NH * hs
    for i in range(N):
        for h in range(NH):
            kt, vt = k[h, first + i], v[h, first + i]
            for j in range(hs):
                kt[j] = qkv[i, C + h * hs + j]
                vt[j] = qkv[i, 2 * C + h * hs + j]


@kernel
def kv_attention_gemm(out, q, k, v, first):
    """Row blocks of BLOCK queries take only the keys they can see (half the work when causal)."""
    N = q.shape[0]
    NH, _, hs = k.shape
    dt = q.dtype.type
    scale = 1.0 / math.sqrt(hs)
    p = np.empty((min(N, BLOCK), first + N), q.dtype)
    for h in range(NH):
        for a in range(0, N, BLOCK):
            b = min(a + BLOCK, N)
            n = first + b                      # keys the block's last row sees
            pb = p[:b - a, :n]
            gemm(False, True, scale, q[a:b, h * hs:(h + 1) * hs], k[h, :n], 0.0, pb)  # scale q_i . k_t
            for i in range(a, b):
                row = pb[i - a]
                m = first + i + 1
                top = row_max(row[:m])
                total = dt(0.0)
                for t in range(m):
                    e = fast_exp(row[t] - top)
                    row[t] = e
                    total += e
                inv = dt(1.0) / total
                for t in range(m):
                    row[t] *= inv
                for t in range(m, n):
                    row[t] = 0.0
            gemm(False, False, 1.0, pb, v[h, :n], 0.0, out[a:b, h * hs:(h + 1) * hs])


@kernel
def kv_attention_rows(out, q, k, v, first):
    N = q.shape[0]
    NH, _, hs = k.shape
    dt = q.dtype.type
    scale = dt(1.0 / math.sqrt(hs))
    p = np.empty(first + N, q.dtype)
    y = np.empty(hs, q.dtype)
    for i in range(N):
        n = first + i + 1
        for h in range(NH):
            qh = q[i, h * hs:(h + 1) * hs]
            kh, vh = k[h], v[h]
            top = dt(-np.inf)
            for t in range(n):
                kt = kh[t]
                s = dt(0.0)
                for j in range(hs):
                    s += kt[j] * qh[j]
                s *= scale
                p[t] = s
                top = max(top, s)
            total = dt(0.0)
            for t in range(n):
                e = fast_exp(p[t] - top)
                p[t] = e
                total += e
            y[:] = 0.0
            for t in range(n):
                pt, vt = p[t], vh[t]
                for j in range(hs):
                    y[j] += pt * vt[j]
            inv = dt(1.0) / total
            o = out[i, h * hs:(h + 1) * hs]
            for j in range(hs):
                o[j] = y[j] * inv


def kv_attention_ref(out, q, k, v, first):
    N, C = q.shape
    NH, _, hs = k.shape
    for i in range(N):
        n = first + i + 1
        qh = q[i].reshape(NH, hs)
        s = np.einsum("htj,hj->ht", k[:, :n].astype(np.float64), qh.astype(np.float64)) / math.sqrt(hs)
        s = np.exp(s - s.max(axis=1, keepdims=True))
        s /= s.sum(axis=1, keepdims=True)
        out[i] = np.einsum("ht,htj->hj", s, v[:, :n].astype(np.float64)).reshape(C)
