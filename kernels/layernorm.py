"""LayerNorm over the last axis: forward, backward, and their numpy references.

Shapes: inp, out, dout, dinp [N, C]; weight, bias [C]; mean, rstd [N] (saved for backward).
The row sums run in vecmath's fixed lane order (row_sum, row_dot): the same bits whether a
kernel is compiled fresh or loaded from the cache, inlined or not.
"""
import numpy as np

from ._jit import inline_kernel, kernel
from .bf16 import bf16_of
from .vecmath import row_dot_centered, row_sum


@inline_kernel
def _row_stats(x, eps):
    """(mean, 1 / std) of one row, in vecmath's fixed summation order. Every scalar stays in the
    working dtype (float32 would otherwise widen to float64 and the row loops not vectorize)."""
    inv_c = x.dtype.type(1.0 / x.shape[0])
    m = row_sum(x) * inv_c
    var = row_dot_centered(x, m, x, m) * inv_c
    return m, x.dtype.type(1.0 / np.sqrt(var + eps))


@kernel
def layernorm_forward(out, mean, rstd, inp, weight, bias, eps):
    N, C = inp.shape
    for n in range(N):
        m, s = _row_stats(inp[n], eps)
        for c in range(C):
            out[n, c] = (inp[n, c] - m) * s * weight[c] + bias[c]
        mean[n] = m
        rstd[n] = s


@kernel
def layernorm_forward_h(out_h, mean, rstd, inp, weight, bias, eps):
    """layernorm_forward for the trainer's bfloat16 products: out_h [N, C] (uint16) receives
    the output rounded to bfloat16 (nearest even), the only form its consumers (the products)
    read; mean and rstd as layernorm_forward's, bit for bit. float32 inp only."""
    N, C = inp.shape
    for n in range(N):
        m, s = _row_stats(inp[n], eps)
        oh, x = out_h[n], inp[n]
        for c in range(C):
            oh[c] = bf16_of((x[c] - m) * s * weight[c] + bias[c])
        mean[n] = m
        rstd[n] = s


@kernel
def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    # Inverts out = norm * weight + bias, norm = (inp - mean) * rstd.
    # dinp accumulates (+=): it is the residual stream's gradient.
    N, C = inp.shape
    zero = inp.dtype.type(0.0)
    inv_c = inp.dtype.type(1.0 / C)
    dnorm_row = np.empty(C, dtype=inp.dtype)
    for n in range(N):
        m = mean[n]
        s = rstd[n]
        for c in range(C):
            dnorm_row[c] = weight[c] * dout[n, c]
        dnorm_mean = row_sum(dnorm_row) * inv_c
        # sum(dnorm * norm), norm = (inp - m) * s: the factor s taken out of the sum
        dnorm_norm_mean = row_dot_centered(dnorm_row, zero, inp[n], m) * s * inv_c
        for c in range(C):
            norm = (inp[n, c] - m) * s
            dnorm = weight[c] * dout[n, c]
            dbias[c] += dout[n, c]
            dweight[c] += norm * dout[n, c]
            dinp[n, c] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s


def layernorm_forward_ref(out, mean, rstd, inp, weight, bias, eps):
    m = inp.mean(axis=1)
    var = ((inp - m[:, None]) ** 2).mean(axis=1)
    s = 1.0 / np.sqrt(var + eps)
    out[:] = (inp - m[:, None]) * s[:, None] * weight + bias
    mean[:] = m
    rstd[:] = s


def layernorm_backward_ref(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    norm = (inp - mean[:, None]) * rstd[:, None]
    dnorm = dout * weight
    dbias += dout.sum(axis=0)
    dweight += (norm * dout).sum(axis=0)
    dinp += (dnorm - dnorm.mean(axis=1, keepdims=True)
             - norm * (dnorm * norm).mean(axis=1, keepdims=True)) * rstd[:, None]
