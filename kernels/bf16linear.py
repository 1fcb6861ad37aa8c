"""bfloat16 weights for inference: a product whose every row is computed alone, beside its reference.

Shapes: x [N, K] float32 activations, w [K, Mp] bfloat16 bits (uint16, cllmd.kernels.bf16, round
to nearest even; M columns padded with zeros to Mp, a multiple of COLUMNS, bias [Mp] float32,
out [N, Mp] float32:

    out[n, m] = bias[m] + sum_k x[n, k] w[k, m]     (float32, k in order, multiply then add)

Each element is that sequence of float32 operations whatever N is and however the columns are
split among threads, so a decoding step gives every sequence of a batch exactly the values it
gets alone (MKL's gemm_bf16 does not: a row's values change with the number of rows, measured
here). The activations stay float32 (a weight widens to float32 exactly); the weights are read
at half of float32's bytes, which is what decoding one token is bound by. A prompt's pass (many
rows of one sequence) goes through MKL's gemm_bf16 instead (cllmd.generate; AMX where the CPU
has it). LLVM does not vectorize the scalar loop (measured: ~1 GMAC/s), so a block of COLUMNS
columns is written as LLVM vector IR: for each k, load 8 x 16 bfloat16 (256 contiguous bytes),
widen (zero-extend, shift by 16, bitcast), multiply by the broadcast activation, add to 8
registers of float32 accumulators; rows go two at a time, each weight vector widened once for both.
"""
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .bf16 import to_bf16
from .q8 import PARALLEL_MIN_MACS, _data_ptr, gil_kernel, inline, padded, parallel_kernel

LANES = 16     # one AVX-512 register of float32
STRIPS = 8     # registers of accumulators: each weight row's 256 contiguous bytes per step of k
COLUMNS = LANES * STRIPS


