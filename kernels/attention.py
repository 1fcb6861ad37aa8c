"""Causal multi-head self-attention on a fused qkv tensor: forward, backward, numpy references.

Shapes: qkv, dqkv [B, T, 3C] laid out as (q | k | v), head h at channels h*hs:(h+1)*hs of
each; out, dout [B, T, C]; att [B, NH, T, T] holds the softmax probabilities TRANSPOSED,
att[b, h, s, t] = P(query t attends to key s), exactly zero where s > t; scale = 1/sqrt(hs).

The (T x T) products go to BLAS (one gemm per head, called from numba). Keeping the scores
transposed puts a query's keys down a column, so the softmax's max, sum and normalisation
run across queries in contiguous, vectorized rows with no reordered reductions. The score
products k q^T and v dy^T take a transposed copy of q or dy (hs x T): as plain products they
run ~2x faster than against a transposed operand at these sizes, more than the copy costs.

In bfloat16 (the trainer's precision bf16): attention_forward_bf16 / attention_backward_bf16
run the same math with every T x T product on gemm_bf16 (float32 accumulation): q, k, v and
dy rounded once per pass into bfloat16 copies (qkv_h, dout_h [B, T, 3C] / [B, T, C]), the
scores and the softmax and its gradient in a float32 [T, T] scratch, one head at a time. The
probabilities are kept only in bfloat16, att_h [B, NH, T, T] (uint16 bits), which is what
the products read; the backward's element-wise softmax gradient decodes them. In this layout
every product is a plain CBLAS call on strided head slices, no transposed copies.
"""
import math

import numpy as np

from ._jit import kernel
from ._jit import inline_kernel
from .bf16 import bf16_of, f32_of, to_bf16
from .blas import gemm, gemm_bf16
from .linear import transpose
from .vecmath import fast_exp


@inline_kernel
def _causal_exp_columns(a, m, tot):
    """a [T keys, T queries] scores -> exp(a - max) down each column t over s <= t, in place,
    and tot[t] = 1 / the column's sum (the softmax is then a[s, t] tot[t]); m [T] scratch.
    Masked entries become -inf, whose exp is exactly 0, so every loop runs over whole rows of
    T: fixed-length loops vectorize completely, where the triangle's short rows would leave
    most of the work to scalar loop epilogues."""
    T = a.shape[0]
    dt = a.dtype.type
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


