"""The whole model's forward and backward passes, each one nogil kernel, written once.

A trainer sphere's micro-batch runs in a single call that never returns to Python, so spheres
on different threads do not queue for the GIL between operations. The passes are written
layer by layer from the op kernels of this package (layernorm, linear, attention, gelu,
cross-entropy, embedding), each checked against its numpy reference; the passes themselves
are checked by finite differences and against PyTorch (tests/test_model.py). Without a CBLAS
gemm they run on the naive one (cllmd.kernels.blas).

Shapes: B, T, C, NH, hs = C / NH, V, L; N = B * T. Parameters and gradients: flat buffers
laid out as cllmd.model.param_table; offs locates them: offs[0:4] = wte [V, C], wpe [block, C],
ln_f.weight, ln_f.bias; offs[4 + 12 l + k] = layer l's k-th tensor in table order (LAYER
below). Activations: a Buffers tuple; per-layer activations have a leading axis of L, or of 1
with gradient checkpointing, when a block's activations are recomputed from its input (the
residual stream, always kept per layer) just before its backward. The head and the
cross-entropy run fused, R rows at a time (R = buf.logits.shape[0]), so the [N, V] logits
never exist unless R = N (model_forward, which returns them, needs that); in bfloat16 the
training pass keeps their gradient, rounded, for all N rows (head_loss_h).

Precision: the training passes take flat_h, the weight matrices in bfloat16 (uint16 bits,
[2P]: each matrix at its own offset in [0, P), its transpose at P + offset; bf16_weights fills
it once per step), or an empty array for float32. With it, the blocks run as block_forward_h
/ block_backward_h and the head as head_loss_h: every product of a weight matrix (the blocks'
four and the tied head's) runs in bfloat16 with float32 accumulation (cllmd.kernels.linear),
on inputs its producer wrote in bfloat16 (layer norm, attention, GELU into acts_h; each
gradient rounded with its bias sum in one pass, into h_out); attention's per-head T x T
products run in bfloat16 too (attention_forward_bf16, its softmax kept in bfloat16 in att_h).
The embeddings, layer norm's and the softmax's arithmetic, GELU, the cross-entropy and every
gradient stay float32. Empty flat_h: float32, block_forward / block_backward, as ever.
With flat_h, packed / pack_at may hold the blocks' weight matrices packed as the products'
second operands (pack_weights, once per step: MKL then does not repack a weight for every
sphere's product; the same bits), and flat_h's copies of them are then never read: packed uint16, pack_at [4 L, 2, 2] the (start, stop) in it
of sink matrix m (layer by layer, each layer's four by offset, as cllmd.kernels.ordered) for
the forward (side 0, op(b) = W) and the input gradient (side 1, op(b) = W^T). Empty packed:
the products read flat_h.
"""
from collections import namedtuple

import numpy as np

from ._jit import kernel
from .attention import attention_backward, attention_backward_bf16, attention_forward, attention_forward_bf16
from .blas import gemm
from .crossentropy import crossentropy_backward, crossentropy_forward, crossentropy_forward_backward_h
from .embedding import embedding_backward, embedding_forward
from .gelu import gelu_backward_h, gelu_forward_grad, gelu_forward_grad_h, mul_inplace
from .layernorm import layernorm_backward, layernorm_forward, layernorm_forward_h
from .bf16 import to_bf16
from .blas import gemm_bf16, pack_bf16
from .linear import (gemm_rounding_a, linear_backward, linear_backward_h, linear_forward, linear_forward_h, transpose,
                     weight_grad)
from .ordered import add_zero_in_turn, flush_deferred

LN_EPS = 1e-5
LAYER = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
         "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
         "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")

