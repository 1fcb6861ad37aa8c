"""AdamW update over a flat parameter range, and the fixed-order gradient reduction.

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
def sum_rows_into(out, rows, used, start, stop, overwrite, sumsq):
    """out[start:stop] (= if overwrite, else +=) rows[s, start:stop] for s in used, in that order.

    Element by element, always in the order of used, so the result does not depend on how the
    range is cut. Shapes: out [P]; rows [S, P] (one gradient per sphere); used [k] rows, k >= 1.
    If sumsq is not empty, sumsq[i] = sum of squares (float64) of out's block i for the blocks
    of REDUCE_BLOCK elements in the range (start must then be a multiple of REDUCE_BLOCK):
    partial sums at fixed places, so the global norm is the same however the work is split.
    """
    for a in range(start, stop, REDUCE_BLOCK):
        b = min(a + REDUCE_BLOCK, stop)
        o = out[a:b]
        first = 0
        if overwrite:
            o[:] = rows[used[0], a:b]
            first = 1
        for j in range(first, used.size):
            r = rows[used[j], a:b]
            for i in range(o.size):  # 0-based: lets LLVM drop the negative-index check and vectorize
                o[i] += r[i]
        if sumsq.size:
            sumsq[a // REDUCE_BLOCK] = row_sumsq64(o)


def sum_rows_into_ref(out, rows, used, start, stop, overwrite, sumsq):
    if overwrite:
        out[start:stop] = rows[used[0], start:stop]
        used = used[1:]
    for s in used:
        out[start:stop] += rows[s, start:stop]
    if sumsq.size:
        for a in range(start, stop, REDUCE_BLOCK):
            block = out[a:min(a + REDUCE_BLOCK, stop)].astype(np.float64)
            sumsq[a // REDUCE_BLOCK] = np.dot(block, block)