@kernel
def attention_forward(out, att, qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
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
            _causal_exp_columns(a, m, tot)                          # att[s, t] = exp(a - max) / sum
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


@kernel
def attention_forward_bf16(out, att_h, scores, qkv, qkv_h, n_head):
    """attention_forward with bfloat16 products: out [B, T, C] float32; att_h [B, NH, T, T]
    the probabilities in bfloat16 (transposed, as att); scores [T, T] float32 scratch; qkv_h
    [B, T, 3C] receives qkv rounded (nearest even)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    to_bf16(qkv_h.reshape((B * T, C3)), qkv.reshape((B * T, C3)))
    m = np.empty(T, qkv.dtype)
    tot = np.empty(T, qkv.dtype)
    for b in range(B):
        for h in range(n_head):
            q = qkv_h[b, :, h * hs:(h + 1) * hs]                    # (T, hs), row stride 3C
            k = qkv_h[b, :, C + h * hs:C + (h + 1) * hs]
            v = qkv_h[b, :, 2 * C + h * hs:2 * C + (h + 1) * hs]
            gemm_bf16(False, True, scale, k, q, 0.0, scores)        # scores[s, t] = scale k_s . q_t
            _causal_exp_columns(scores, m, tot)
            a = att_h[b, h]
            for s in range(T):                                      # normalized and rounded in one pass
                row, ah = scores[s], a[s]
                for t in range(T):
                    ah[t] = bf16_of(row[t] * tot[t])
            gemm_bf16(True, False, 1.0, a, v, 0.0, out[b, :, h * hs:(h + 1) * hs])   # y_t = sum_s att[s, t] v_s


@kernel
def attention_backward_bf16(dqkv, dout, qkv, att_h, qkv_h, dout_h, d):
    """attention_backward with bfloat16 products, after attention_forward_bf16: att_h its
    probabilities; qkv_h [B, T, 3C] and dout_h [B, T, C] receive qkv and dout rounded; d
    [T, T] float32 scratch. dqkv is written whole."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    n_head = att_h.shape[1]
    hs = C // n_head
    scale = np.float32(1.0 / math.sqrt(hs))
    to_bf16(qkv_h.reshape((B * T, C3)), qkv.reshape((B * T, C3)))
    to_bf16(dout_h.reshape((B * T, C)), dout.reshape((B * T, C)))
    d_h = np.empty((T, T), np.uint16)  # dz^T rounded, the operand of the last two products
    w = np.empty(T, np.float32)
    for b in range(B):
        for h in range(n_head):
            q = qkv_h[b, :, h * hs:(h + 1) * hs]
            k = qkv_h[b, :, C + h * hs:C + (h + 1) * hs]
            v = qkv_h[b, :, 2 * C + h * hs:2 * C + (h + 1) * hs]
            dy = dout_h[b, :, h * hs:(h + 1) * hs]
            a = att_h[b, h]
            gemm_bf16(False, True, 1.0, v, dy, 0.0, d)                                    # d[s, t] = v_s . dy_t
            gemm_bf16(False, False, 1.0, a, dy, 0.0, dqkv[b, :, 2 * C + h * hs:2 * C + (h + 1) * hs])  # dv
            w[:] = 0.0
            for s in range(T):
                row, ds = a[s], d[s]
                for t in range(T):
                    w[t] += f32_of(row[t]) * ds[t]
            for s in range(T):
                row, ds, dh = a[s], d[s], d_h[s]
                for t in range(T):
                    dh[t] = bf16_of(scale * f32_of(row[t]) * (ds[t] - w[t]))
            gemm_bf16(True, False, 1.0, d_h, k, 0.0, dqkv[b, :, h * hs:(h + 1) * hs])          # dq_t = sum_s dz[t, s] k_s
            gemm_bf16(False, False, 1.0, d_h, q, 0.0, dqkv[b, :, C + h * hs:C + (h + 1) * hs])  # dk_s = sum_t dz[t, s] q_t


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


def _bf16_values(h):
    """float64 values of bfloat16 bits h."""
    from .bf16 import from_bf16_ref
    return from_bf16_ref(h).astype(np.float64)


def _rounded(x):
    """x rounded to bfloat16, as float64 (the bf16 references' operands)."""
    from .bf16 import to_bf16_ref
    return _bf16_values(to_bf16_ref(x))


def attention_forward_bf16_ref(out, att_h, qkv, n_head):
    """numpy reference of attention_forward_bf16: the rounded operands, exact products, the
    probabilities rounded before the value product (att_h gets their bits)."""
    from .bf16 import to_bf16_ref
    att = np.empty(att_h.shape)
    attention_forward_ref(np.empty(out.shape), att, _rounded(qkv), n_head)
    att_h[...] = to_bf16_ref(att.astype(np.float32))
    B, T, C3 = qkv.shape
    v = _heads(_rounded(qkv), n_head)[2]
    p = _bf16_values(att_h).transpose(0, 1, 3, 2)
    out[...] = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)


def attention_backward_bf16_ref(dqkv, dout, qkv, att_h, n_head):
    """numpy reference of attention_backward_bf16 (dz rounded before its two products)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = _heads(_rounded(qkv), n_head)
    p = _bf16_values(att_h).transpose(0, 1, 3, 2)
    dy = _rounded(dout).reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
    dp = dy @ v.transpose(0, 1, 3, 2)
    dv = p.transpose(0, 1, 3, 2) @ dy
    dz = _rounded((p * (dp - (p * dp).sum(axis=-1, keepdims=True)) / math.sqrt(hs)).astype(np.float32))
    dq = dz @ k
    dk = dz.transpose(0, 1, 3, 2) @ q
    for i, g in enumerate((dq, dk, dv)):
        dqkv[:, :, i * C:(i + 1) * C] = g.transpose(0, 2, 1, 3).reshape(B, T, C)
