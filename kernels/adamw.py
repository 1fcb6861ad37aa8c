"""AdamW update over a flat parameter range, and the fixed-order gradient reduction.

Shapes: param, grad, m, v [P] (views of the flat buffers); step is 1-based. Weight decay is
decoupled (Loshchilov & Hutter): param -= lr * wd * param, applied with the Adam step.
"""
import numpy as np

from ._jit import kernel


@kernel
def adamw_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    # scalars are cast to the working dtype once so the loop runs (and vectorizes) in it
    dt = param.dtype.type
    b1, b2 = dt(beta1), dt(beta2)
    c1, c2 = dt(1.0 - beta1), dt(1.0 - beta2)
    inv_bias1 = dt(1.0 / (1.0 - beta1 ** step))
    inv_bias2 = dt(1.0 / (1.0 - beta2 ** step))
    lr_, eps_, wd = dt(lr), dt(eps), dt(weight_decay)
    for i in range(param.size):
        g = grad[i]
        mi = b1 * m[i] + c1 * g
        vi = b2 * v[i] + c2 * g * g
        m[i] = mi
        v[i] = vi
        param[i] -= lr_ * ((mi * inv_bias1) / (np.sqrt(vi * inv_bias2) + eps_) + wd * param[i])


def adamw_update_ref(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    m[:] = beta1 * m + (1.0 - beta1) * grad
    v[:] = beta2 * v + (1.0 - beta2) * grad * grad
    mhat = m / (1.0 - beta1 ** step)
    vhat = v / (1.0 - beta2 ** step)
    param -= lr * (mhat / (np.sqrt(vhat) + eps) + weight_decay * param)


@kernel
def sum_rows_into(out, rows, used, start, stop):
    """out[start:stop] += rows[s, start:stop] for s in used, in that order, element by element.

    Shapes: out [P]; rows [S, P] (one gradient per sphere); used [k] sphere rows. Blocked so a
    block of out stays in cache while the rows stream through it.
    """
    block = 4096
    for a in range(start, stop, block):
        b = min(a + block, stop)
        o = out[a:b]
        for j in range(used.size):
            r = rows[used[j], a:b]
            for i in range(o.size):  # 0-based: lets LLVM drop the negative-index check and vectorize
                o[i] += r[i]


def sum_rows_into_ref(out, rows, used, start, stop):
    for s in used:
        out[start:stop] += rows[s, start:stop]
