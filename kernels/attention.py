"""Causal multi-head self-attention on a fused qkv tensor: forward, backward, numpy references.

Shapes: qkv, dqkv [B, T, 3C] laid out as (q | k | v), head h at channels h*hs:(h+1)*hs of
each; out, dout [B, T, C]; att [B, NH, T, T] holds the softmax probabilities TRANSPOSED,
att[b, h, s, t] = P(query t attends to key s), exactly zero where s > t; scale = 1/sqrt(hs).

The (T x T) products go to BLAS (one gemm per head, called from numba). Keeping the scores
transposed puts a query's keys down a column, so the softmax's max, sum and normalisation
run across queries in contiguous, vectorized rows with no reordered reductions. The score
products k q^T and v dy^T take a transposed copy of q or dy (hs x T): as plain products they
run ~2x faster than against a transposed operand at these sizes, more than the copy costs.
"""
import math

import numpy as np

from ._jit import kernel
from .blas import gemm
from .linear import transpose
from .vecmath import fast_exp


@kernel
def attention_forward(out, att, qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    dt = qkv.dtype.type
    m = np.empty(T, qkv.dtype)    # per query: max score, then 1 / sum of exponentials
    tot = np.empty(T, qkv.dtype)
    q_t = np.empty((hs, T), qkv.dtype)
    for b in range(B):
        for h in range(n_head):
            q = qkv[b, :, h * hs:(h + 1) * hs]                      # (T, hs)
            k = qkv[b, :, C + h * hs:C + (h + 1) * hs]
            v = qkv[b, :, 2 * C + h * hs:2 * C + (h + 1) * hs]
            a = att[b, h]                                           # (T keys, T queries)
            transpose(q_t, q)
            gemm(False, False, scale, k, q_t, 0.0, a)               # a[s, t] = scale k_s . q_t
            # causal softmax down each column t over s <= t: att[s, t] = exp(a - max) / sum.
            # Masked entries become -inf, whose exp is exactly 0, so every loop runs over whole
            # rows of T: fixed-length loops vectorize completely, where the triangle's short
            # rows would leave most of the work to scalar loop epilogues.
            for s in range(1, T):
                a[s, :s] = -np.inf
            m[:] = a[0]
            for s in range(1, T):
                row = a[s]
                for t in range(T):
                    m[t] = max(m[t], row[t])
            tot[:] = 0.0
            for s in range(T):
                row = a[s]
                for t in range(T):
                    e = fast_exp(row[t] - m[t])
                    row[t] = e
                    tot[t] += e
            for t in range(T):
                tot[t] = dt(1.0) / tot[t]
            for s in range(T):
                row = a[s]
                for t in range(T):
                    row[t] *= tot[t]
            gemm(True, False, 1.0, a, v, 0.0, out[b, :, h * hs:(h + 1) * hs])   # y_t = sum_s att[s, t] v_s


@kernel
def attention_backward(dqkv, dout, qkv, att, n_head):
    # dqkv is written whole (=). Inverting the forward lines bottom-up, per head, with z the
    # scaled scores and P = att^T (queries by keys):
    #   y = P v               -> dP = dy v^T,     dv = P^T dy
    #   P = softmax(z)        -> dz = P (dP - rowsum(P dP))
    #   z = scale q k^T       -> dq = scale dz k, dk = scale dz^T q
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    scale = qkv.dtype.type(1.0 / math.sqrt(hs))
    d = np.empty((T, T), qkv.dtype)   # dP^T, then dz^T: keys by queries like att
    w = np.empty(T, qkv.dtype)
    dy_t = np.empty((hs, T), qkv.dtype)
    for b in range(B):
        for h in range(n_head):
            q = qkv[b, :, h * hs:(h + 1) * hs]
            k = qkv[b, :, C + h * hs:C + (h + 1) * hs]
            v = qkv[b, :, 2 * C + h * hs:2 * C + (h + 1) * hs]
            dy = dout[b, :, h * hs:(h + 1) * hs]
            a = att[b, h]
            transpose(dy_t, dy)
            gemm(False, False, 1.0, v, dy_t, 0.0, d)                               # d[s, t] = v_s . dy_t
            gemm(False, False, 1.0, a, dy, 0.0, dqkv[b, :, 2 * C + h * hs:2 * C + (h + 1) * hs])  # dv
            # whole rows again (see the forward): att is exactly 0 where s > t, so those terms vanish
            w[:] = 0.0
            for s in range(T):
                row, ds = a[s], d[s]
                for t in range(T):
                    w[t] += row[t] * ds[t]
            for s in range(T):
                row, ds = a[s], d[s]
                for t in range(T):
                    ds[t] = scale * row[t] * (ds[t] - w[t])
            gemm(True, False, 1.0, d, k, 0.0, dqkv[b, :, h * hs:(h + 1) * hs])          # dq_t = sum_s dz[t, s] k_s
            gemm(False, False, 1.0, d, q, 0.0, dqkv[b, :, C + h * hs:C + (h + 1) * hs])  # dk_s = sum_t dz[t, s] q_t


def _heads(qkv, n_head):
    """Views q, k, v of qkv as (B, NH, T, hs) without copying."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    return [qkv[:, :, i * C:(i + 1) * C].reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)
            for i in range(3)]


def attention_forward_ref(out, att, qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = _heads(qkv, n_head)
    pre = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(C // n_head)   # (B, NH, T, T) queries by keys
    pre = np.where(np.tril(np.ones((T, T), dtype=bool)), pre, -np.inf)
    pre = np.exp(pre - pre.max(axis=-1, keepdims=True))
    p = pre / pre.sum(axis=-1, keepdims=True)
    att[...] = p.transpose(0, 1, 3, 2)
    out[...] = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, C)


def attention_backward_ref(dqkv, dout, qkv, att, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = _heads(qkv, n_head)
    p = att.transpose(0, 1, 3, 2)
    dy = dout.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
    dp = dy @ v.transpose(0, 1, 3, 2)
    dv = p.transpose(0, 1, 3, 2) @ dy
    dz = p * (dp - (p * dp).sum(axis=-1, keepdims=True)) / math.sqrt(hs)
    dq = dz @ k
    dk = dz.transpose(0, 1, 3, 2) @ q
    for i, g in enumerate((dq, dk, dv)):
        dqkv[:, :, i * C:(i + 1) * C] = g.transpose(0, 2, 1, 3).reshape(B, T, C)
