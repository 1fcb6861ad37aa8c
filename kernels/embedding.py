"""Token + position embedding lookup, forward and backward (scatter-add), with numpy references.

Shapes: idx [B, T] int; wte [V, C]; wpe [maxT, C]; out, dout [B, T, C]; pos0 is the position of
column 0 (non-zero when generating with a KV cache).
"""
import numpy as np

from ._jit import kernel


@kernel
def embedding_forward(out, idx, wte, wpe, pos0):
    # numba does not bounds-check: a bad id or position would read outside the tables
    B, T = idx.shape
    V, C = wte.shape
    if pos0 < 0 or pos0 + T > wpe.shape[0]:
        raise IndexError("embedding: positions beyond the position table")
    for b in range(B):
        for t in range(T):
            tok = idx[b, t]
            if tok < 0 or tok >= V:
                raise IndexError("embedding: token id outside [0, vocab_size)")
            for c in range(C):
                out[b, t, c] = wte[tok, c] + wpe[pos0 + t, c]


@kernel
def embedding_backward(dwte, dwpe, dout, idx, pos0):
    # dwte, dwpe accumulate (+=): a token or position used twice gets both gradients
    B, T = idx.shape
    C = dout.shape[2]
    for b in range(B):
        for t in range(T):
            tok = idx[b, t]
            for c in range(C):
                dwte[tok, c] += dout[b, t, c]
                dwpe[pos0 + t, c] += dout[b, t, c]


def embedding_forward_ref(out, idx, wte, wpe, pos0):
    T = idx.shape[1]
    out[...] = wte[idx] + wpe[pos0:pos0 + T]


def embedding_backward_ref(dwte, dwpe, dout, idx, pos0):
    T = idx.shape[1]
    np.add.at(dwte, idx.reshape(-1), dout.reshape(-1, dout.shape[2]))
    dwpe[pos0:pos0 + T] += dout.sum(axis=0)
