"""int8 weights for inference (q8_0-style groups of 32 with a float32 scale), and their matmul.

A weight W [K, M] (y = x W, GPT-2's layout) is quantized per output m and per group of GROUP
inputs: q = round(W / s), s = max|W| / 127 over the group. Activations are quantized the same
way per row at run time, and each group's dot product runs in int32:

    y[n, m] = sum_g  xs[n, g] ws[m, g]  sum_{k in g} xq[n, k] wq[m, k]

On a CPU with AVX-512 VNNI the inner sum is vpdpbusd (64 byte products into 16 int32 lanes in
one instruction). It multiplies unsigned by signed bytes, so activations are stored offset by
128 (xu = xq + 128) and each group's accumulator starts at -128 sum_k wq[m, k] (wc), which
cancels the offset exactly. LLVM does not emit vpdpbusd from a scalar loop here (measured: it
does not even vectorize the group loop well), so the 16-row block product is written as LLVM
vector IR through a numba intrinsic. The layout serves it: 16 output rows interleaved by 4
bytes, wq [M/16, K/4, 16, 4], so one 64-byte load feeds one vpdpbusd and the 4 activation bytes
are a broadcast. Without VNNI the same integer sums run in a plain numba loop.

Every output element is computed by the same instructions whatever the number of rows N:
a row's result never depends on the other rows in the batch (batched decoding is exact).
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

GROUP = 32    # inputs per scale (llama.cpp's q8_0)
ROWS = 16     # output rows per block: one AVX-512 register of int32 or float32 lanes

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
    """One quantized weight matrix: wq, wc, ws in the block layout above; K, M unpadded."""

    def __init__(self, w: np.ndarray):
        K, M = w.shape
        self.K, self.M = K, M
        self.Kp, self.Mp = padded(K, GROUP), padded(M, ROWS)
        MB, ng = self.Mp // ROWS, self.Kp // GROUP
        self.wq = np.empty((MB, self.Kp // 4, ROWS, 4), np.int8)
        self.wc = np.empty((MB, ng, ROWS), np.int32)
        self.ws = np.empty((MB, ng, ROWS), np.float32)
        w = np.asarray(w, dtype=np.float32)
        if w.T.flags.c_contiguous and not w.flags.c_contiguous:   # e.g. the tied head, wte.T
            quantize_weight(self.wq, self.wc, self.ws, w.T, True)
        else:
            quantize_weight(self.wq, self.wc, self.ws, np.ascontiguousarray(w), False)

    @property
    def nbytes(self) -> int:
        return self.wq.nbytes + self.wc.nbytes + self.ws.nbytes

    def dequantized(self) -> np.ndarray:
        """The float32 weight [K, M] these int8 values stand for (tests, accuracy reports)."""
        MB, ng = self.Mp // ROWS, self.Kp // GROUP
        q = self.wq.transpose(0, 2, 1, 3).reshape(self.Mp, self.Kp).astype(np.float32)
        s = self.ws.transpose(0, 2, 1).reshape(self.Mp, ng)
        return (q.reshape(self.Mp, ng, GROUP) * s[:, :, None]).reshape(self.Mp, self.Kp).T[:self.K, :self.M].copy()


@parallel_kernel
def quantize_weight(wq, wc, ws, w, transposed):
    """w [K, M] float32 (transposed: w is given as its transpose [M, K]) -> the block layout
    (padding: zero weights, scale 0). Blocks of 16 outputs in parallel, each gathered once
    along K from whichever layout is contiguous there."""
    K = w.shape[1] if transposed else w.shape[0]
    M = w.shape[0] if transposed else w.shape[1]
    MB, K4, R, _ = wq.shape
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
                for k in range(g * GROUP, (g + 1) * GROUP):
                    amax = max(amax, abs(col[r, k]))
                s = amax / np.float32(127.0)
                inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
                total = 0
                for k in range(g * GROUP, (g + 1) * GROUP):
                    q = np.int32(np.rint(col[r, k] * inv))
                    q = min(max(q, -127), 127)
                    wq[mb, k // 4, r, k % 4] = q
                    total += q
                wc[mb, g, r] = -128 * total
                ws[mb, g, r] = s


@inline
def _quantize_rows(xu, xs, x):
    N, K = x.shape
    Kp = xu.shape[1]
    for n in range(N):
        for g in range(Kp // GROUP):
            a, b = g * GROUP, min((g + 1) * GROUP, K)
            amax = np.float32(0.0)
            for k in range(a, b):
                amax = max(amax, abs(x[n, k]))
            s = amax / np.float32(127.0)
            inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
            xs[n, g] = s
            for k in range(a, b):
                xu[n, k] = np.uint8(np.int32(np.rint(x[n, k] * inv)) + 128)
            for k in range(max(a, b), (g + 1) * GROUP):
                xu[n, k] = np.uint8(128)


@kernel
def _quantize_rows_nogil(xu, xs, x):
    _quantize_rows(xu, xs, x)


@gil_kernel
def _quantize_rows_gil(xu, xs, x):
    _quantize_rows(xu, xs, x)


def quantize_rows(xu, xs, x):
    """Activations x [N, K] -> xu [N, Kp] uint8 (q + 128), xs [N, Kp/GROUP] float32 scales."""
    (_quantize_rows_nogil if xu.size >= 1 << 16 else _quantize_rows_gil)(xu, xs, x)


def _data_ptr(context, builder, aryty, ary, offset):
    return builder.gep(context.make_array(aryty)(context, builder, ary).data, [offset])


@intrinsic
def _block_vnni(typingctx, out, out_at, xu, xu_at, xs, xs_at, wq, wq_at, wc, ws, s_at, ngroups):
    """out[out_at:out_at+16] = one 16-row block's products with one activation row (vpdpbusd)."""
    sig = types.void(out, out_at, xu, xu_at, xs, xs_at, wq, wq_at, wc, ws, s_at, ngroups)

    def codegen(context, builder, signature, args):
        out_, out_at_, xu_, xu_at_, xs_, xs_at_, wq_, wq_at_, wc_, ws_, s_at_, ng_ = args
        ty = signature.args
        i32, f32 = ir.IntType(32), ir.FloatType()
        vi, vf = ir.VectorType(i32, ROWS), ir.VectorType(f32, ROWS)
        lanes0 = ir.Constant(vi, [0] * ROWS)
        mod = builder.module
        dpbusd = cgutils.get_or_insert_function(mod, ir.FunctionType(vi, [vi, vi, vi]), "llvm.x86.avx512.vpdpbusd.512")
        fma = cgutils.get_or_insert_function(mod, ir.FunctionType(vf, [vf, vf, vf]), "llvm.fma.v16f32")

        def broadcast(value, vty):
            one = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), lanes0)

        x4 = builder.bitcast(_data_ptr(context, builder, ty[2], xu_, xu_at_), i32.as_pointer())
        sx = _data_ptr(context, builder, ty[4], xs_, xs_at_)
        w64 = builder.bitcast(_data_ptr(context, builder, ty[6], wq_, wq_at_), vi.as_pointer())
        c16 = builder.bitcast(_data_ptr(context, builder, ty[8], wc_, s_at_), vi.as_pointer())
        s16 = builder.bitcast(_data_ptr(context, builder, ty[9], ws_, s_at_), vf.as_pointer())
        total = cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * ROWS))
        chunks = GROUP // 4
        with cgutils.for_range(builder, ng_) as loop:
            g = loop.index
            base = builder.mul(g, ir.Constant(g.type, chunks))
            acc = builder.load(builder.gep(c16, [g]), align=4)
            for c in range(chunks):
                at = builder.add(base, ir.Constant(g.type, c))
                xb = broadcast(builder.load(builder.gep(x4, [at]), align=1), vi)
                acc = builder.call(dpbusd, [acc, xb, builder.load(builder.gep(w64, [at]), align=1)])
            scale = builder.fmul(builder.load(builder.gep(s16, [g]), align=4), broadcast(builder.load(builder.gep(sx, [g])), vf))
            builder.store(builder.call(fma, [builder.sitofp(acc, vf), scale, builder.load(total)]), total)
        po = builder.bitcast(_data_ptr(context, builder, ty[0], out_, out_at_), vf.as_pointer())
        builder.store(builder.load(total), po, align=4)
        return context.get_dummy_value()

    return sig, codegen


