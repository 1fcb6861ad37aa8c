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


@inline_kernel
def head_views(qkv, b, h, hs):
    """Sequence b's query, key and value columns of head h in qkv [B, T, 3C]: (T, hs) views."""
    C = qkv.shape[2] // 3
    return (qkv[b, :, h * hs:(h + 1) * hs], qkv[b, :, C + h * hs:C + (h + 1) * hs],
            qkv[b, :, 2 * C + h * hs:2 * C + (h + 1) * hs])


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
            q, k, v = head_views(qkv, b, h, hs)                      # (T, hs)
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
            q, k, v = head_views(qkv, b, h, hs)
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


CAUSAL_BLOCK = 128  # bfloat16 attention: queries (and keys) in blocks of this many; see below


@inline_kernel
def _causal_softmax_h(a, att, m, tot, block):
    """Causal softmax of the scores a [T keys, T queries] (float32, computed where key block
    <= query block, modified in place) down each column t over s <= t, rounded into att
    (uint16). Row s is touched from its own block's first column lo on: the masked entries of
    the diagonal blocks become -inf, then exactly 0; those left of it are never read. The
    loops index views that start at lo from 0 (numba then knows no index is negative, and
    LLVM vectorizes them: measured 3x faster than indexing from lo)."""
    T = a.shape[0]
    dt = a.dtype.type
    m[:] = -np.inf
    for s in range(T):
        lo = s // block * block
        row, mm = a[s, lo:], m[lo:]
        for t in range(s - lo):
            row[t] = -np.inf
        for t in range(T - lo):
            mm[t] = max(mm[t], row[t])
    tot[:] = 0.0
    for s in range(T):
        lo = s // block * block
        row, mm, tt = a[s, lo:], m[lo:], tot[lo:]
        for t in range(T - lo):
            e = fast_exp(row[t] - mm[t])
            row[t] = e
            tt[t] += e
    for t in range(T):
        tot[t] = dt(1.0) / tot[t]
    for s in range(T):
        lo = s // block * block
        row, ah, tt = a[s, lo:], att[s, lo:], tot[lo:]
        for t in range(T - lo):
            ah[t] = bf16_of(row[t] * tt[t])