Buffers = namedtuple("Buffers", [
    "encoded",                          # [N, C] token + position embeddings
    "ln1", "ln1_mean", "ln1_rstd",      # [Lc, N, C], [Lc, N]
    "qkv",                              # [Lc, B, T, 3C]
    "att",                              # [Lc, B, NH, T, T] softmax, transposed (see attention);
                                        # in bfloat16 [1, 1, 1, T, T], float32 scratch of att_h's
    "atty",                             # [Lc, B, T, C] attention output before c_proj
    "residual2",                        # [Lc, N, C] x + attn(ln_1(x))
    "ln2", "ln2_mean", "ln2_rstd",      # [Lc, N, C], [Lc, N]
    "fch", "fch_gelu",                  # [Lc, N, 4C] gelu'(pre-activation), gelu(pre-activation)
    "residual3",                        # [L, N, C] block outputs (the checkpoints)
    "lnf", "lnf_mean", "lnf_rstd",      # [N, C], [N]
    "logits",                           # [R, V] one chunk of R rows of logits, then probabilities, then dlogits
    "losses", "dlosses",                # [N]
    "dresidual", "dtmp",                # [N, C] backward scratch
    "dqkv",                             # [B, T, 3C]
    "dfch",                             # [N, 4C] pre-activation (forward); d fch_gelu, then d pre (backward)
    "empty",                            # [0, C]: "no residual" for linear_forward
    "h_in", "h_out",                    # bfloat16 scratch (uint16): [N 4C] a product's input,
                                        # [max(N 4C, N V)] a gradient operand; [0] for float32
    "att_h",                            # [Lc B NH T T] the softmax in bfloat16 (uint16); [0] for float32
    "acts_h",                           # [Lc N 7C] the products' inputs in bfloat16 (uint16): per
                                        # layer ln1 | atty | ln2 | fch_gelu; [0] for float32
    "dw_tile",                          # [ordered.TILE] a weight gradient's tile on its way into
                                        # node zero's sum (cllmd.kernels.ordered); [0] for float32
    "dw_pack",                          # uint16 scratch its gradient operand is packed into
                                        # (ordered.tile_pack_size of the largest); [0] for float32
])


@kernel
def _vec(flat, off, n):
    return flat[off:off + n]


@kernel
def _mat(flat, off, rows, cols):
    return flat[off:off + rows * cols].reshape((rows, cols))


@kernel
def _h(scratch, rows, cols):
    """The first rows x cols of a bfloat16 scratch buffer, as a matrix ([0, 0] when it is empty)."""
    if scratch.size:
        return scratch[:rows * cols].reshape((rows, cols))
    return scratch[:0].reshape((0, 0))


@kernel
def _att_h(buf, la, n_head):
    """Layer slot la of the bfloat16 softmax, [B, NH, T, T] (bf16 workspaces only)."""
    B, T = buf.qkv.shape[1], buf.qkv.shape[2]
    per = B * n_head * T * T
    return buf.att_h[la * per:(la + 1) * per].reshape((B, n_head, T, T))


@kernel
def _acts_h(buf, la):
    """Layer slot la's products' inputs in bfloat16: ln1 [N, C], atty [N, C], ln2 [N, C],
    fch_gelu [N, 4C] (bf16 workspaces only)."""
    N, C = buf.encoded.shape
    at = la * 7 * N * C
    ln1 = buf.acts_h[at:at + N * C].reshape((N, C))
    atty = buf.acts_h[at + N * C:at + 2 * N * C].reshape((N, C))
    ln2 = buf.acts_h[at + 2 * N * C:at + 3 * N * C].reshape((N, C))
    fch_gelu = buf.acts_h[at + 3 * N * C:at + 7 * N * C].reshape((N, 4 * C))
    return ln1, atty, ln2, fch_gelu


@kernel
def _mat_h(flat_h, off, rows, cols, transposed):
    """A weight [rows, cols] in bfloat16 from flat_h (transposed: its transpose [cols, rows]),
    or an empty one when flat_h is empty (float32)."""
    if flat_h.size == 0:
        return flat_h[:0].reshape((0, 0))
    if transposed:
        at = flat_h.size // 2 + off
        return flat_h[at:at + rows * cols].reshape((cols, rows))
    return flat_h[off:off + rows * cols].reshape((rows, cols))


@kernel
def _mat_p(packed, pack_at, m, side):
    """Sink matrix m packed for side 0 (the forward) or 1 (the input gradient), or an empty
    array when packed is empty."""
    if packed.size == 0:
        return packed[:0]
    return packed[pack_at[m, side, 0]:pack_at[m, side, 1]]


@kernel
def _mat_t(flat_t, off, rows, cols):
    """A transposed weight [rows, cols] in flat_t, or an empty one when flat_t is empty."""
    if flat_t.size:
        return flat_t[off:off + rows * cols].reshape((rows, cols))
    return flat_t[:0].reshape((0, 0))


# ---- one block -----------------------------------------------------------------------------

