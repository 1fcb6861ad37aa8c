"""exp for numba loops that vectorizes: a float32 polynomial version, exact np.exp for float64.

numba's scalar np.exp calls libm once per element (~8x slower than numpy's SIMD exp); the
softmaxes of attention and cross-entropy run inside numba kernels, so they need an exp that
LLVM can vectorize. Float64, used for gradient checks, keeps the exact exp.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ._jit import inline_kernel

EXP_LO = np.float32(-87.33654)   # below: e^x < 2^-126 (subnormal), returned as 0
EXP_HI = np.float32(88.72283)    # e^x overflows float32 above this


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterprets an int32's bits as a float32 (what a C union does; one vector instruction)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@inline_kernel
def exp_f32(x):
    """e^x for float32, |relative error| < 3e-7 on [EXP_LO, 88.37] (Cephes expf).

    e^x = 2^n e^r with n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in two
    constants so n ln 2 is exact); e^r by a degree-7 polynomial; 2^n built from its exponent bits.
    NaN stays NaN; x < EXP_LO gives 0; x > 88.37 gives inf (2^128), a little before float32
    itself overflows at 88.72 (the callers' arguments are <= 0: shifted softmax logits).
    """
    xc = min(max(x, EXP_LO), EXP_HI)
    fx = np.floor(xc * np.float32(1.44269504088896341) + np.float32(0.5))
    r = xc - fx * np.float32(0.693359375) + fx * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    n = np.int32(fx)
    # 2^n as n+127 in the exponent field; n = 128 gives the bits of inf
    scaled = y * _f32_from_bits((n + np.int32(127)) << np.int32(23))
    if x < EXP_LO:
        return np.float32(0.0)
    if x >= EXP_LO:
        return scaled
    return x  # NaN


def exp_f32_ref(x):
    return np.float32(np.exp(np.float64(x)))


def fast_exp(x):
    """exp_f32 for float32 arguments, np.exp otherwise (usable inside numba kernels only)."""
    return np.exp(x)


@overload(fast_exp, inline="always")
def _fast_exp_impl(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    return lambda x: np.exp(x)


# Row reductions with 8 independent accumulators: LLVM turns the unrolled lanes into one
# vector register, so a row's max or sum runs at SIMD speed without any fast-math flag. The
# max is exact (order does not matter); the sum adds in a fixed lane order, so it is
# deterministic, and it differs from a sequential sum only by rounding.

@inline_kernel
def row_max(x):
    """max(x) over a non-empty 1-D array."""
    n = x.size
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = x[0]
    i = 0
    while i + 8 <= n:
        m0 = max(m0, x[i])
        m1 = max(m1, x[i + 1])
        m2 = max(m2, x[i + 2])
        m3 = max(m3, x[i + 3])
        m4 = max(m4, x[i + 4])
        m5 = max(m5, x[i + 5])
        m6 = max(m6, x[i + 6])
        m7 = max(m7, x[i + 7])
        i += 8
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    while i < n:
        m = max(m, x[i])
        i += 1
    return m


@inline_kernel
def row_sum(x):
    """sum(x) over a 1-D array, in the working dtype."""
    n = x.size
    z = x.dtype.type(0.0)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = z
    i = 0
    while i + 8 <= n:
        s0 += x[i]
        s1 += x[i + 1]
        s2 += x[i + 2]
        s3 += x[i + 3]
        s4 += x[i + 4]
        s5 += x[i + 5]
        s6 += x[i + 6]
        s7 += x[i + 7]
        i += 8
    s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    while i < n:
        s += x[i]
        i += 1
    return s


def row_max_ref(x):
    return x.max()


def row_sum_ref(x):
    return x.sum(dtype=x.dtype)


@inline_kernel
def row_sumsq64(x):
    """sum(x * x) over a 1-D array, returned as float64.

    Squares are summed in the working dtype over eight lanes (as row_sum), in chunks of 512
    elements whose partial sums are added in float64: for float32 that keeps the relative
    error near 1e-6 (ample for a clipping norm) at the speed of the plain sum.
    """
    n = x.size
    total = 0.0
    z = x.dtype.type(0.0)
    for start in range(0, n, 512):
        stop = min(start + 512, n)
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = z
        i = start
        while i + 8 <= stop:
            s0 += x[i] * x[i]
            s1 += x[i + 1] * x[i + 1]
            s2 += x[i + 2] * x[i + 2]
            s3 += x[i + 3] * x[i + 3]
            s4 += x[i + 4] * x[i + 4]
            s5 += x[i + 5] * x[i + 5]
            s6 += x[i + 6] * x[i + 6]
            s7 += x[i + 7] * x[i + 7]
            i += 8
        s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
        while i < stop:
            s += x[i] * x[i]
            i += 1
        total += np.float64(s)
    return total


def row_sumsq64_ref(x):
    x = x.astype(np.float64)
    return float(np.dot(x, x))
