"""Affine layer out = inp @ weight + bias (+ residual): forward, backward, numpy references.

Shapes: inp [N, K]; weight [K, M]; weight_t [M, K] (its transpose, or empty [0, 0]); bias [M];
out, residual, dout [N, M]; dinp [N, K].
Mixed precision: given the weight in bfloat16 (weight_h [K, M] in the backward, its transpose
weight_ht [M, K] in the forward: uint16 bits, cllmd.kernels.bf16), the products run on
gemm_bf16 with float32 accumulation and output; inp and dout are rounded to bfloat16 (nearest
even) into the scratch inp_h [N, K] and dout_h [N, M] at the products' inputs. Both products
then take their second operand transposed (a plain "NT" product): MKL's bf16 gemm measured
5-25% faster that way than untransposed at the model's shapes. Empty weight_h / weight_ht
([0, 0]): float32, exactly the products below.
The forward seeds out with bias (+ residual) and lets gemm accumulate onto it (beta = 1), so
the bias and the residual add cost no extra pass over out. The backward writes (=) every
gradient: each weight and bias is used once per pass. An empty residual (shape [0, M])
means none. For small N, dinp = dout weight^T runs ~30% faster as a plain product with a
transposed copy of the weight (gemm packs contiguous rows instead of gathering columns); the
trainer keeps such copies, refreshed from the weights every step.
"""
import numpy as np

from ._jit import kernel
from .bf16 import bf16_of, to_bf16
from .blas import gemm, gemm_bf16, gemm_bf16_packed
from .ordered import weight_grad_h


@kernel
def gemm_rounding_a(trans_a, trans_b, alpha, a, a_h, b_h, beta, c):
    """c = alpha op(a) op(b) + beta c in bfloat16 with float32 accumulation: a float32, rounded
    into a_h (a's shape) first; b_h already bfloat16."""
    to_bf16(a_h, a)
    gemm_bf16(trans_a, trans_b, alpha, a_h, b_h, beta, c)


@kernel
def _seed(out, bias, residual):
    """out = bias (+ residual): the forward's products then accumulate onto it."""
    N, M = out.shape
    if residual.shape[0]:
        for n in range(N):
            o, r = out[n], residual[n]
            for j in range(M):
                o[j] = r[j] + bias[j]
    else:
        for n in range(N):
            out[n, :] = bias


@kernel
def linear_forward(out, inp, weight, bias, residual, weight_ht, inp_h):
    _seed(out, bias, residual)
    if weight_ht.shape[0]:
        gemm_rounding_a(False, True, 1.0, inp, inp_h, weight_ht, 1.0, out)
    else:
        gemm(False, False, 1.0, inp, weight, 1.0, out)


@kernel
def linear_forward_h(out, inp_h, bias, residual, weight_ht, weight_p):
    """linear_forward in bfloat16 on an input already rounded (inp_h [N, K] uint16, written so
    by its producer): out = inp_h weight + bias (+ residual), float32. weight_p: the weight
    packed as the product's second operand (blas.pack_bf16 of weight), read instead of
    weight_ht when not empty (the same bits)."""
    _seed(out, bias, residual)
    if weight_p.size:
        gemm_bf16_packed(False, 1.0, inp_h, weight_p, 1.0, out)
    else:
        gemm_bf16(False, True, 1.0, inp_h, weight_ht, 1.0, out)


@kernel
def weight_grad(dweight, inp, dout):
    """dweight = inp^T dout. Shapes: inp [N, K], dout [N, M], dweight [K, M].

    With few rows (N <= 64, one sphere's sequence), OpenBLAS's packed path spends a third of
    its time zeroing and packing; in tiles of 128 x 64 outputs it takes its small-matrix
    kernel instead, measured 10-25% faster (docs/benchmarks.md). The tiles only regroup
    independent outputs: each element's sum over the N rows runs in the same order either way.
    """
    N = inp.shape[0]
    K, M = dweight.shape
    if N > 64:
        gemm(True, False, 1.0, inp, dout, 0.0, dweight)
        return
    for a in range(0, K, 128):
        b = min(a + 128, K)
        for c in range(0, M, 64):
            d = min(c + 64, M)
            gemm(True, False, 1.0, inp[:, a:b], dout[:, c:d], 0.0, dweight[a:b, c:d])