@kernel
def block_forward(buf, l, x, flat, flat_h, offs, n_head, write_output):
    """Block l on input x [N, C]: fills layer slot l (slot 0 when checkpointing) and, if
    write_output, residual3[l] = x + attn(ln_1(x)) + mlp(ln_2(...)). flat_h: see the module."""
    la = l % buf.ln1.shape[0]
    N, C = x.shape
    o = offs[4 + 12 * l:4 + 12 * (l + 1)]
    W = lambda k, rows, cols: _mat(flat, o[k], rows, cols)           # noqa: E731 - weight k of the layer
    Wht = lambda k, rows, cols: _mat_h(flat_h, o[k], rows, cols, True)  # noqa: E731 - its bf16 transpose
    h = lambda cols: _h(buf.h_in, N, cols)                          # noqa: E731 - a product's bf16 input
    ln1, qkv, atty, res2 = buf.ln1[la], buf.qkv[la], buf.atty[la], buf.residual2[la]
    layernorm_forward(ln1, buf.ln1_mean[la], buf.ln1_rstd[la], x, _vec(flat, o[0], C), _vec(flat, o[1], C), LN_EPS)
    linear_forward(qkv.reshape((N, 3 * C)), ln1, W(2, C, 3 * C), _vec(flat, o[3], 3 * C), buf.empty,
                   Wht(2, C, 3 * C), h(C))
    attention_forward(atty, buf.att[la], qkv, n_head)                            # (B, T, C)
    linear_forward(res2, atty.reshape((N, C)), W(4, C, C), _vec(flat, o[5], C), x, Wht(4, C, C), h(C))  # x + attn
    ln2, fch, fch_gelu = buf.ln2[la], buf.fch[la], buf.fch_gelu[la]
    layernorm_forward(ln2, buf.ln2_mean[la], buf.ln2_rstd[la], res2, _vec(flat, o[6], C), _vec(flat, o[7], C), LN_EPS)
    # the pre-activation goes to the (idle) backward scratch; the layer keeps gelu' of it.
    # Separate buffers: written in place, the aliasing would stop LLVM vectorizing the tanh.
    linear_forward(buf.dfch, ln2, W(8, C, 4 * C), _vec(flat, o[9], 4 * C), buf.empty, Wht(8, C, 4 * C), h(C))  # (N, 4C)
    gelu_forward_grad(fch_gelu, fch, buf.dfch)
    if write_output:
        linear_forward(buf.residual3[l], fch_gelu, W(10, 4 * C, C), _vec(flat, o[11], C), res2,
                       Wht(10, 4 * C, C), h(4 * C))


@kernel
def block_backward(buf, l, x, flat, flat_t, flat_h, offs, grad, n_head):
    """Inverts block l: buf.dresidual holds d residual3[l] on entry and d x on return;
    layer l's gradients are written into grad (LayerNorm ones accumulate, pre-zeroed).
    flat_t: the weight matrices transposed at the same offsets, or empty (see linear);
    flat_h: in bfloat16, or empty (see the module)."""
    la = l % buf.ln1.shape[0]
    N, C = x.shape
    o = offs[4 + 12 * l:4 + 12 * (l + 1)]
    qkv = buf.qkv[la]
    B, T = qkv.shape[0], qkv.shape[1]
    dx, dtmp = buf.dresidual, buf.dtmp
    W = lambda k, rows, cols: _mat(flat, o[k], rows, cols)      # noqa: E731 - weight k of the layer
    Wt = lambda k, rows, cols: _mat_t(flat_t, o[k], cols, rows)  # noqa: E731 - its transpose
    Wh = lambda k, rows, cols: _mat_h(flat_h, o[k], rows, cols, False)  # noqa: E731 - in bfloat16
    dW = lambda k, rows, cols: _mat(grad, o[k], rows, cols)     # noqa: E731 - its gradient
    db = lambda k, n: _vec(grad, o[k], n)                       # noqa: E731
    hi = lambda cols: _h(buf.h_in, N, cols)                     # noqa: E731 - bf16 scratch: the input
    ho = lambda cols: _h(buf.h_out, N, cols)                    # noqa: E731 - and d output
    # res3 = res2 + fch_gelu W_fp + b_fp: dx flows to res2 unchanged (residual)
    linear_backward(buf.dfch, dW(10, 4 * C, C), db(11, C), dx, buf.fch_gelu[la], W(10, 4 * C, C), Wt(10, 4 * C, C),
                    Wh(10, 4 * C, C), hi(4 * C), ho(C))
    mul_inplace(buf.dfch, buf.fch[la])                         # d pre-activation = gelu'(pre) d fch_gelu
    linear_backward(dtmp, dW(8, C, 4 * C), db(9, 4 * C), buf.dfch, buf.ln2[la], W(8, C, 4 * C), Wt(8, C, 4 * C),
                    Wh(8, C, 4 * C), hi(C), ho(4 * C))
    layernorm_backward(dx, db(6, C), db(7, C), dtmp, buf.residual2[la], _vec(flat, o[6], C),
                       buf.ln2_mean[la], buf.ln2_rstd[la])
    # res2 = x + atty W_o + b_o: dx (now d res2) flows to x unchanged
    linear_backward(dtmp, dW(4, C, C), db(5, C), dx, buf.atty[la].reshape((N, C)), W(4, C, C), Wt(4, C, C),
                    Wh(4, C, C), hi(C), ho(C))
    attention_backward(buf.dqkv, dtmp.reshape((B, T, C)), qkv, buf.att[la], n_head)
    linear_backward(dtmp, dW(2, C, 3 * C), db(3, 3 * C), buf.dqkv.reshape((N, 3 * C)), buf.ln1[la],
                    W(2, C, 3 * C), Wt(2, C, 3 * C), Wh(2, C, 3 * C), hi(C), ho(3 * C))
    layernorm_backward(dx, db(0, C), db(1, C), dtmp, x, _vec(flat, o[0], C), buf.ln1_mean[la], buf.ln1_rstd[la])