def _rows_codegen(R):
    """LLVM IR for R rows at once (rows r at out_at + r Mp, x_at + r K): each weight vector is
    loaded and widened once for the R rows; every element is still its own in-order sum."""
    def codegen(context, builder, signature, args):
        out_, out_at_, Mp_, x_, x_at_, w_, w_at_, K_ = args
        ty = signature.args
        i32, f32 = ir.IntType(32), ir.FloatType()
        vf, vi, vh = ir.VectorType(f32, LANES), ir.VectorType(i32, LANES), ir.VectorType(ir.IntType(16), LANES)
        pos = [builder.bitcast(_data_ptr(context, builder, ty[0], out_, builder.add(out_at_, builder.mul(Mp_, ir.Constant(Mp_.type, r)))),
                               vf.as_pointer()) for r in range(R)]
        pxs = [_data_ptr(context, builder, ty[3], x_, builder.add(x_at_, builder.mul(K_, ir.Constant(K_.type, r))))
               for r in range(R)]
        pw = _data_ptr(context, builder, ty[5], w_, w_at_)
        accs = [[cgutils.alloca_once_value(builder, builder.load(builder.gep(po, [ir.Constant(i32, j)]), align=4))
                 for j in range(STRIPS)] for po in pos]
        sixteen = ir.Constant(vi, [16] * LANES)
        zeros = ir.Constant(vi, [0] * LANES)
        with cgutils.for_range(builder, K_) as loop:
            k = loop.index
            xbs = []
            for px in pxs:
                xk = builder.load(builder.gep(px, [k]))
                xbs.append(builder.shuffle_vector(builder.insert_element(ir.Constant(vf, ir.Undefined), xk, ir.Constant(i32, 0)),
                                                  ir.Constant(vf, ir.Undefined), zeros))
            row = builder.bitcast(builder.gep(pw, [builder.mul(k, ir.Constant(k.type, COLUMNS))]), vh.as_pointer())
            for j in range(STRIPS):
                wv = builder.load(builder.gep(row, [ir.Constant(i32, j)]), align=2)
                wf = builder.bitcast(builder.shl(builder.zext(wv, vi), sixteen), vf)
                for xb, racc in zip(xbs, accs):
                    builder.store(builder.fadd(builder.load(racc[j]), builder.fmul(xb, wf)), racc[j])
        for po, racc in zip(pos, accs):
            for j, acc in enumerate(racc):
                builder.store(builder.load(acc), builder.gep(po, [ir.Constant(i32, j)]), align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _block(typingctx, out, out_at, Mp, x, x_at, w, w_at, K):
    """out[out_at:+COLUMNS] += sum_k x[x_at + k] * w[w_at + k COLUMNS : +COLUMNS] (flat arrays)."""
    return types.void(out, out_at, Mp, x, x_at, w, w_at, K), _rows_codegen(1)


@intrinsic
def _block2(typingctx, out, out_at, Mp, x, x_at, w, w_at, K):
    """_block for two rows at once: out_at and out_at + Mp, x_at and x_at + K."""
    return types.void(out, out_at, Mp, x, x_at, w, w_at, K), _rows_codegen(2)


def _blocks(out, x, w, bias, s):
    N, K = x.shape
    Mp = w.shape[0] * COLUMNS
    fo, fx, fw = out.reshape(-1), x.reshape(-1), w.reshape(-1)
    for n in range(N):
        for j in range(COLUMNS):
            out[n, s * COLUMNS + j] = bias[s * COLUMNS + j]
    for n in range(0, N - 1, 2):
        _block2(fo, n * Mp + s * COLUMNS, Mp, fx, n * K, fw, s * K * COLUMNS, K)
    if N % 2:
        _block(fo, (N - 1) * Mp + s * COLUMNS, Mp, fx, (N - 1) * K, fw, s * K * COLUMNS, K)


_blocks_inline = inline(_blocks)


@parallel_kernel
def _linear_parallel(out, x, w, bias):
    for s in prange(w.shape[0]):
        _blocks_inline(out, x, w, bias, s)


@gil_kernel
def _linear_serial(out, x, w, bias):
    for s in range(w.shape[0]):
        _blocks_inline(out, x, w, bias, s)


class BF16Weight:
    """One weight matrix [K, M] as bfloat16 bits in column blocks, w [Mp/COLUMNS, K, COLUMNS]
    (zero columns past M): a block's weights are contiguous, so the kernel streams them (a
    [K, Mp] layout jumps a whole row, often a page, at every k: measured 3x slower at the
    head's 50257 columns), and each block is a row-major [K, COLUMNS] matrix for MKL's gemm."""

    def __init__(self, w: np.ndarray):
        K, M = w.shape
        self.K, self.M, self.Mp = K, M, padded(M, COLUMNS)
        self.w = np.zeros((self.Mp // COLUMNS, K, COLUMNS), np.uint16)
        w = np.asarray(w, dtype=np.float32)
        for s in range(self.Mp // COLUMNS):
            m0, m1 = s * COLUMNS, min(M, (s + 1) * COLUMNS)
            to_bf16(self.w[s, :, :m1 - m0], w[:, m0:m1])

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def dense(self) -> np.ndarray:
        """The bfloat16 bits as one [K, Mp] matrix (references, tests)."""
        return self.w.transpose(1, 0, 2).reshape(self.K, self.Mp)


def bf16_linear(out, x, w: BF16Weight, bias) -> None:
    """out [N, Mp] = x [N, K] @ w + bias [Mp]; all C-contiguous float32 but w (see above).
    Large products are split among numba's threads by strips (the same values either way)."""
    if x.shape[0] * w.K * w.Mp >= PARALLEL_MIN_MACS:
        _linear_parallel(out, x, w.w, bias)
    else:
        _linear_serial(out, x, w.w, bias)


def bf16_linear_ref(x, w: BF16Weight, bias) -> np.ndarray:
    """numpy reference: the weights decoded exactly, the product in float64, [N, Mp]."""
    from .bf16 import from_bf16_ref
    return x.astype(np.float64) @ from_bf16_ref(w.dense()).astype(np.float64) + bias
