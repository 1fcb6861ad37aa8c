"""Attention of new positions over one sequence's KV cache (inference: no saved activations).

Shapes: q, out [N, C] (N new positions of one sequence, head h at channels h*hs:(h+1)*hs);
k, v [NH, capacity, hs] (the cache, already holding the new positions' keys and values);
row i sits at position first + i and attends to keys 0 .. first + i (causal).

Each row is computed alone, by the same instructions whatever N is: a prompt pass over N
positions gives each position exactly what one step at that position gives.
"""
import math

import numpy as np

from ._jit import reduction_kernel as kernel
from .vecmath import fast_exp


@kernel
def kv_attention(out, q, k, v, first):
    N, C = q.shape
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