def _vnni_body(out, xu, xs, wq, wc, ws, mb):
    N = out.shape[0]
    MB, K4, R, _ = wq.shape
    ng = K4 * 4 // GROUP
    fo, fxu, fxs = out.reshape(-1), xu.reshape(-1), xs.reshape(-1)
    fwq, fwc, fws = wq.reshape(-1), wc.reshape(-1), ws.reshape(-1)
    for n in range(N):
        _block_vnni(fo, n * MB * R + mb * R, fxu, n * K4 * 4, fxs, n * ng, fwq, mb * K4 * R * 4,
                    fwc, fws, mb * ng * R, ng)


_vnni_block_rows = inline(_vnni_body)


@parallel_kernel
def _matmul_vnni(out, xu, xs, wq, wc, ws):
    for mb in prange(wq.shape[0]):
        _vnni_block_rows(out, xu, xs, wq, wc, ws, mb)


@gil_kernel
def _matmul_vnni_serial(out, xu, xs, wq, wc, ws):
    for mb in range(wq.shape[0]):
        _vnni_block_rows(out, xu, xs, wq, wc, ws, mb)


@parallel_kernel
def _matmul_generic(out, xu, xs, wq, wc, ws):
    N = out.shape[0]
    MB, K4, R, _ = wq.shape
    ng = K4 * 4 // GROUP
    for mb in prange(MB):
        acc = np.empty(R, np.int32)
        for n in range(N):
            total = np.zeros(R, np.float32)
            for g in range(ng):
                acc[:] = wc[mb, g]
                for k4 in range(g * GROUP // 4, (g + 1) * GROUP // 4):
                    for j in range(4):
                        x = np.int32(xu[n, k4 * 4 + j])
                        for r in range(R):
                            acc[r] += x * np.int32(wq[mb, k4, r, j])
                for r in range(R):
                    total[r] += np.float32(acc[r]) * (ws[mb, g, r] * xs[n, g])
            out[n, mb * R:(mb + 1) * R] = total


# Below this many multiply-adds a product runs on the calling thread: a parallel region costs
# tens of microseconds to open, and on a loaded machine it waits for every thread's turn
# (measured: the default model's int8 decoding fell from ~6,000 to 16 tokens/s on 2 busy cores).
PARALLEL_MIN_MACS = 1 << 20


def q8_matmul(out, xu, xs, w: Q8Weight) -> None:
    """out [N, Mp] float32 = (dequantized xu, xs) @ (dequantized w); all arrays C-contiguous.

    Each element is computed by the same instructions on one thread or many: exact either way."""
    if not VNNI:
        _matmul_generic(out, xu, xs, w.wq, w.wc, w.ws)
    elif out.shape[0] * w.Mp * w.Kp >= PARALLEL_MIN_MACS:  # (the GIL is released in here)
        _matmul_vnni(out, xu, xs, w.wq, w.wc, w.ws)
    else:
        _matmul_vnni_serial(out, xu, xs, w.wq, w.wc, w.ws)


@gil_kernel
def _linear_small(out, x, wq, wc, ws, bias):
    N, K = x.shape
    MB, K4, R, _ = wq.shape
    M = out.shape[1]
    xu = np.empty((N, K4 * 4), np.uint8)
    xs = np.empty((N, K4 * 4 // GROUP), np.float32)
    _quantize_rows(xu, xs, x)
    full = np.empty((N, MB * R), np.float32)
    for mb in range(MB):
        _vnni_block_rows(full, xu, xs, wq, wc, ws, mb)
    for n in range(N):
        for m in range(M):
            out[n, m] = full[n, m] + bias[m]


def q8_linear(x, w: Q8Weight, bias) -> np.ndarray:
    """x [N, K] float32 -> x @ w + bias [N, M] through int8: quantize, multiply, add the bias.

    A small product goes through one call holding the GIL (decoding steps: dozens per token,
    each a few microseconds); a large one through quantize_rows and the parallel kernel."""
    N = x.shape[0]
    if VNNI and N * w.Mp * w.Kp < PARALLEL_MIN_MACS:
        out = np.empty((N, w.M), np.float32)
        _linear_small(out, x, w.wq, w.wc, w.ws, bias)
        return out
    xu = np.empty((N, w.Kp), np.uint8)
    xs = np.empty((N, w.Kp // GROUP), np.float32)
    quantize_rows(xu, xs, x)
    full = np.empty((N, w.Mp), np.float32)
    q8_matmul(full, xu, xs, w)
    out = full if w.Mp == w.M else np.ascontiguousarray(full[:, :w.M])
    out += bias
    return out


def q8_matmul_ref(xu, xs, w: Q8Weight) -> np.ndarray:
    """numpy reference of q8_matmul: the same integer group sums in float64, [N, Mp]."""
    N, Kp = xu.shape
    ng = Kp // GROUP
    xq = (xu.astype(np.int64) - 128).reshape(N, ng, GROUP)
    q = w.wq.transpose(0, 2, 1, 3).reshape(w.Mp, ng, GROUP).astype(np.int64)
    sums = np.einsum("ngk,mgk->nmg", xq, q).astype(np.float64)
    s = w.ws.transpose(0, 2, 1).reshape(w.Mp, ng).astype(np.float64)
    return np.einsum("nmg,mg,ng->nm", sums, s, xs.astype(np.float64))