@kernel
def block_forward_h(buf, l, x, flat, flat_h, packed, pack_at, offs, n_head, write_output):
    """block_forward with bfloat16 products (flat_h not empty): the same math, but each
    product's input is written in bfloat16 by its producer (layer norm, attention, GELU) into
    layer slot l's acts_h, where the backward finds it again, and the float32 activations
    that only products read (ln1, atty, ln2, fch_gelu) are not kept (their buffers hold one
    slot of scratch)."""
    la = l % buf.ln1_mean.shape[0]
    N, C = x.shape
    o = offs[4 + 12 * l:4 + 12 * (l + 1)]
    Wht = lambda k, rows, cols: _mat_h(flat_h, o[k], rows, cols, True)  # noqa: E731 - weight k's bf16 transpose
    b = lambda k, n: _vec(flat, o[k], n)                                  # noqa: E731
    P = lambda j: _mat_p(packed, pack_at, 4 * l + j, 0)                  # noqa: E731 - sink matrix j packed
    ln1_h, atty_h, ln2_h, fch_gelu_h = _acts_h(buf, la)
    qkv, atty, res2 = buf.qkv[la], buf.atty[0], buf.residual2[la]
    layernorm_forward_h(ln1_h, buf.ln1_mean[la], buf.ln1_rstd[la], x, b(0, C), b(1, C), LN_EPS)
    linear_forward_h(qkv.reshape((N, 3 * C)), ln1_h, b(3, 3 * C), buf.empty, Wht(2, C, 3 * C), P(0))
    attention_forward_bf16(atty, _att_h(buf, la, n_head), buf.att[0, 0, 0], qkv,
                           _h(buf.h_in, N, 3 * C).reshape(qkv.shape), n_head)       # (B, T, C)
    to_bf16(atty_h, atty.reshape((N, C)))
    linear_forward_h(res2, atty_h, b(5, C), x, Wht(4, C, C), P(1))                    # x + attn
    layernorm_forward_h(ln2_h, buf.ln2_mean[la], buf.ln2_rstd[la], res2, b(6, C), b(7, C), LN_EPS)
    linear_forward_h(buf.dfch, ln2_h, b(9, 4 * C), buf.empty, Wht(8, C, 4 * C), P(2))  # pre-activation (N, 4C)
    gelu_forward_grad_h(fch_gelu_h, buf.fch[la], buf.dfch)
    if write_output:
        linear_forward_h(buf.residual3[l], fch_gelu_h, b(11, C), res2, Wht(10, 4 * C, C), P(3))


