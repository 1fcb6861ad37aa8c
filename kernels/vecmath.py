"""exp for numba loops that vectorizes: a float32 polynomial version, exact np.exp for float64.

numba's scalar np.exp calls libm once per element (~8x slower than numpy's SIMD exp); the
softmaxes of attention and cross-entropy run inside numba kernels, so they need an exp that
LLVM can vectorize. Float64, used for gradient checks, keeps the exact exp.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._jit import inline_kernel

EXP_LO = np.float32(-87.33654)   # below: e^x < 2^-126 (subnormal), returned as 0
EXP_HI = np.float32(88.72283)    # e^x overflows float32 above this


@intrinsic
def f32_from_bits(typingctx, bits):
    """Reinterprets an int32's bits as a float32 (what a C union does; one vector instruction)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def bits_from_f32(typingctx, x):
    """A float32's bits as an int32 (the inverse of f32_from_bits)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


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
    scaled = y * f32_from_bits((n + np.int32(127)) << np.int32(23))
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


# Row reductions. The max is exact, so its order is free: eight independent maxima. A sum is
# not: its order is part of its result. LLVM may reorder a sum only under the 'reassoc' flag,
# and then chooses an order that depends on where the code lands: the same reduction gave
# another last bit compiled fresh (inlined into the model pass) than loaded from numba's
# cache. So sums are written as vector code in an order fixed here (row_sum, row_dot):
# LANES running sums, lane j taking elements j, j + LANES, j + 2 LANES, ...; the lanes then
# added pairwise ((l0 + l1) + (l2 + l3)) + ...; then the tail, in order. It is the same on
# every machine (without AVX-512 LLVM splits each vector add into narrower ones, lane by lane).

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


LANES = 64  # four AVX-512 registers of float32: four independent adds in flight hide their latency


def _is_row(a) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and isinstance(a.dtype, types.Float)


def _lane_reduction(context, builder, rows, dtype, centers=None, width=LANES, vector_tree=False):
    """IR for the sum, in the fixed order above with width lanes, of one row's elements,
    of the products of two rows' elements (centers None), or of those products less their
    centers: sum((a - ca) * (b - cb)). rows: (type, value) of C-contiguous 1-D arrays;
    centers: the two scalars, or None."""
    arrays = [context.make_array(ty)(context, builder, value) for ty, value in rows]
    n = builder.extract_value(arrays[0].shape, 0)
    intp = n.type
    fty = context.get_value_type(dtype)
    vty = ir.VectorType(fty, width)
    lanes = ir.Constant(intp, width)
    align = context.get_abi_sizeof(fty)  # an element's: rows start anywhere

    def term(values, splat):
        if centers is None:
            return values[0] if len(values) == 1 else builder.fmul(values[0], values[1])
        (x, y), (cx, cy) = values, centers
        if splat:
            cx, cy = vector_centers
        return builder.fmul(builder.fsub(x, cx), builder.fsub(y, cy))

    if centers is not None:  # each center in every lane
        zero_mask = ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width)
        vector_centers = [builder.shuffle_vector(builder.insert_element(ir.Constant(vty, ir.Undefined), c, ir.Constant(ir.IntType(32), 0)),
                                                 ir.Constant(vty, ir.Undefined), zero_mask) for c in centers]
    full = builder.sub(n, builder.srem(n, lanes))
    acc = cgutils.alloca_once_value(builder, ir.Constant(vty, [ir.Constant(fty, 0.0)] * width))
    with cgutils.for_range_slice(builder, ir.Constant(intp, 0), full, lanes, intp) as (i, _):
        values = [builder.load(builder.bitcast(builder.gep(a.data, [i]), vty.as_pointer()), align=align)
                  for a in arrays]
        builder.store(builder.fadd(builder.load(acc), term(values, True)), acc)
    vec = builder.load(acc)
    if vector_tree:  # each level as one add of the even lanes to the odd ones: the same order
        i32 = ir.IntType(32)
        while vec.type.count > 1:
            half = vec.type.count // 2
            even = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(i32, half), list(range(0, 2 * half, 2))))
            odd = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(i32, half), list(range(1, 2 * half, 2))))
            vec = builder.fadd(even, odd)
        first = builder.extract_element(vec, ir.Constant(i32, 0))
    else:
        level = [builder.extract_element(vec, ir.Constant(ir.IntType(32), j)) for j in range(width)]
        while len(level) > 1:
            level = [builder.fadd(level[j], level[j + 1]) for j in range(0, len(level), 2)]
        first = level[0]
    total = cgutils.alloca_once_value(builder, first)
    with cgutils.for_range_slice(builder, full, n, ir.Constant(intp, 1), intp) as (i, _):
        values = [builder.load(builder.gep(a.data, [i])) for a in arrays]
        builder.store(builder.fadd(builder.load(total), term(values, False)), total)
    return builder.load(total)


@intrinsic
def _lane_sum(typingctx, x):
    """sum(x) over a C-contiguous 1-D float array, in the working dtype, in the fixed order."""
    if not _is_row(x):
        return None

    def codegen(context, builder, signature, args):
        return _lane_reduction(context, builder, [(signature.args[0], args[0])], signature.args[0].dtype)
    return x.dtype(x), codegen


@intrinsic
def _lane_dot_centered(typingctx, a, ca, b, cb):
    """sum((a - ca) * (b - cb)) over two C-contiguous 1-D float arrays of one dtype and length
    (the caller's to ensure), ca and cb scalars of that dtype, in the fixed order; each
    product rounded before it is added (no fused multiply-add). ca = cb = 0 is a plain dot."""
    if not (_is_row(a) and _is_row(b) and a.dtype == b.dtype and ca == a.dtype and cb == a.dtype):
        return None

    def codegen(context, builder, signature, args):
        rows = [(signature.args[0], args[0]), (signature.args[2], args[2])]
        return _lane_reduction(context, builder, rows, signature.args[0].dtype, centers=(args[1], args[3]))
    return a.dtype(a, ca, b, cb), codegen


DOT_LANES = 16  # one AVX-512 register of float32: a head's dot (64 elements in GPT-2) in four adds


@intrinsic
def _lane_dot(typingctx, a, b):
    """sum(a * b) over two C-contiguous 1-D float arrays of one dtype and length (the caller's
    to ensure), in the fixed order with DOT_LANES lanes; each product rounded before it is added."""
    if not (_is_row(a) and _is_row(b) and a.dtype == b.dtype):
        return None

    def codegen(context, builder, signature, args):
        rows = [(signature.args[0], args[0]), (signature.args[1], args[1])]
        return _lane_reduction(context, builder, rows, signature.args[0].dtype, width=DOT_LANES, vector_tree=True)
    return a.dtype(a, b), codegen


@inline_kernel
def row_dot(a, b):
    """sum(a * b) over two short C-contiguous 1-D float arrays of one dtype and length (an
    attention head's query and key), in the fixed order with DOT_LANES lanes: the same bits
    in any compiled context, serial or parallel."""
    return _lane_dot(a, b)


@inline_kernel
def row_sum(x):
    """sum(x) over a C-contiguous 1-D float array, in the working dtype, in the fixed order."""
    return _lane_sum(x)


@inline_kernel
def row_dot_centered(a, ca, b, cb):
    """sum((a - ca) * (b - cb)) over two C-contiguous 1-D float arrays of one dtype and length,
    in the fixed order; ca = cb = 0 is a plain dot product."""
    return _lane_dot_centered(a, ca, b, cb)


def lane_order_sum_ref(terms: np.ndarray, lanes: int = LANES):
    """The fixed order of row_sum/row_dot_centered (row_dot: lanes=DOT_LANES), in numpy:
    bit-exact for the same terms."""
    t = np.ascontiguousarray(terms)
    full = t.size - t.size % lanes
    acc = np.zeros(lanes, dtype=t.dtype)
    for k in range(0, full, lanes):
        acc = acc + t[k:k + lanes]
    level = list(acc)
    while len(level) > 1:
        level = [t.dtype.type(level[j] + level[j + 1]) for j in range(0, len(level), 2)]
    total = level[0]
    for v in t[full:]:
        total = t.dtype.type(total + v)
    return total


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
