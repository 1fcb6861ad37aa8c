"""Attention of new positions over one sequence's KV cache (inference: no saved activations).

Shapes: q [N, >= C] (its first C columns are the queries: a whole qkv row may be given),
out [N, C] (N new positions of one sequence, head h at channels h*hs:(h+1)*hs);
k, v [NH, capacity, hs] (the cache, already holding the new positions' keys and values);
row i sits at position first + i and attends to keys 0 .. first + i (causal).

A few rows (decoding steps) are computed one at a time, by the same instructions whatever N
is, and the few rows of many sequences (a batch's decoding step) go through one call
(kv_append_attention_batch) rather than one per sequence and layer; there, from
PARALLEL_SEQUENCES sequences on, the (sequence, head) pairs run on numba's threads. The rows'
kernels carry no fast-math flag: each sum's order is written in the code (vecmath's row_dot
and row_sum), so a row has the same bits alone, in a serial batch and on any thread; under
'reassoc' LLVM chose different orders in the serial and the parallel kernels.
Many rows (a prompt's pass) go through BLAS, two gemms per head (scores, then the
probabilities times the values): measured on GPT-2 small's shape with a 1,000-token prompt,
the row loop made attention the larger part of the pass. The two ways differ by rounding only.
"""
import math

import numpy as np

from . import blas
import numba
from numba import prange

from ._jit import kernel, reduction_kernel
from .blas import gemm
from .q8 import PARALLEL_MIN_MACS, parallel_kernel
from .vecmath import fast_exp, row_dot, row_max, row_sum

GEMM_ROWS = 16  # from this many new positions on, attention runs as gemms
BLOCK = 128     # query rows per pair of gemms
PARALLEL_SEQUENCES = 2  # a batch of this many sequences attends on numba's threads (and enough work)
inline = numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")


def kv_attention(out, q, k, v, first):
    """out [N, C] = attention of q's rows over the cache k, v (positions first .. first+N-1)."""
    if kv_attention_uses_gemm(q.shape[0]):
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


def _store(k, v, qkv, first):
    N = qkv.shape[0]
    NH, _, hs = k.shape
    C = NH * hs
    for i in range(N):
        for h in range(NH):
            kt, vt = k[h, first + i], v[h, first + i]
            for j in range(hs):
                kt[j] = qkv[i, C + h * hs + j]
                vt[j] = qkv[i, 2 * C + h * hs + j]


@reduction_kernel
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
def _head_rows(out, q, k, v, first, h, p, y):
    """Head h of out's rows (as kv_attention_rows) with scratch p [>= first + N] and y [hs].

    Every sum is in an order fixed by the code, not by LLVM (no fast-math flags): the score
    dot by row_dot, the softmax's total by row_sum, the values' accumulation element by
    element; so a (sequence, head) gives the same bits run alone, in a batch, or on a thread
    of the parallel batch."""
    N = q.shape[0]
    hs = k.shape[2]
    dt = q.dtype.type
    scale = dt(1.0 / math.sqrt(hs))
    kh, vh = k[h], v[h]
    for i in range(N):
        n = first + i + 1
        qh = q[i, h * hs:(h + 1) * hs]
        top = dt(-np.inf)
        for t in range(n):
            s = row_dot(kh[t], qh) * scale
            p[t] = s
            top = max(top, s)
        for t in range(n):
            p[t] = fast_exp(p[t] - top)
        total = row_sum(p[:n])
        y[:] = 0.0
        for t in range(n):
            pt, vt = p[t], vh[t]
            for j in range(hs):
                y[j] += pt * vt[j]
        inv = dt(1.0) / total
        o = out[i, h * hs:(h + 1) * hs]
        for j in range(hs):
            o[j] = y[j] * inv


@kernel
def kv_attention_rows(out, q, k, v, first):
    NH, _, hs = k.shape
    p = np.empty(first + q.shape[0], q.dtype)
    y = np.empty(hs, q.dtype)
    for h in range(NH):
        _head_rows(out, q, k, v, first, h, p, y)


_store_inline = inline(_store)
kv_store = kernel(_store)


@kernel
def _batch_serial(out, qkv, ks, vs, layer, spans):
    for s in range(len(ks)):
        a, b, first = spans[s, 0], spans[s, 1], spans[s, 2]
        k, v = ks[s][layer], vs[s][layer]
        _store_inline(k, v, qkv[a:b], first)
        kv_attention_rows(out[a:b], qkv[a:b], k, v, first)


@parallel_kernel
def _batch_parallel(out, qkv, ks, vs, layer, spans):
    S = len(ks)
    NH, _, hs = ks[0][layer].shape
    for s in range(S):
        a, b, first = spans[s, 0], spans[s, 1], spans[s, 2]
        _store_inline(ks[s][layer], vs[s][layer], qkv[a:b], first)
    for job in prange(S * NH):
        s, h = job // NH, job % NH
        a, b, first = spans[s, 0], spans[s, 1], spans[s, 2]
        p = np.empty(first + b - a, qkv.dtype)
        y = np.empty(hs, qkv.dtype)
        _head_rows(out[a:b], qkv[a:b], ks[s][layer], vs[s][layer], first, h, p, y)


def kv_append_attention_batch(out, qkv, ks, vs, layer, spans, parallel=None):
    """Many sequences' few new rows in one call: sequence s owns rows a:b of qkv [N, 3C] and
    out [N, C], spans[s] = (a, b, first), at positions first.. of its cache ks[s][layer],
    vs[s][layer] (typed lists of [L, NH, capacity, hs]). Each row by the same instructions as
    alone. Where batch_runs_parallel says (or parallel), the (sequence, head) pairs run on
    numba's threads: the same bits (every sum in a fixed order)."""
    if parallel is None:
        parallel = batch_runs_parallel(spans, qkv.shape[1] // 3)   # (on its own work)
    (_batch_parallel if parallel else _batch_serial)(out, qkv, ks, vs, layer, spans)


def batch_runs_parallel(spans, width: int, threads_busy: bool = False) -> bool:
    """Whether a batch's attention (spans as kv_append_attention_batch's, model width C) goes
    on numba's threads: from PARALLEL_SEQUENCES sequences on, where the pass's products run
    on them anyway (threads_busy: its threads are awake, a region costs microseconds) or the
    attention alone is PARALLEL_MIN_MACS multiply-adds (q.k and p.v over every key a row
    sees), the int8 products' bound. Below, a region costs more than it saves, and its
    spinning thread takes the core the daemon's other threads need."""
    if len(spans) < PARALLEL_SEQUENCES:
        return False
    if threads_busy:
        return True
    rows, seen = spans[:, 1] - spans[:, 0], spans[:, 2] + spans[:, 1] - spans[:, 0]
    return 2 * width * int((rows * seen).sum()) >= PARALLEL_MIN_MACS


def kv_attention_uses_gemm(rows: int) -> bool:
    """Whether kv_attention runs this many new rows of one sequence as gemms."""
    return rows >= GEMM_ROWS and blas.AVAILABLE


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