@kernel
def block_backward_h(buf, l, x, flat, flat_h, packed, pack_at, offs, grad, n_head, sink):
    """block_backward with bfloat16 products, after block_forward_h: each gradient that feeds
    products is rounded once, with its bias gradient summed in the same pass. The four weight
    gradients go to sink (cllmd.kernels.ordered: into grad, or added in turn into node zero's
    sum; layer l's matrices are sink matrices 4 l .. 4 l + 3 in offset order)."""
    la = l % buf.ln1_mean.shape[0]
    N, C = x.shape
    o = offs[4 + 12 * l:4 + 12 * (l + 1)]
    qkv = buf.qkv[la]
    B, T = qkv.shape[0], qkv.shape[1]
    dx, dtmp = buf.dresidual, buf.dtmp
    Wh = lambda k, rows, cols: _mat_h(flat_h, o[k], rows, cols, False)  # noqa: E731 - weight k in bfloat16
    db = lambda k, n: _vec(grad, o[k], n)                               # noqa: E731
    ho = lambda cols: _h(buf.h_out, N, cols)                            # noqa: E731 - a gradient in bf16
    P = lambda j: _mat_p(packed, pack_at, 4 * l + j, 1)                 # noqa: E731 - sink matrix j's transpose packed
    ln1_h, atty_h, ln2_h, fch_gelu_h = _acts_h(buf, la)
    tile, tile_p = buf.dw_tile, buf.dw_pack
    # res3 = res2 + fch_gelu W_fp + b_fp: dx flows to res2 unchanged (residual)
    linear_backward_h(buf.dfch, grad, o[10], db(11, C), dx, fch_gelu_h, Wh(10, 4 * C, C), P(3), ho(C), False,
                      sink, 4 * l + 3, tile, tile_p)
    # fch_gelu = gelu(pre): d pre = gelu'(pre) d fch_gelu, rounded, and the c_fc bias gradient
    gelu_backward_h(ho(4 * C), db(9, 4 * C), buf.dfch, buf.fch[la])
    linear_backward_h(dtmp, grad, o[8], db(9, 4 * C), buf.dfch, ln2_h, Wh(8, C, 4 * C), P(2), ho(4 * C), True,
                      sink, 4 * l + 2, tile, tile_p)
    layernorm_backward(dx, db(6, C), db(7, C), dtmp, buf.residual2[la], _vec(flat, o[6], C),
                       buf.ln2_mean[la], buf.ln2_rstd[la])
    # res2 = x + atty W_o + b_o: dx (now d res2) flows to x unchanged
    linear_backward_h(dtmp, grad, o[4], db(5, C), dx, atty_h, Wh(4, C, C), P(1), ho(C), False, sink, 4 * l + 1, tile, tile_p)
    attention_backward_bf16(buf.dqkv, dtmp.reshape((B, T, C)), qkv, _att_h(buf, la, n_head),
                            _h(buf.h_in, N, 3 * C).reshape(qkv.shape), ho(C).reshape((B, T, C)), buf.att[0, 0, 0])
    linear_backward_h(dtmp, grad, o[2], db(3, 3 * C), buf.dqkv.reshape((N, 3 * C)), ln1_h,
                      Wh(2, C, 3 * C), P(0), ho(3 * C), False, sink, 4 * l, tile, tile_p)
    layernorm_backward(dx, db(0, C), db(1, C), dtmp, x, _vec(flat, o[0], C), buf.ln1_mean[la], buf.ln1_rstd[la])


@kernel
def transpose_weights(flat_t, flat, offs, l, n_embd):
    """flat_t gets layer l's four weight matrices transposed, at their offsets in flat; for
    l = n_layer, the token embedding (the tied head's weight) instead."""
    C = n_embd
    if 4 + 12 * l == offs.size:
        V = (offs[1] - offs[0]) // C
        transpose(_mat(flat_t, offs[0], C, V), _mat(flat, offs[0], V, C))
        return
    o = offs[4 + 12 * l:4 + 12 * (l + 1)]
    for k, rows, cols in ((2, C, 3 * C), (4, C, C), (8, C, 4 * C), (10, 4 * C, C)):
        transpose(_mat(flat_t, o[k], cols, rows), _mat(flat, o[k], rows, cols))


@kernel
def bf16_weights(flat_h, flat, offs, l, n_embd):
    """flat_h [2P] gets layer l's four weight matrices rounded to bfloat16 (nearest even) at
    their offsets, and their transposes at P + offset; for l = n_layer, the token embedding."""
    C = n_embd
    if 4 + 12 * l == offs.size:
        V = (offs[1] - offs[0]) // C
        to_bf16(_mat_h(flat_h, offs[0], V, C, False), _mat(flat, offs[0], V, C))
        transpose(_mat_h(flat_h, offs[0], V, C, True), _mat_h(flat_h, offs[0], V, C, False))
        return
    o = offs[4 + 12 * l:4 + 12 * (l + 1)]
    for k, rows, cols in ((2, C, 3 * C), (4, C, C), (8, C, 4 * C), (10, 4 * C, C)):
        to_bf16(_mat_h(flat_h, o[k], rows, cols, False), _mat(flat, o[k], rows, cols))
        transpose(_mat_h(flat_h, o[k], rows, cols, True), _mat_h(flat_h, o[k], rows, cols, False))


