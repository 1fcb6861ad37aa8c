"""AdamW update over a flat parameter range, and the ordered commit of a gradient row.

Shapes: param, grad, m, v [P] (views of the flat buffers); step is 1-based. Weight decay is
decoupled (Loshchilov & Hutter): param -= lr * wd * param, applied with the Adam step.
"""
import numpy as np

from ._jit import kernel
from .vecmath import row_sumsq64

REDUCE_BLOCK = 4096  # elements per reduction block: one block of out stays in L1 while rows stream


@kernel
def adamw_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale):
    # g = grad_scale * grad: node zero folds the 1/token-count and the clipping factor in here
    # instead of making two more passes over the gradient. Scalars are cast to the working
    # dtype once so the loop runs (and vectorizes) in it.
    dt = param.dtype.type
    b1, b2 = dt(beta1), dt(beta2)
    c1, c2 = dt(1.0 - beta1), dt(1.0 - beta2)
    inv_bias1 = dt(1.0 / (1.0 - beta1 ** step))
    inv_bias2 = dt(1.0 / (1.0 - beta2 ** step))
    lr_, eps_, wd, gs = dt(lr), dt(eps), dt(weight_decay), dt(grad_scale)
    for i in range(param.size):
        g = grad[i] * gs
        mi = b1 * m[i] + c1 * g
        vi = b2 * v[i] + c2 * g * g
        m[i] = mi
        v[i] = vi
        param[i] -= lr_ * ((mi * inv_bias1) / (np.sqrt(vi * inv_bias2) + eps_) + wd * param[i])


def adamw_update_ref(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale):
    g = grad * grad_scale
    m[:] = beta1 * m + (1.0 - beta1) * g
    v[:] = beta2 * v + (1.0 - beta2) * g * g
    mhat = m / (1.0 - beta1 ** step)
    vhat = v / (1.0 - beta2 ** step)
    param -= lr * (mhat / (np.sqrt(vhat) + eps) + weight_decay * param)


@kernel
def add_row_into(out, row, add, sumsq):
    """out += row when add (element by element); then, if sumsq is not empty, sumsq[i] = the
    sum of squares (float64) of out's block i of REDUCE_BLOCK elements.

    Node zero commits each sphere's gradient row with one call, in sphere order, so every
    element of out receives the rows in that order. The squares are taken per fixed block
    (while it is in cache, in the pass of the last row): partial sums at fixed places, so the
    global norm does not depend on how anything was split. Shapes: out, row [P]; sumsq [ceil(P / REDUCE_BLOCK)] or [0].
    """
    n = out.size
    for a in range(0, n, REDUCE_BLOCK):
        b = min(a + REDUCE_BLOCK, n)
        o = out[a:b]
        if add:
            r = row[a:b]
            for i in range(o.size):  # 0-based: lets LLVM drop the negative-index check and vectorize
                o[i] += r[i]
        if sumsq.size:
            sumsq[a // REDUCE_BLOCK] = row_sumsq64(o)


@kernel
def add_ranges_into(out, row, ranges):
    """out[a:b] += row[a:b] for each (a, b) of ranges [k, 2], element by element (add_row_into's
    addition, on the parts of a row that a sphere did not add into the sum itself)."""
    for r in range(ranges.shape[0]):
        o, w = out[ranges[r, 0]:ranges[r, 1]], row[ranges[r, 0]:ranges[r, 1]]
        for i in range(o.size):
            o[i] += w[i]


def add_row_into_ref(out, row, add, sumsq):
    if add:
        out += row
    if sumsq.size:
        for a in range(0, out.size, REDUCE_BLOCK):
            block = out[a:a + REDUCE_BLOCK].astype(np.float64)
            sumsq[a // REDUCE_BLOCK] = np.dot(block, block)
