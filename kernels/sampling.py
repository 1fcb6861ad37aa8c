"""Choosing the next token from logits: the rows of a decoding step in one call, and the numpy reference.

Shapes: logits [S, V] float32 (one row per sequence); per row its options (temperature, top_k,
top_p, min_p, repeat_penalty), its recent tokens recent[offsets[s]:offsets[s+1]] (the window
the repetition penalty looks at) and one uniform draw u[s] in [0, 1) from the sequence's own
random generator (unused when greedy). Every row is computed alone, in float64 (the exponentials
in float32, by vecmath's exp), in the order below, so a sequence gets the same token whatever
else is in the batch:

    repetition penalty (positive logits / p, negative ones * p, each recent id once)
    temperature 0: argmax (the first of ties)
    / temperature; top_k: drop logits below the k-th largest
    softmax; top_p: keep the smallest prefix, by descending probability (ties in id order),
    whose mass reaches top_p; min_p: drop probabilities below min_p * the largest
    renormalize; the token is the first id whose cumulative probability exceeds u * the total
    (numpy's Generator.choice(p=...) with its one rng.random() draw)
"""
import numba
import numpy as np
from numba import prange

from ._jit import inline_kernel, kernel
from .vecmath import exp_f32, exp_f32_ref


def sample_rows(tokens, logits, temperature, top_k, top_p, min_p, repeat_penalty, recent, offsets, u,
                vocab=None, scratch=None):
    """tokens[s] = row s's next token, from the first vocab columns of logits [S, >= vocab]
    (default: all; a C-contiguous buffer wider than the vocabulary, such as the int8 head's
    padded logits, is read in place). A batch's rows are shared among the threads (at GPT-2's
    vocabulary a row takes ~0.2 ms); every row runs the same code either way (no fast-math:
    the compiled loops compute the same values in both), so it samples what it would alone.

    scratch: sampling_scratch(>= S, >= vocab), kept by a caller that samples step after step
    (at GPT-2's vocabulary a row's work arrays are 850 KB, freed and faulted in again on every
    step otherwise); without it they are allocated here."""
    V = logits.shape[1] if vocab is None else int(vocab)
    if not 0 < V <= logits.shape[1]:
        raise ValueError(f"vocab must be from 1 to the logits' {logits.shape[1]} columns, got {vocab}")
    if scratch is None:
        scratch = sampling_scratch(logits.shape[0], V)
    xs, ps, seen = scratch
    if xs.shape[0] < logits.shape[0] or xs.shape[1] < V:
        raise ValueError(f"scratch of {xs.shape} is too small for {logits.shape[0]} rows of {V}")
    args = (tokens, logits, temperature, top_k, top_p, min_p, repeat_penalty, recent, offsets, u, V, xs, ps, seen)
    if logits.shape[0] > 1 and logits.shape[0] * V >= 1 << 16:   # (the columns sampled, not the buffer's)
        _sample_rows_parallel(*args)
    else:
        _sample_rows_serial(*args)


def sampling_scratch(rows: int, vocab: int) -> tuple:
    """Work arrays for sample_rows: per row the scaled logits, the probabilities (float64) and
    the repeat penalty's marks (all False between calls)."""
    return (np.empty((rows, vocab), np.float64), np.empty((rows, vocab), np.float64),
            np.zeros((rows, vocab), np.bool_))


@kernel
def _sample_rows_serial(tokens, logits, temperature, top_k, top_p, min_p, repeat_penalty, recent, offsets, u, V,
                        xs, ps, seen):
    for s in range(logits.shape[0]):
        _sample_row(tokens, logits, temperature, top_k, top_p, min_p, repeat_penalty, recent, offsets, u, V,
                    xs[s, :V], ps[s, :V], seen[s, :V], s)


@numba.njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def _sample_rows_parallel(tokens, logits, temperature, top_k, top_p, min_p, repeat_penalty, recent, offsets, u, V,
                          xs, ps, seen):
    for s in prange(logits.shape[0]):
        _sample_row(tokens, logits, temperature, top_k, top_p, min_p, repeat_penalty, recent, offsets, u, V,
                    xs[s, :V], ps[s, :V], seen[s, :V], s)


@inline_kernel
def _sample_row(tokens, logits, temperature, top_k, top_p, min_p, repeat_penalty, recent, offsets, u, V,
                x, probs, seen, s):
    for i in range(V):
        x[i] = logits[s, i]
    pen = repeat_penalty[s]
    if pen != 1.0:
        a, b = offsets[s], offsets[s + 1]
        for j in range(a, b):
            t = recent[j]
            if 0 <= t < V and not seen[t]:
                seen[t] = True
                x[t] = x[t] / pen if x[t] > 0 else x[t] * pen
        for j in range(a, b):
            t = recent[j]
            if 0 <= t < V:
                seen[t] = False
    if temperature[s] == 0.0:
        tokens[s] = np.argmax(x)
        return
    for i in range(V):
        x[i] /= temperature[s]
    k = top_k[s]
    if k > 0 and k < V:
        kth = np.partition(x, V - k)[V - k]
        for i in range(V):
            if x[i] < kth:
                x[i] = -np.inf
    top = np.max(x)
    for i in range(V):
        probs[i] = exp_f32(np.float32(x[i] - top))   # vectorizes; libm's float64 exp does not
    total = 0.0
    for i in range(V):
        total += probs[i]
    for i in range(V):
        probs[i] /= total
    if top_p[s] < 1.0:
        order = np.argsort(-probs, kind="mergesort")   # stable: ties in id order
        cumulative = 0.0
        keep = V
        for j in range(V):
            cumulative += probs[order[j]]
            if cumulative >= top_p[s]:
                keep = j + 1
                break
        for j in range(keep, V):
            probs[order[j]] = 0.0
    if min_p[s] > 0.0:
        floor = min_p[s] * np.max(probs)
        for i in range(V):
            if probs[i] < floor:
                probs[i] = 0.0
    total = 0.0
    for i in range(V):
        total += probs[i]
    target = u[s] * total
    cumulative = 0.0
    choice = V - 1
    for i in range(V):
        cumulative += probs[i]
        if cumulative > target:
            choice = i
            break
    while probs[choice] == 0.0 and choice > 0:  # rounding at the very end: the last kept id
        choice -= 1
    tokens[s] = choice


def sample_row_ref(logits, temperature, top_k, top_p, min_p, repeat_penalty, recent, u) -> int:
    """numpy reference for one row (recent: the ids the penalty looks at, u: the uniform draw)."""
    x = np.asarray(logits, np.float64).copy()
    if repeat_penalty != 1.0 and len(recent):
        ids = np.unique(np.asarray(recent, np.int64))
        ids = ids[(ids >= 0) & (ids < x.size)]
        x[ids] = np.where(x[ids] > 0, x[ids] / repeat_penalty, x[ids] * repeat_penalty)
    if temperature == 0:
        return int(np.argmax(x))
    x /= temperature
    if top_k and top_k < x.size:
        x[x < np.partition(x, x.size - top_k)[x.size - top_k]] = -np.inf
    probs = exp_f32_ref((x - x.max()).astype(np.float32)).astype(np.float64)
    probs /= np.cumsum(probs)[-1]
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        keep = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1  # smallest prefix reaching top_p
        probs[order[keep:]] = 0.0
    if min_p > 0.0:
        probs[probs < min_p * probs.max()] = 0.0
    cdf = np.cumsum(probs)
    choice = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), x.size - 1)
    while probs[choice] == 0.0 and choice > 0:
        choice -= 1
    return choice