@kernel
def pack_weights(packed, pack_at, flat, offs, l, n_embd, rows, scratch):
    """packed gets layer l's four weight matrices rounded to bfloat16 (nearest even, as
    bf16_weights) and packed for products of about `rows` rows (blas.pack_bf16), each for both
    sides (see the module), through scratch (uint16, >= 4 n_embd^2 elements, kept by the
    caller: a fresh one per layer and step would be a fresh mapping, see cllmd/heap.py): flat_h's
    copies of them are not needed then. l = n_layer (the head, whose products read flat_h)
    packs nothing."""
    C = n_embd
    if 4 + 12 * l == offs.size:
        return
    if scratch.size < 4 * C * C:
        raise ValueError("pack_weights: scratch holds fewer than 4 n_embd^2 elements")
    o = offs[4 + 12 * l:4 + 12 * (l + 1)]
    j = 0
    for k, r, c in ((2, C, 3 * C), (4, C, C), (8, C, 4 * C), (10, 4 * C, C)):
        w = scratch[:r * c].reshape((r, c))
        to_bf16(w, _mat(flat, o[k], r, c))
        pack_bf16(_mat_p(packed, pack_at, 4 * l + j, 0), rows, False, w)   # op(b) = W
        pack_bf16(_mat_p(packed, pack_at, 4 * l + j, 1), rows, True, w)    # op(b) = W^T
        j += 1


# ---- the model -----------------------------------------------------------------------------

@kernel
def trunk_forward(buf, idx, flat, flat_h, packed, pack_at, offs, wpe, n_head):
    """Embeddings, the blocks and the final LayerNorm into buf.lnf [N, C]; every activation saved.
    wpe [block, C] is the position table in use (the learned one, plus the clock features)."""
    B, T = idx.shape
    N, C = buf.encoded.shape
    L = buf.residual3.shape[0]
    V = (offs[1] - offs[0]) // C
    embedding_forward(buf.encoded.reshape((B, T, C)), idx, _mat(flat, offs[0], V, C), wpe, 0)
    x = buf.encoded
    for l in range(L):
        if flat_h.size:
            block_forward_h(buf, l, x, flat, flat_h, packed, pack_at, offs, n_head, True)
        else:
            block_forward(buf, l, x, flat, flat_h, offs, n_head, True)
        x = buf.residual3[l]
    layernorm_forward(buf.lnf, buf.lnf_mean, buf.lnf_rstd, x, _vec(flat, offs[2], C), _vec(flat, offs[3], C), LN_EPS)


@kernel
def _head_logits(logits, x, flat, flat_t, flat_h, offs, x_h):
    """logits [R, V] = x [R, C] wte^T (the tied head); a plain product on the transposed copy.
    In bfloat16 (flat_h not empty): x rounded into x_h [R, C], wte's bf16 copy as the NT operand."""
    R, V = logits.shape
    C = x.shape[1]
    if flat_h.size:
        gemm_rounding_a(False, True, 1.0, x, x_h, _mat_h(flat_h, offs[0], V, C, False), 0.0, logits)
    elif flat_t.size:
        gemm(False, False, 1.0, x, _mat(flat_t, offs[0], C, V), 0.0, logits)
    else:
        gemm(False, True, 1.0, x, _mat(flat, offs[0], V, C), 0.0, logits)


@kernel
def model_forward(buf, idx, flat, flat_t, offs, wpe, n_head):
    """Logits into buf.logits [N, V] (a workspace whose head chunk is all N rows); every
    activation saved. flat_t: transposed weights (transposed_weights) or empty. float32."""
    no_h = buf.h_in[:0]
    trunk_forward(buf, idx, flat, no_h, no_h, offs[:0].reshape((0, 2, 2)), offs, wpe, n_head)
    if buf.logits.shape[0] != buf.lnf.shape[0]:
        raise ValueError("model_forward: the workspace's head holds fewer rows than the batch")
    _head_logits(buf.logits, buf.lnf, flat, flat_t, no_h, offs, _h(no_h, 0, 0))


