"""Softmax cross-entropy over logits, forward (losses and probabilities) and backward.

Shapes: logits, probs, dlogits [N, V]; targets [N] int; losses [N]; dlosses [N] is the weight
of each position's loss in the scalar being differentiated (1/count for a mean, 0 where masked).
probs may alias logits: the forward overwrites each row in place.
"""
import numpy as np

from ._jit import kernel
from .bf16 import bf16_of
from .vecmath import fast_exp, row_max, row_sum


@kernel
def crossentropy_forward(probs, losses, logits, targets):
    # losses[n] = -log softmax(logits[n])[targets[n]] = log(sum_j e^(l_j - max)) - (l_y - max):
    # never the log of a tiny probability; shifting by the row max keeps every e^ in (0, 1].
    # The exponentials go to a scratch row first: written in place (probs is logits in the
    # model) the aliasing would keep LLVM from vectorizing them.
    N, V = logits.shape
    e = np.empty(V, logits.dtype)
    for n in range(N):
        if targets[n] < 0 or targets[n] >= V:  # numba does not bounds-check
            raise IndexError("cross-entropy: target id outside [0, vocab_size)")
        row, p = logits[n], probs[n]
        maxval = row_max(row)
        losses[n] = maxval - row[targets[n]]  # read before p (maybe the same row) is written
        for j in range(V):
            e[j] = fast_exp(row[j] - maxval)
        total = row_sum(e)
        inv = probs.dtype.type(1.0) / total
        for j in range(V):
            p[j] = e[j] * inv
        losses[n] += np.log(total)


@kernel
def crossentropy_backward(dlogits, probs, targets, dlosses):
    # loss_n = -log p[n, y_n]  ->  dlogits[n, j] = dlosses[n] * (p[n, j] - [j == y_n]); dlogits may alias probs
    N, V = probs.shape
    for n in range(N):
        if targets[n] < 0 or targets[n] >= V:  # numba does not bounds-check
            raise IndexError("cross-entropy: target id outside [0, vocab_size)")
        w = dlosses[n]
        d, p = dlogits[n], probs[n]
        for j in range(V):
            d[j] = p[j] * w
        d[targets[n]] -= w


@kernel
def crossentropy_forward_backward_h(dlogits_h, losses, logits, targets, dlosses):
    """crossentropy_forward and crossentropy_backward in one pass per row, for the trainer's
    bfloat16 head: losses [N], and dlogits rounded to bfloat16 (nearest even) into dlogits_h
    [N, V] (uint16), the only form its consumers (the head's gradient products) read; the
    probabilities are never stored. Each value is the same float32 arithmetic as the two
    kernels': p = e / sum, d = p dlosses[n], d[y] -= dlosses[n]."""
    N, V = logits.shape
    e = np.empty(V, logits.dtype)
    for n in range(N):
        y = targets[n]
        if y < 0 or y >= V:  # numba does not bounds-check
            raise IndexError("cross-entropy: target id outside [0, vocab_size)")
        row, h = logits[n], dlogits_h[n]
        maxval = row_max(row)
        losses[n] = maxval - row[y]
        for j in range(V):
            e[j] = fast_exp(row[j] - maxval)
        total = row_sum(e)
        inv = logits.dtype.type(1.0) / total
        w = dlosses[n]
        for j in range(V):
            h[j] = bf16_of(e[j] * inv * w)
        h[y] = bf16_of(e[y] * inv * w - w)
        losses[n] += np.log(total)


def crossentropy_forward_ref(probs, losses, logits, targets):
    shifted = logits - logits.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(shifted).sum(axis=1))
    losses[:] = logsumexp - shifted[np.arange(len(targets)), targets]
    probs[...] = np.exp(shifted - logsumexp[:, None])


def crossentropy_backward_ref(dlogits, probs, targets, dlosses):
    d = probs * dlosses[:, None]
    d[np.arange(len(targets)), targets] -= dlosses
    dlogits[...] = d
