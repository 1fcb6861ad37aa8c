"""Attention of new positions over one sequence's KV cache (inference: no saved activations).

Shapes: q [N, >= C] (its first C columns are the queries: a whole qkv row may be given),
out [N, C] (N new positions of one sequence, head h at channels h*hs:(h+1)*hs);
k, v [NH, capacity, hs] (the cache, already holding the new positions' keys and values);
row i sits at position first + i and attends to keys 0 .. first + i (causal).

A few rows (decoding steps) are computed one at a time, by the same instructions whatever N
is, and the few rows of many sequences (a batch's decoding step) go through one call
(kv_append_attention_batch) rather than one per sequence and layer. Many rows (a prompt's pass) go through BLAS, two gemms per head (scores, then the
probabilities times the values): measured on GPT-2 small's shape with a 1,000-token prompt,
the row loop made attention the larger part of the pass. The two ways differ by rounding only.
"""
import math

import numpy as np

from . import blas
import numba

from ._jit import reduction_kernel as kernel
from .blas import gemm
from .vecmath import fast_exp, row_max

GEMM_ROWS = 16  # from this many new positions on, attention runs as gemms
BLOCK = 128     # query rows per pair of gemms
inline = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nsz"}, inline="always")


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


def _attention_rows(out, q, k, v, first):
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


_attention_rows_inline = inline(_attention_rows)
_store_inline = inline(_store)
kv_attention_rows = kernel(_attention_rows)
kv_store = kernel(_store)


@kernel
def kv_append_attention_batch(out, qkv, ks, vs, layer, spans):
    """Many sequences' few new rows in one call: sequence s owns rows a:b of qkv [N, 3C] and
    out [N, C], spans[s] = (a, b, first), at positions first.. of its cache ks[s][layer],
    vs[s][layer] (typed lists of [L, NH, capacity, hs]). Each row by the same instructions as alone."""
    for s in range(len(ks)):
        a, b, first = spans[s, 0], spans[s, 1], spans[s, 2]
        k, v = ks[s][layer], vs[s][layer]
        _store_inline(k, v, qkv[a:b], first)
        _attention_rows_inline(out[a:b], qkv[a:b], k, v, first)


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