@kernel
def head_loss(buf, targets, mask, flat, flat_t, flat_h, offs, backward, scale, grad):
    """The tied head and the cross-entropy, fused, R rows at a time: per-position losses into
    buf.losses; returns sum(losses * mask) in float64. With backward, also the head's
    gradients: grad's wte (written, = then +=) and d lnf into buf.dtmp, for the loss
    scale * sum(losses * mask). Shapes: targets, mask [N]; a chunk's logits [R, V].
    flat_h: the products in bfloat16 (see the module), or empty."""
    if flat_h.size and backward:
        return head_loss_h(buf, targets, mask, flat_h, offs, scale, grad)
    N, C = buf.lnf.shape
    R, V = buf.logits.shape
    wte = _mat(flat, offs[0], V, C)
    total = 0.0
    for r0 in range(0, N, R):
        r1 = min(r0 + R, N)
        lg, x = buf.logits[:r1 - r0], buf.lnf[r0:r1]
        x_h = _h(buf.h_in, r1 - r0, C)
        _head_logits(lg, x, flat, flat_t, flat_h, offs, x_h)
        crossentropy_forward(lg, buf.losses[r0:r1], lg, targets[r0:r1])               # logits -> probs
        for n in range(r0, r1):
            total += np.float64(buf.losses[n]) * mask[n]
        if backward:
            for n in range(r0, r1):
                buf.dlosses[n] = mask[n] * scale
            crossentropy_backward(lg, lg, targets[r0:r1], buf.dlosses[r0:r1])          # probs -> dlogits
            # logits = lnf wte^T: dwte = dlogits^T lnf over all rows (the embedding adds to it later)
            dwte = _mat(grad, offs[0], V, C)
            if flat_h.size:  # x_h still holds this chunk's x in bfloat16 (from _head_logits)
                lg_h = _h(buf.h_out, r1 - r0, V)
                to_bf16(lg_h, lg)
                gemm_bf16(True, False, 1.0, lg_h, x_h, 0.0 if r0 == 0 else 1.0, dwte)
                gemm_bf16(False, True, 1.0, lg_h, _mat_h(flat_h, offs[0], V, C, True), 0.0, buf.dtmp[r0:r1])
            else:
                if r0 == 0:
                    weight_grad(dwte, lg, x)
                else:
                    gemm(True, False, 1.0, lg, x, 1.0, dwte)
                gemm(False, False, 1.0, lg, wte, 0.0, buf.dtmp[r0:r1])                 # dlnf
    return total


@kernel
def head_loss_h(buf, targets, mask, flat_h, offs, scale, grad):
    """head_loss with backward, in bfloat16: lnf rounded once for all N rows; per chunk of R
    rows the logits product, then the cross-entropy and its gradient in one pass, which keeps
    only the gradient, rounded, for all N rows (h_out holds N V); then each of the head's two
    gradient products runs once over all N rows (not per chunk, which re-read and re-wrote
    the [V, C] gradient of wte for every chunk)."""
    N, C = buf.lnf.shape
    R, V = buf.logits.shape
    x_h = _h(buf.h_in, N, C)
    to_bf16(x_h, buf.lnf)
    dlogits_h = _h(buf.h_out, N, V)
    wte_h = _mat_h(flat_h, offs[0], V, C, False)
    total = 0.0
    for r0 in range(0, N, R):
        r1 = min(r0 + R, N)
        lg = buf.logits[:r1 - r0]
        gemm_bf16(False, True, 1.0, x_h[r0:r1], wte_h, 0.0, lg)                        # logits = lnf wte^T
        for n in range(r0, r1):
            buf.dlosses[n] = mask[n] * scale
        crossentropy_forward_backward_h(dlogits_h[r0:r1], buf.losses[r0:r1], lg, targets[r0:r1], buf.dlosses[r0:r1])
        for n in range(r0, r1):
            total += np.float64(buf.losses[n]) * mask[n]
    # logits = lnf wte^T: dwte = dlogits^T lnf (the embedding adds to it later), dlnf = dlogits wte
    gemm_bf16(True, False, 1.0, dlogits_h, x_h, 0.0, _mat(grad, offs[0], V, C))
    gemm_bf16(False, True, 1.0, dlogits_h, _mat_h(flat_h, offs[0], V, C, True), 0.0, buf.dtmp)
    return total


