"""int8 weights for inference (q8_0-style groups of 32 with a float16 scale), and their matmul.

A weight W [K, M] (y = x W, GPT-2's layout) is quantized per output m and per group of GROUP
inputs: q = round(W / s), s = max|W| / 127 over the group, rounded to float16 (llama.cpp's
q8_0 stores it so too: 2 bytes per 32 weights, where a float32 scale and an int32 correction
added 8). Activations are quantized the same way per row at run time (float32 scales), and
each group's dot product runs in int32:

    y[n, m] = sum_g  xs[n, g] ws[m, g]  sum_{k in g} xq[n, k] wq[m, k]

On a CPU with AVX-512 VNNI the inner sum is vpdpbusd (64 byte products into 16 int32 lanes in
one instruction). It multiplies unsigned by signed bytes, so the weights are stored offset by
128 (wu = wq + 128) and each group's accumulator starts at -128 sum_k xq[n, k] (xc, computed
once per activation row and group when the row is quantized, shared by every output), which
cancels the offset exactly. LLVM does not emit vpdpbusd from a scalar loop here (measured: it
does not even vectorize the group loop well), so the block product is written as LLVM vector
IR through a numba intrinsic. The layout serves it: 16 output rows interleaved by 4 bytes,
wu [M/16, K/4, 16, 4], so one 64-byte load feeds one vpdpbusd and the 4 activation bytes are a
broadcast. Up to TILE activation rows share each weight load (batches, prompts). Without VNNI
the same integer sums run in a plain numba loop.

Every output element is computed by the same instructions whatever the number of rows N and
however they are tiled: integer sums are exact in any order, and each row's float32 work (one
scale product and one FMA per group, groups in order) is its own. A row's result never
depends on the other rows in the batch (batched decoding is exact).
Shapes: K and M are padded to multiples of GROUP and ROWS (zero weights, zero activations).
"""
from __future__ import annotations

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import kernel
from .vecmath import bits_from_f32, f32_from_bits

GROUP = 32    # inputs per scale (llama.cpp's q8_0)
ROWS = 16     # output rows per block: one AVX-512 register of int32 or float32 lanes
TILE = 4      # activation rows multiplied per load of a block's weights
WIDE = 8      # ... and a decoding batch's rows: one pass over the weights for 8 rows, not two
F16_MAX = 65504.0
# weights are prefetched this many bytes ahead of the loads (into L1). Decoding streams every
# weight from memory once per token; the hardware prefetchers alone left GPT-2 small's products
# at 10.9 GB/s on one core, 11.4-12.6 with this (512 to 16384 bytes ahead tried), 20 -> 22 GB/s
# on two.
PREFETCH = 4096

VNNI = bool(llvm.get_host_cpu_features().get("avx512vnni", False))

# parallel over output blocks: the decode matvec is the one place one sequence uses both
# cores. numba's OpenMP layer is safe to enter from several threads at once.
parallel_kernel = numba.njit(cache=True, nogil=True, error_model="numpy", parallel=True)
# Small products and quantizations keep the GIL: they take microseconds, and a thread that
# releases the GIL dozens of times per token waits for it back behind the daemon's other
# threads each time (measured: int8 decoding of the default model in the daemon).
gil_kernel = numba.njit(cache=True, nogil=False, error_model="numpy")
inline = numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")


def padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Q8Weight:
    """One quantized weight matrix: wu (wq + 128) and ws (float16 bits) in the block layout
    above; K, M unpadded."""

    def __init__(self, w: np.ndarray):
        K, M = w.shape
        self.K, self.M = K, M
        self.Kp, self.Mp = padded(K, GROUP), padded(M, ROWS)
        MB, ng = self.Mp // ROWS, self.Kp // GROUP
        self.wu = np.empty((MB, self.Kp // 4, ROWS, 4), np.uint8)
        self.ws = np.empty((MB, ng, ROWS), np.uint16)
        w = np.asarray(w, dtype=np.float32)
        if w.T.flags.c_contiguous and not w.flags.c_contiguous:   # e.g. the tied head, wte.T
            quantize_weight(self.wu, self.ws, w.T, True)
        else:
            quantize_weight(self.wu, self.ws, np.ascontiguousarray(w), False)
        if (self.ws >= 0x7C00).any():
            raise ValueError(f"int8 weights: a group of this {K} x {M} matrix has |w| > "
                             f"{F16_MAX * 127:.3g} (its scale overflows float16), or is not finite")

    @property
    def nbytes(self) -> int:
        return self.wu.nbytes + self.ws.nbytes

    @property
    def wq(self) -> np.ndarray:
        """The signed int8 values [Mp, Kp] (tests, references)."""
        return (self.wu.transpose(0, 2, 1, 3).reshape(self.Mp, self.Kp).astype(np.int16) - 128).astype(np.int8)

    @property
    def scales(self) -> np.ndarray:
        """The float32 values of the float16 scales [Mp, Kp / GROUP]."""
        return self.ws.view(np.float16).astype(np.float32).transpose(0, 2, 1).reshape(self.Mp, self.Kp // GROUP)

    def dequantized(self) -> np.ndarray:
        """The float32 weight [K, M] these int8 values stand for (tests, accuracy reports)."""
        ng = self.Kp // GROUP
        q = self.wq.astype(np.float32).reshape(self.Mp, ng, GROUP)
        return (q * self.scales[:, :, None]).reshape(self.Mp, self.Kp).T[:self.K, :self.M].copy()


@inline
def f16_round(s):
    """A float32 s >= 0 -> (the float16 nearest it, ties to even, as float32; its bits).
    Beyond float16's range the bits are those of infinity (0x7C00) or above (not finite)."""
    if s < np.float32(2.0 ** -14):     # float16's subnormals: multiples of 2^-24
        q = np.int32(np.rint(s * np.float32(2.0 ** 24)))
        return np.float32(q) * np.float32(2.0 ** -24), np.uint16(q)
    b = bits_from_f32(s)
    b = (b + 0xFFF + ((b >> 13) & 1)) & ~0x1FFF        # round the mantissa to 10 bits
    e = ((b >> 23) & 0xFF) - 127 + 15
    if e >= 31:
        return np.float32(np.inf), np.uint16(0x7C00)
    return f32_from_bits(np.int32(b)), np.uint16((e << 10) | ((b >> 13) & 0x3FF))


@inline
def f32_from_f16(h):
    """float16 bits (finite) -> their float32 value, exactly."""
    e = (np.int32(h) >> 10) & 0x1F
    m = np.int32(h) & 0x3FF
    if e == 0:
        return np.float32(m) * np.float32(2.0 ** -24)
    return f32_from_bits(np.int32(((e - 15 + 127) << 23) | (m << 13)))


@parallel_kernel
def quantize_weight(wu, ws, w, transposed):
    """w [K, M] float32 (transposed: w is given as its transpose [M, K]) -> the block layout
    (padding: zero weights, scale 0). Blocks of 16 outputs in parallel, each gathered once
    along K from whichever layout is contiguous there."""
    K = w.shape[1] if transposed else w.shape[0]
    M = w.shape[0] if transposed else w.shape[1]
    MB, K4, R, _ = wu.shape
    Kp = K4 * 4
    ng = Kp // GROUP
    for mb in prange(MB):
        col = np.zeros((R, Kp), np.float32)
        rows = min(R, M - mb * R)
        if transposed:
            for r in range(rows):
                for k in range(K):
                    col[r, k] = w[mb * R + r, k]
        else:
            for k in range(K):
                for r in range(rows):
                    col[r, k] = w[k, mb * R + r]
        for r in range(R):
            for g in range(ng):
                amax = np.float32(0.0)
                bad = False
                for k in range(g * GROUP, (g + 1) * GROUP):
                    a = abs(col[r, k])
                    bad |= not a <= np.float32(F16_MAX * 127.0)   # too large, or not finite
                    amax = max(amax, a)
                if bad:
                    ws[mb, g, r] = 0xFFFF
                    continue
                s, bits = f16_round(amax / np.float32(127.0))
                ws[mb, g, r] = bits
                inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
                for k in range(g * GROUP, (g + 1) * GROUP):
                    q = np.int32(np.rint(col[r, k] * inv))
                    wu[mb, k // 4, r, k % 4] = min(max(q, -127), 127) + 128


@intrinsic
def _quantize_group(typingctx, x, x_at, xq, q_at, xs, xc, g_at):
    """One full group of GROUP activations x[x_at:] -> xq[q_at:], xs[g_at], xc[g_at], in LLVM
    vector IR (the scalar loop below, which it equals exactly, ran at ~2.5 ns per activation:
    LLVM neither vectorizes its max nor its rint)."""
    sig = types.void(x, x_at, xq, q_at, xs, xc, g_at)

    def codegen(context, builder, signature, args):
        x_, x_at_, xq_, q_at_, xs_, xc_, g_at_ = args
        ty = signature.args
        f32, i32, i8 = ir.FloatType(), ir.IntType(32), ir.IntType(8)
        vf, vi, vb = ir.VectorType(f32, GROUP), ir.VectorType(i32, GROUP), ir.VectorType(i8, GROUP)
        mod = builder.module

        def fn(name, ret, *argtys):
            return cgutils.get_or_insert_function(mod, ir.FunctionType(ret, list(argtys)), name)

        v = builder.load(builder.bitcast(_data_ptr(context, builder, ty[0], x_, x_at_), vf.as_pointer()), align=4)
        amax = builder.call(fn(f"llvm.vector.reduce.fmax.v{GROUP}f32", f32, vf),
                            [builder.call(fn(f"llvm.fabs.v{GROUP}f32", vf, vf), [v])])
        scale = builder.fdiv(amax, ir.Constant(f32, 127.0))
        inv = builder.select(builder.fcmp_ordered(">", scale, ir.Constant(f32, 0.0)),
                             builder.fdiv(ir.Constant(f32, 1.0), scale), ir.Constant(f32, 0.0))
        splat = builder.shuffle_vector(builder.insert_element(ir.Constant(vf, ir.Undefined), inv, ir.Constant(i32, 0)),
                                       ir.Constant(vf, ir.Undefined), ir.Constant(vi, [0] * GROUP))
        q = builder.fptosi(builder.call(fn(f"llvm.rint.v{GROUP}f32", vf, vf), [builder.fmul(v, splat)]), vi)
        q = builder.call(fn(f"llvm.smin.v{GROUP}i32", vi, vi, vi), [q, ir.Constant(vi, [127] * GROUP)])
        q = builder.call(fn(f"llvm.smax.v{GROUP}i32", vi, vi, vi), [q, ir.Constant(vi, [-127] * GROUP)])
        builder.store(builder.trunc(q, vb), builder.bitcast(_data_ptr(context, builder, ty[2], xq_, q_at_),
                                                              vb.as_pointer()), align=1)
        total = builder.call(fn(f"llvm.vector.reduce.add.v{GROUP}i32", i32, vi), [q])
        builder.store(scale, _data_ptr(context, builder, ty[4], xs_, g_at_))
        builder.store(builder.mul(total, ir.Constant(i32, -128)), _data_ptr(context, builder, ty[5], xc_, g_at_))
        return context.get_dummy_value()

    return sig, codegen


@inline
def _quantize_row(xq, xs, xc, x, n):
    K = x.shape[1]
    ng = xq.shape[1] // GROUP
    full = K // GROUP
    fx, fq, fs, fc = x.reshape(-1), xq.reshape(-1), xs.reshape(-1), xc.reshape(-1)
    for g in range(full):
        _quantize_group(fx, n * K + g * GROUP, fq, n * xq.shape[1] + g * GROUP, fs, fc, n * ng + g)
    for g in range(full, ng):           # a last partial group (K not a multiple of GROUP)
        a, b = g * GROUP, min((g + 1) * GROUP, K)
        amax = np.float32(0.0)
        for k in range(a, b):
            amax = max(amax, abs(x[n, k]))
        s = amax / np.float32(127.0)
        inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
        xs[n, g] = s
        total = 0
        for k in range(a, b):
            q = min(max(np.int32(np.rint(x[n, k] * inv)), -127), 127)
            xq[n, k] = q
            total += q
        for k in range(max(a, b), (g + 1) * GROUP):
            xq[n, k] = 0
        xc[n, g] = -128 * total


# (each compiled form its own function: numba's cache keys compiled code by the function's
# name, so two dispatchers of one function would load each other's code)
@parallel_kernel
def _quantize_rows_parallel(xq, xs, xc, x):
    for n in prange(x.shape[0]):
        _quantize_row(xq, xs, xc, x, n)


@gil_kernel
def _quantize_rows_gil(xq, xs, xc, x):
    for n in range(x.shape[0]):
        _quantize_row(xq, xs, xc, x, n)


def quantize_rows(xq, xs, xc, x):
    """Activations x [N, K] -> xq [N, Kp] int8, xs [N, Kp/GROUP] float32 scales, xc [N, Kp/GROUP]
    int32 corrections (-128 times each group's sum of xq); x C-contiguous."""
    (_quantize_rows_parallel if xq.size >= 1 << 16 else _quantize_rows_gil)(xq, xs, xc, x)


def quantized_rows(x):
    """quantize_rows into fresh arrays: (xq, xs, xc)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    N, K = x.shape
    Kp = padded(K, GROUP)
    xq = np.empty((N, Kp), np.int8)
    xs = np.empty((N, Kp // GROUP), np.float32)
    xc = np.empty((N, Kp // GROUP), np.int32)
    quantize_rows(xq, xs, xc, x)
    return xq, xs, xc


def _data_ptr(context, builder, aryty, ary, offset):
    return builder.gep(context.make_array(aryty)(context, builder, ary).data, [offset])


def _block_codegen(nrows):
    """One 16-row block's products with nrows activation rows (vpdpbusd), as LLVM IR: each
    weight vector is loaded once for all nrows; every row's arithmetic is the same as alone
    (its integer sums are exact however they are chained)."""
    chains = 2 if nrows < WIDE else 1

    def codegen(context, builder, signature, args):
        out_, out_at, out_step, xq_, x_at, x_step, xs_, xc_, g_at, g_step, wu_, w_at, ws_, s_at, ng = args
        ty = signature.args
        i32, f32 = ir.IntType(32), ir.FloatType()
        vi, vf, vh = ir.VectorType(i32, ROWS), ir.VectorType(f32, ROWS), ir.VectorType(ir.HalfType(), ROWS)
        lanes0 = ir.Constant(vi, [0] * ROWS)
        mod = builder.module
        dpbusd = cgutils.get_or_insert_function(mod, ir.FunctionType(vi, [vi, vi, vi]), "llvm.x86.avx512.vpdpbusd.512")
        fma = cgutils.get_or_insert_function(mod, ir.FunctionType(vf, [vf, vf, vf]), "llvm.fma.v16f32")
        prefetch = cgutils.get_or_insert_function(mod, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32]), "llvm.prefetch.p0")

        def broadcast(value, vty):
            one = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), lanes0)

        def at(base, step, i):
            return builder.add(base, builder.mul(step, ir.Constant(step.type, i)))

        x4 = [builder.bitcast(_data_ptr(context, builder, ty[3], xq_, at(x_at, x_step, i)), i32.as_pointer())
              for i in range(nrows)]
        sx = [_data_ptr(context, builder, ty[6], xs_, at(g_at, g_step, i)) for i in range(nrows)]
        cx = [_data_ptr(context, builder, ty[7], xc_, at(g_at, g_step, i)) for i in range(nrows)]
        w64 = builder.bitcast(_data_ptr(context, builder, ty[10], wu_, w_at), vi.as_pointer())
        s16 = builder.bitcast(_data_ptr(context, builder, ty[12], ws_, s_at), vh.as_pointer())
        totals = [cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * ROWS)) for _ in range(nrows)]
        chunks = GROUP // 4
        zero = ir.Constant(vi, [0] * ROWS)
        with cgutils.for_range(builder, ng) as loop:
            g = loop.index
            base = builder.mul(g, ir.Constant(g.type, chunks))
            idx = [builder.add(base, ir.Constant(g.type, c)) for c in range(chunks)]
            if PREFETCH:   # each 64-byte line of this group's weights, PREFETCH bytes on
                ahead = builder.bitcast(builder.gep(w64, [builder.add(base, ir.Constant(g.type, PREFETCH // 64))]),
                                        ir.IntType(8).as_pointer())
                for line in range(0, GROUP * ROWS, 64):
                    builder.call(prefetch, [builder.gep(ahead, [ir.Constant(i32, line)]), ir.Constant(i32, 0),
                                            ir.Constant(i32, 3), ir.Constant(i32, 1)])
            wv = [builder.load(builder.gep(w64, [j]), align=1) for j in idx]
            wscale = builder.fpext(builder.load(builder.gep(s16, [g]), align=2), vf)
            for i in range(nrows):
                # two dependency chains per row (vpdpbusd's latency); from 8 rows on, the rows'
                # chains are enough and one each leaves registers for the 8 weight vectors
                accs = [broadcast(builder.load(builder.gep(cx[i], [g])), vi)] + ([zero] if chains == 2 else [])
                for c in range(chunks):
                    xb = broadcast(builder.load(builder.gep(x4[i], [idx[c]]), align=1), vi)
                    accs[c % chains] = builder.call(dpbusd, [accs[c % chains], wv[c], xb])
                acc = builder.add(accs[0], accs[1]) if chains == 2 else accs[0]
                scale = builder.fmul(wscale, broadcast(builder.load(builder.gep(sx[i], [g])), vf))
                builder.store(builder.call(fma, [builder.sitofp(acc, vf), scale, builder.load(totals[i])]),
                              totals[i])
        for i in range(nrows):
            po = builder.bitcast(_data_ptr(context, builder, ty[0], out_, at(out_at, out_step, i)), vf.as_pointer())
            builder.store(builder.load(totals[i]), po, align=4)
        return context.get_dummy_value()
    return codegen


def _block_intrinsic(nrows):
    @intrinsic
    def block(typingctx, out, out_at, out_step, xq, x_at, x_step, xs, xc, g_at, g_step, wu, w_at, ws, s_at, ng):
        """out[out_at + i out_step :+16] for i < nrows = a 16-row block's products with rows i."""
        sig = types.void(out, out_at, out_step, xq, x_at, x_step, xs, xc, g_at, g_step, wu, w_at, ws, s_at, ng)
        return sig, _block_codegen(nrows)
    return block


_block1 = _block_intrinsic(1)
_block_tile = _block_intrinsic(TILE)
_block_wide = _block_intrinsic(WIDE)


def _vnni_body(out, xq, xs, xc, wu, ws, mb):
    N = out.shape[0]
    MB, K4, R, _ = wu.shape
    Kp = K4 * 4
    ng = Kp // GROUP
    Mp = MB * R
    fo, fxq, fxs, fxc = out.reshape(-1), xq.reshape(-1), xs.reshape(-1), xc.reshape(-1)
    fwu, fws = wu.reshape(-1), ws.reshape(-1)
    n = 0
    while n + WIDE <= N:
        _block_wide(fo, n * Mp + mb * R, Mp, fxq, n * Kp, Kp, fxs, fxc, n * ng, ng,
                    fwu, mb * Kp * R, fws, mb * ng * R, ng)
        n += WIDE
    while n + TILE <= N:
        _block_tile(fo, n * Mp + mb * R, Mp, fxq, n * Kp, Kp, fxs, fxc, n * ng, ng,
                    fwu, mb * Kp * R, fws, mb * ng * R, ng)
        n += TILE
    while n < N:
        _block1(fo, n * Mp + mb * R, Mp, fxq, n * Kp, Kp, fxs, fxc, n * ng, ng,
                fwu, mb * Kp * R, fws, mb * ng * R, ng)
        n += 1


_vnni_block_rows = inline(_vnni_body)


@parallel_kernel
def _matmul_vnni(out, xq, xs, xc, wu, ws):
    for mb in prange(wu.shape[0]):
        _vnni_block_rows(out, xq, xs, xc, wu, ws, mb)


@gil_kernel
def _matmul_vnni_serial(out, xq, xs, xc, wu, ws):
    for mb in range(wu.shape[0]):
        _vnni_block_rows(out, xq, xs, xc, wu, ws, mb)


@parallel_kernel
def _matmul_generic(out, xq, xs, xc, wu, ws):
    N = out.shape[0]
    MB, K4, R, _ = wu.shape
    ng = K4 * 4 // GROUP
    for mb in prange(MB):
        acc = np.empty(R, np.int32)
        scale = np.empty(R, np.float32)
        for n in range(N):
            total = np.zeros(R, np.float32)
            for g in range(ng):
                acc[:] = xc[n, g]
                for k4 in range(g * GROUP // 4, (g + 1) * GROUP // 4):
                    for j in range(4):
                        x = np.int32(xq[n, k4 * 4 + j])
                        for r in range(R):
                            acc[r] += x * np.int32(wu[mb, k4, r, j])
                for r in range(R):
                    scale[r] = f32_from_f16(ws[mb, g, r]) * xs[n, g]
                    total[r] += np.float32(acc[r]) * scale[r]
            out[n, mb * R:(mb + 1) * R] = total


# Below this many multiply-adds a product runs on the calling thread: a parallel region costs
# tens of microseconds to open when its threads sleep, and on a loaded machine it waits for
# every thread's turn (measured: the default model's int8 decoding fell from ~6,000 to 16
# tokens/s on 2 busy cores). The bound lies above the default shape's largest product (its
# head, 128 x 4096 = 524,288: that whole model sits in L2, a product takes microseconds) and
# below GPT-2 small's smallest (768 x 768 = 589,824, read from memory every token: 6.3 us on
# 2 threads against 8.3 on one with the weights in cache, ~1.5 us of it the region's cost).
PARALLEL_MIN_MACS = 560_000


def q8_matmul(out, xq, xs, xc, w: Q8Weight) -> None:
    """out [N, Mp] float32 = (dequantized xq, xs) @ (dequantized w); all arrays C-contiguous.

    Each element is computed by the same instructions on one thread or many: exact either way."""
    if not VNNI:
        _matmul_generic(out, xq, xs, xc, w.wu, w.ws)
    elif out.shape[0] * w.Mp * w.Kp >= PARALLEL_MIN_MACS:  # (the GIL is released in here)
        _matmul_vnni(out, xq, xs, xc, w.wu, w.ws)
    else:
        _matmul_vnni_serial(out, xq, xs, xc, w.wu, w.ws)


def _linear_body(out, x, wu, ws, bias):
    """out [N, Mp] = x @ w + bias (columns M.. of the padding: 0), quantizing x first: one call
    per product (decoding steps run dozens per token, so each numpy temporary and call counts)."""
    N, K = x.shape
    MB, K4, R, _ = wu.shape
    M = bias.shape[0]
    xq = np.empty((N, K4 * 4), np.int8)
    xs = np.empty((N, K4 * 4 // GROUP), np.float32)
    xc = np.empty((N, K4 * 4 // GROUP), np.int32)
    for n in range(N):
        _quantize_row(xq, xs, xc, x, n)
    for mb in prange(MB):
        _vnni_block_rows(out, xq, xs, xc, wu, ws, mb)
        for n in range(N):
            for m in range(mb * R, min((mb + 1) * R, M)):
                out[n, m] += bias[m]


_linear_rows = inline(_linear_body)


@parallel_kernel
def _linear_parallel(out, x, wu, ws, bias):
    _linear_rows(out, x, wu, ws, bias)


@gil_kernel
def _linear_serial(out, x, wu, ws, bias):
    _linear_rows(out, x, wu, ws, bias)


def q8_linear(x, w: Q8Weight, bias, out=None) -> np.ndarray:
    """x [N, K] float32 -> x @ w + bias [N, M] through int8: quantize, multiply, add the bias.

    out: a C-contiguous float32 [N, Mp] array to write into (the result is then its first M
    columns, a view): a caller decoding step after step reuses one, where a fresh array of a
    megabyte or more (GPT-2's head, 8 rows) is a fresh mapping per step, its pages faulted in
    on every step (cllmd/heap.py has malloc map such blocks). Without out the result is a new
    C-contiguous [N, M] array.

    A small product runs holding the GIL on the calling thread (decoding steps of small
    models: dozens per token, each a few microseconds); a large one on all threads. Either
    way, each output element comes from the same instructions (exact)."""
    N = x.shape[0]
    full = np.empty((N, w.Mp), np.float32) if out is None else out
    if full.shape != (N, w.Mp) or full.dtype != np.float32 or not full.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(N, w.Mp)}, "
                         f"got {full.dtype} {full.shape}")
    # a small model's products (a row's under the bound: the default shape's) stay on the
    # calling thread for a prompt's rows too: its window slides re-run 64 rows every 64
    # tokens, and on a core another process keeps busy each of that pass's parallel regions
    # waited for its thread (a 300-token stream: 1,674-4,691 tokens/s against 3,860 for 100)
    small = w.Mp * w.Kp < PARALLEL_MIN_MACS
    if not VNNI or (N >= 64 and not small):   # (a prompt: its rows quantized on all threads first)
        xq, xs, xc = quantized_rows(x)
        q8_matmul(full, xq, xs, xc, w)
        full[:, :w.M] += bias
    else:
        x = np.ascontiguousarray(x, dtype=np.float32)
        (_linear_serial if small or N * w.Mp * w.Kp < PARALLEL_MIN_MACS else _linear_parallel)(
            full, x, w.wu, w.ws, bias)
    if w.Mp == w.M:
        return full
    return full[:, :w.M] if out is not None else np.ascontiguousarray(full[:, :w.M])


def quantized_rows_ref(x):
    """numpy reference of quantized_rows (the same float32 operations)."""
    N, K = x.shape
    Kp = padded(K, GROUP)
    xp = np.zeros((N, Kp), np.float32)
    xp[:, :K] = x
    g = xp.reshape(N, Kp // GROUP, GROUP)
    xs = np.abs(g).max(axis=2) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(xs > 0, np.float32(1) / xs, np.float32(0)).astype(np.float32)
    xq = np.clip(np.rint(g * inv[:, :, None]), -127, 127).astype(np.int8)
    return xq.reshape(N, Kp), xs, -128 * xq.astype(np.int32).sum(axis=2)


def q8_matmul_ref(xq, xs, w: Q8Weight) -> np.ndarray:
    """numpy reference of q8_matmul: the same integer group sums in float64, [N, Mp]."""
    N, Kp = xq.shape
    ng = Kp // GROUP
    sums = np.einsum("ngk,mgk->nmg", xq.astype(np.int64).reshape(N, ng, GROUP),
                     w.wq.astype(np.int64).reshape(w.Mp, ng, GROUP)).astype(np.float64)
    return np.einsum("nmg,mg,ng->nm", sums, w.scales.astype(np.float64), xs.astype(np.float64))