@kernel
def attention_forward_bf16(out, att_h, scores, qkv, qkv_h, n_head):
    """attention_forward with bfloat16 products: out [B, T, C] float32; att_h [B, NH, T, T]
    the probabilities in bfloat16 (transposed, as att; defined where s <= t and in the diagonal
    blocks, the only entries the backward reads); scores [T, T] float32 scratch; qkv_h
    [B, T, 3C] receives qkv rounded (nearest even).

    Causal blocks: query block j (CAUSAL_BLOCK queries) attends to keys 0 .. its end, so its
    scores and its value product take only those rows: at T = 1024, 10 of 16 blocks' work
    (56% of the square's at 128-blocks), the products and the softmax alike."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    bs = CAUSAL_BLOCK
    to_bf16(qkv_h.reshape((B * T, C3)), qkv.reshape((B * T, C3)))
    m = np.empty(T, qkv.dtype)
    tot = np.empty(T, qkv.dtype)
    for b in range(B):
        for h in range(n_head):
            q, k, v = head_views(qkv_h, b, h, hs)                    # (T, hs), row stride 3C
            a = att_h[b, h]
            for t0 in range(0, T, bs):                              # scores[s, t] = scale k_s . q_t, s < t1
                t1 = min(t0 + bs, T)
                gemm_bf16(False, True, scale, k[:t1], q[t0:t1], 0.0, scores[:t1, t0:t1])
            _causal_softmax_h(scores, a, m, tot, bs)
            y = out[b, :, h * hs:(h + 1) * hs]
            for t0 in range(0, T, bs):                              # y_t = sum_{s <= t} att[s, t] v_s
                t1 = min(t0 + bs, T)
                gemm_bf16(True, False, 1.0, a[:t1, t0:t1], v[:t1], 0.0, y[t0:t1])


@kernel
def attention_backward_bf16(dqkv, dout, qkv, att_h, qkv_h, dout_h, d):
    """attention_backward with bfloat16 products, after attention_forward_bf16: att_h its
    probabilities; qkv_h [B, T, 3C] and dout_h [B, T, C] receive qkv and dout rounded; d
    [T, T] float32 scratch. dqkv is written whole. The same causal blocks as the forward:
    products by query block read keys up to the block's end, by key block queries from the
    block's start."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    n_head = att_h.shape[1]
    hs = C // n_head
    scale = np.float32(1.0 / math.sqrt(hs))
    bs = CAUSAL_BLOCK
    to_bf16(qkv_h.reshape((B * T, C3)), qkv.reshape((B * T, C3)))
    to_bf16(dout_h.reshape((B * T, C)), dout.reshape((B * T, C)))
    d_h = np.empty((T, T), np.uint16)  # dz^T rounded, the operand of the last two products
    w = np.empty(T, np.float32)
    for b in range(B):
        for h in range(n_head):
            q, k, v = head_views(qkv_h, b, h, hs)
            dy = dout_h[b, :, h * hs:(h + 1) * hs]
            dq = dqkv[b, :, h * hs:(h + 1) * hs]
            dk = dqkv[b, :, C + h * hs:C + (h + 1) * hs]
            dv = dqkv[b, :, 2 * C + h * hs:2 * C + (h + 1) * hs]
            a = att_h[b, h]
            for t0 in range(0, T, bs):
                t1 = min(t0 + bs, T)
                gemm_bf16(False, True, 1.0, v[:t1], dy[t0:t1], 0.0, d[:t1, t0:t1])   # d[s, t] = v_s . dy_t
                gemm_bf16(False, False, 1.0, a[t0:t1, t0:], dy[t0:], 0.0, dv[t0:t1])  # dv_s = sum_t att[s, t] dy_t
            w[:] = 0.0
            for s in range(T):  # from each row's block on, by 0-based views (see _causal_softmax_h)
                lo = s // bs * bs
                row, ds, ww = a[s, lo:], d[s, lo:], w[lo:]
                for t in range(T - lo):
                    ww[t] += f32_of(row[t]) * ds[t]
            for s in range(T):
                lo = s // bs * bs
                row, ds, dh, ww = a[s, lo:], d[s, lo:], d_h[s, lo:], w[lo:]
                for t in range(T - lo):
                    dh[t] = bf16_of(scale * f32_of(row[t]) * (ds[t] - ww[t]))
            for t0 in range(0, T, bs):
                t1 = min(t0 + bs, T)
                gemm_bf16(True, False, 1.0, d_h[:t1, t0:t1], k[:t1], 0.0, dq[t0:t1])   # dq_t = sum_s dz[t, s] k_s
                gemm_bf16(False, False, 1.0, d_h[t0:t1, t0:], q[t0:], 0.0, dk[t0:t1])  # dk_s = sum_t dz[t, s] q_t


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


def _causal_values(att_h):
    """float64 values of att_h where a key s <= query t, 0 elsewhere (entries never read)."""
    T = att_h.shape[-1]
    return np.where(np.triu(np.ones((T, T), dtype=bool)), _bf16_values(att_h), 0.0)


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
    p = _causal_values(att_h).transpose(0, 1, 3, 2)
    out[...] = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)


def attention_backward_bf16_ref(dqkv, dout, qkv, att_h, n_head):
    """numpy reference of attention_backward_bf16 (dz rounded before its two products)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = _heads(_rounded(qkv), n_head)
    p = _causal_values(att_h).transpose(0, 1, 3, 2)
    dy = _rounded(dout).reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
    dp = dy @ v.transpose(0, 1, 3, 2)
    dv = p.transpose(0, 1, 3, 2) @ dy
    dz = _rounded((p * (dp - (p * dp).sum(axis=-1, keepdims=True)) / math.sqrt(hs)).astype(np.float32))
    dq = dz @ k
    dk = dz.transpose(0, 1, 3, 2) @ q
    for i, g in enumerate((dq, dk, dv)):
        dqkv[:, :, i * C:(i + 1) * C] = g.transpose(0, 2, 1, 3).reshape(B, T, C)