@kernel
def model_forward_loss(buf, idx, targets, mask, flat, flat_t, flat_h, packed, pack_at, offs, wpe, n_head):
    """Forward and per-position losses into buf.losses; returns sum(losses * mask) in float64.
    Shapes: idx, targets [B, T]; mask [N]. flat_h: bfloat16 products (see the module) or empty;
    packed, pack_at: the blocks' weights packed (see the module) or empty."""
    trunk_forward(buf, idx, flat, flat_h, packed, pack_at, offs, wpe, n_head)
    return head_loss(buf, targets.reshape(-1), mask, flat, flat_t, flat_h, offs, False, 1.0, flat[:0])


@kernel
def model_forward_backward(buf, idx, targets, mask, scale, flat, flat_t, flat_h, packed, pack_at, offs, wpe, n_head,
                           grad, sink):
    """model_forward_loss, then grad = d(scale * sum(losses * mask)) / d(params), written whole
    but for the blocks' weight matrices in bfloat16 when sink adds them to node zero's sum
    (sink: (sum, turns, info, ranges) of cllmd.kernels.ordered; mode ROW writes them into grad;
    float32 ignores it). flat_t: transposed weight matrices (see transpose_weights) or empty;
    flat_h: the weight matrices in bfloat16 (bf16_weights) or empty for float32; packed,
    pack_at: the blocks' packed (pack_weights) or empty. Returns sum(losses * mask) in float64."""
    trunk_forward(buf, idx, flat, flat_h, packed, pack_at, offs, wpe, n_head)
    B, T = idx.shape
    N, C = buf.encoded.shape
    L = buf.residual3.shape[0]
    V = buf.logits.shape[1]
    Lc = buf.ln1_mean.shape[0]
    # gradients that kernels accumulate into (+=) start at zero; gemms write the others whole
    for l in range(L):
        o = offs[4 + 12 * l:4 + 12 * (l + 1)]
        for k in (0, 1, 6, 7):
            grad[o[k]:o[k] + C] = 0.0
    grad[offs[1]:offs[1] + wpe.size] = 0.0
    grad[offs[2]:offs[2] + C] = 0.0
    grad[offs[3]:offs[3] + C] = 0.0
    total = head_loss(buf, targets.reshape(-1), mask, flat, flat_t, flat_h, offs, True, scale, grad)  # dwte, dlnf
    dwte = _mat(grad, offs[0], V, C)
    buf.dresidual[:] = 0.0
    layernorm_backward(buf.dresidual, _vec(grad, offs[2], C), _vec(grad, offs[3], C), buf.dtmp, buf.residual3[L - 1],
                       _vec(flat, offs[2], C), buf.lnf_mean, buf.lnf_rstd)
    for l in range(L - 1, -1, -1):
        x_in = buf.residual3[l - 1] if l else buf.encoded
        if Lc < L and l < L - 1:
            # checkpointing: slot 0 holds layer L-1's activations; recompute layer l's from its
            # saved input (its output, residual3[l], is already kept)
            if flat_h.size:
                block_forward_h(buf, l, x_in, flat, flat_h, packed, pack_at, offs, n_head, False)
            else:
                block_forward(buf, l, x_in, flat, flat_h, offs, n_head, False)
        if flat_h.size:
            block_backward_h(buf, l, x_in, flat, flat_h, packed, pack_at, offs, grad, n_head, sink)
        else:
            block_backward(buf, l, x_in, flat, flat_t, flat_h, offs, grad, n_head)
    embedding_backward(dwte, _mat(grad, offs[1], wpe.shape[0], C), buf.dresidual.reshape((B, T, C)), idx, 0)
    flush_deferred(grad, sink[0], sink[1], sink[2], sink[3])  # what is left waits for the commit
    return total


@kernel
def sink_zero_grads(offs, n_embd, sink):
    """A sphere with no counted position (its gradient all zeros, written into its row): the
    blocks' weight matrices it would have added in turn get +0 in turn (see add_zero_in_turn)."""
    C = n_embd
    L = (offs.size - 4) // 12
    for l in range(L - 1, -1, -1):
        o = offs[4 + 12 * l:4 + 12 * (l + 1)]
        for j, k, size in ((3, 10, 4 * C * C), (2, 8, 4 * C * C), (1, 4, C * C), (0, 2, 3 * C * C)):
            add_zero_in_turn(sink[0], o[k], size, sink[1], sink[2], 4 * l + j)