@kernel
def linear_backward(dinp, dweight, dbias, dout, inp, weight, weight_t, weight_h, inp_h, dout_h):
    # out = inp W + b  ->  dW = inp^T dout,  db = sum over rows of dout,  dinp = dout W^T
    N, M = dout.shape
    if weight_h.shape[0]:
        # bfloat16: inp rounded again as in the forward (the same bits; cheaper than keeping it)
        to_bf16(dout_h, dout)
        to_bf16(inp_h, inp)
        gemm_bf16(True, False, 1.0, inp_h, dout_h, 0.0, dweight)
    else:
        weight_grad(dweight, inp, dout)
    dbias[:] = dout[0]
    for n in range(1, N):
        d = dout[n]
        for j in range(M):
            dbias[j] += d[j]
    if weight_h.shape[0]:
        gemm_bf16(False, True, 1.0, dout_h, weight_h, 0.0, dinp)
    elif weight_t.shape[0]:
        gemm(False, False, 1.0, dout, weight_t, 0.0, dinp)
    else:
        gemm(False, True, 1.0, dout, weight, 0.0, dinp)


@kernel
def round_rows_sum(dout_h, dsum, dout):
    """dout_h = dout rounded to bfloat16 (nearest even), and dsum = the sum of dout's rows
    (float32, rows in order, =), in one pass. dout [N, M] float32, dout_h [N, M] uint16."""
    N, M = dout.shape
    dsum[:] = 0.0
    for n in range(N):
        d, h = dout[n], dout_h[n]
        if n == 0:
            for j in range(M):
                h[j] = bf16_of(d[j])
                dsum[j] = d[j]
        else:
            for j in range(M):
                h[j] = bf16_of(d[j])
                dsum[j] += d[j]


@kernel
def linear_backward_h(dinp, grad, at, dbias, dout, inp_h, weight_h, weight_p, dout_h, rounded, sink, m, tile,
                      tile_p):
    """linear_backward in bfloat16 on the forward's rounded input inp_h [N, K]: dout rounded
    into dout_h [N, M] and dbias summed in one pass, unless rounded (the caller did both, as
    gelu_backward_h does); then dweight = inp_h^T dout_h, at flat offset at of grad or added
    in turn into node zero's sum (cllmd.kernels.ordered.weight_grad_h: sink matrix m, sink =
    (sum, turns, info, ranges), tile, tile_p), and dinp = dout_h weight_h^T (on weight_p, the
    transpose packed, when it is not empty: the same bits)."""
    if not rounded:
        round_rows_sum(dout_h, dbias, dout)
    weight_grad_h(grad, at, inp_h.shape[1], dout_h.shape[1], inp_h, dout_h, sink[0], sink[1], sink[2], sink[3], m,
                  tile, tile_p)
    if weight_p.size:
        gemm_bf16_packed(False, 1.0, dout_h, weight_p, 0.0, dinp)
    else:
        gemm_bf16(False, True, 1.0, dout_h, weight_h, 0.0, dinp)


@kernel
def transpose(out, inp):
    """out = inp.T for 2-D arrays, in 16 x 16 tiles so both sides stay in cache (measured
    ~2-5x faster than 32 x 32 tiles or numpy's strided copy on the model's shapes)."""
    R, S = inp.shape
    for a in range(0, R, 16):
        for b in range(0, S, 16):
            ra, sb = min(a + 16, R) - a, min(b + 16, S) - b
            for j in range(sb):
                o = out[b + j, a:a + ra]
                for i in range(ra):
                    o[i] = inp[a + i, b + j]


def _rounded(x):
    """float64 values of float32 x rounded to bfloat16 (the references' mixed-precision operands)."""
    from .bf16 import from_bf16_ref, to_bf16_ref
    return from_bf16_ref(to_bf16_ref(x)).astype(np.float64)


def linear_forward_ref(out, inp, weight, bias, residual, weight_ht, inp_h):
    if weight_ht.shape[0]:  # the operands as gemm_bf16 sees them, the product exact
        from .bf16 import from_bf16_ref
        out[...] = _rounded(inp) @ from_bf16_ref(weight_ht).astype(np.float64).T + bias
    else:
        out[...] = inp @ weight + bias
    if residual.shape[0]:
        out += residual


def linear_backward_ref(dinp, dweight, dbias, dout, inp, weight, weight_t, weight_h, inp_h, dout_h):
    dbias[...] = dout.sum(axis=0)
    if weight_h.shape[0]:
        from .bf16 import from_bf16_ref
        dweight[...] = _rounded(inp).T @ _rounded(dout)
        dinp[...] = _rounded(dout) @ from_bf16_ref(weight_h).astype(np.float64).T
        return
    dweight[...] = inp.T @ dout
    dinp[...] = dout @ (weight_t if weight_t.shape[0] else weight.T)


def weight_grad_ref(dweight, inp, dout):
    dweight[...] = inp.T @ dout


def transpose_ref(out, inp):
    out[...] = inp.T
