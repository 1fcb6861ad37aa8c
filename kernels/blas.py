"""CBLAS gemm callable from inside numba kernels (so a whole pass runs in one GIL-free call).

numpy's matmul reaches BLAS only from Python; calling sgemm/dgemm from numba lets the model's
forward and backward run as one nogil kernel per sphere. The BLAS library is the one numpy
itself loaded (found through threadpoolctl); its gemm address is registered with LLVM under a
fixed alias, so numba's on-disk cache stays valid across processes and numpy versions.

When no CBLAS gemm is found (or CLLMD_NO_CBLAS is set), the alias is bound to gemm_naive
instead, compiled as a C callback with the CBLAS signature: the same model passes then run
on plain loops, as llm.c keeps its naive matmul beside the fast one. AVAILABLE says which.

A second provider, Intel's MKL (the optional extra cllmd[mkl], PyPI's `mkl`; CLLMD_NO_MKL set
ignores it), is found by its package files or the system's libmkl_rt and loaded sequential and
LP64. It brings gemm_bf16 (bfloat16 operands, float32 accumulation and output, on AMX or
AVX-512 BF16 where the CPU has them) and gemm_mkl (its float32 sgemm). Without MKL, gemm_bf16
decodes its operands to float32 and runs gemm, and gemm_mkl is gemm; MKL_AVAILABLE says which.
gemm itself never changes provider: float32 stays numpy's BLAS (or the naive gemm), bit for bit.

A bfloat16 product's second operand can also be packed once into MKL's internal layout
(pack_bf16, then gemm_bf16_packed, MKL's cblas_gemm_bf16bf16f32_pack / _compute): the trainer
packs each weight matrix once per step, where every sphere's product would otherwise repack it.
Measured: the same bits as gemm_bf16 on the same operands; without MKL a packed operand is the
matrix as it was behind a small header, and the product gemm_bf16's fallback (the same bits).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import inline_kernel, kernel
from .bf16 import from_bf16

log = logging.getLogger(__name__)

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS enum values
_ALIASES = {"s": "cllmd_cblas_sgemm", "d": "cllmd_cblas_dgemm"}
_MKL_ALIASES = {"s": "cllmd_mkl_sgemm", "bf16": "cllmd_mkl_gemm_bf16", "bf16_pack": "cllmd_mkl_gemm_bf16_pack",
                "bf16_compute": "cllmd_mkl_gemm_bf16_compute"}
PACKED, B_MATRIX = 151, 162  # CBLAS_STORAGE CblasPacked, CBLAS_IDENTIFIER CblasBMatrix
MKL_THREADING_SEQUENTIAL, MKL_INTERFACE_LP64 = 1, 0  # MKL_Set_Threading_Layer, MKL_Set_Interface_Layer
MKL_CBWR_AUTO, MKL_CBWR_STRICT, MKL_CBWR_SUCCESS = 2, 0x10000, 0  # MKL_CBWR_Set


def _find_gemm() -> dict[str, int] | None:
    """Addresses of cblas_sgemm and cblas_dgemm in the BLAS numpy uses, or None."""
    if os.environ.get("CLLMD_NO_CBLAS"):
        return None
    try:
        from threadpoolctl import threadpool_info
        libs = [i["filepath"] for i in threadpool_info() if i.get("user_api") == "blas"]
    except Exception as e:  # noqa: BLE001 - any failure means: the naive gemm
        log.info("no BLAS library found through threadpoolctl (%s)", e)
        return None
    # numpy >= 2 wheels: scipy_cblas_sgemm64_ (ILP64); older wheels cblas_sgemm64_; distros cblas_sgemm
    names = [(p, s) for p in ("scipy_", "") for s in ("64_", "", "_64")]
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in names:
            try:
                found = {t: getattr(lib, f"{prefix}cblas_{t}gemm{suffix}") for t in "sd"}
            except AttributeError:
                continue
            return {t: ctypes.cast(f, ctypes.c_void_p).value for t, f in found.items()}
    return None


# Integers are declared 64-bit: right for ILP64 builds, and on x86-64 and AArch64 Linux an
# int32 parameter reads the low half of the same register or 8-byte stack slot, so LP64
# libraries receive the same values (all below 2**31); the self-test below confirms it.
_SIG = {t: types.void(types.int32, types.int32, types.int32, types.int64, types.int64, types.int64,
                      ft, types.voidptr, types.int64, types.voidptr, types.int64, ft, types.voidptr, types.int64)
        for t, ft in (("s", types.float32), ("d", types.float64))}
_sgemm = types.ExternalFunction(_ALIASES["s"], _SIG["s"])
_dgemm = types.ExternalFunction(_ALIASES["d"], _SIG["d"])


@inline_kernel
def _cblas_dims(trans_a, trans_b, a, b, c):
    """(M, N, K, CBLAS transposes of a and b, lda, ldb, ldc) of c = op(a) op(b), row-major:
    each leading dimension in its own array's elements (a single row may report any stride)."""
    M, N = c.shape
    K = a.shape[0] if trans_a else a.shape[1]
    ta = TRANS if trans_a else NO_TRANS
    tb = TRANS if trans_b else NO_TRANS
    lda = max(a.strides[0] // a.itemsize, a.shape[1], 1)
    ldb = max(b.strides[0] // b.itemsize, b.shape[1], 1)
    ldc = max(c.strides[0] // c.itemsize, c.shape[1], 1)
    return M, N, K, ta, tb, lda, ldb, ldc


@kernel
def gemm(trans_a, trans_b, alpha, a, b, beta, c):
    """c = alpha op(a) op(b) + beta c, op(x) = x.T when trans_x; 2-D arrays with unit column stride.

    Shapes: op(a) [M, K], op(b) [K, N], c [M, N]; a, b, c may be strided views (row stride >= cols).
    """
    M, N, K, ta, tb, lda, ldb, ldc = _cblas_dims(trans_a, trans_b, a, b, c)
    if M == 0 or N == 0:
        return
    if c.itemsize == 4:
        _sgemm(ROW_MAJOR, ta, tb, M, N, K, np.float32(alpha), a.ctypes, lda, b.ctypes, ldb,
               np.float32(beta), c.ctypes, ldc)
    else:
        _dgemm(ROW_MAJOR, ta, tb, M, N, K, np.float64(alpha), a.ctypes, lda, b.ctypes, ldb,
               np.float64(beta), c.ctypes, ldc)


@kernel
def gemm_naive(trans_a, trans_b, alpha, a, b, beta, c):
    """gemm by plain loops (same contract): c[i, :] = alpha op(a)[i, :] op(b) + beta c[i, :].

    Row i of op(a) is gathered once; then either rows of b are added in (no transpose: the
    inner loop runs along contiguous rows and vectorizes) or dot products are taken with rows
    of b (b transposed: op(b)[:, j] is row j of b). beta = 0 never reads c.
    """
    M, N = c.shape
    K = a.shape[0] if trans_a else a.shape[1]
    arow = np.empty(K, c.dtype)
    acc = np.empty(N, c.dtype)
    for i in range(M):
        for p in range(K):
            arow[p] = a[p, i] if trans_a else a[i, p]
        if trans_b:
            for j in range(N):
                bj = b[j]
                s = c.dtype.type(0.0)
                for p in range(K):
                    s += arow[p] * bj[p]
                acc[j] = s
        else:
            acc[:] = 0.0
            for p in range(K):
                x, bp = arow[p], b[p]
                for j in range(N):
                    acc[j] += x * bp[j]
        ci = c[i]
        if beta == 0.0:
            for j in range(N):
                ci[j] = alpha * acc[j]
        else:
            for j in range(N):
                ci[j] = alpha * acc[j] + beta * ci[j]


def _cblas_gemm_naive(order, ta, tb, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc):
    """gemm_naive behind the CBLAS signature of _SIG (row-major; pointers and leading dimensions)."""
    ra, ca = (K, M) if ta == TRANS else (M, K)
    rb, cb = (N, K) if tb == TRANS else (K, N)
    # rows x leading dimension; only the first ca (cb, N) entries of each row are touched
    A = carray(a, (ra, lda))[:, :ca]
    B = carray(b, (rb, ldb))[:, :cb]
    C = carray(c, (M, ldc))[:, :N]
    gemm_naive(ta == TRANS, tb == TRANS, alpha, A, B, beta, C)


def _naive_callback(ft):
    """_cblas_gemm_naive compiled as a C function for dtype ft (pointers typed, same ABI as _SIG)."""
    ptr = types.CPointer(ft)
    sig = types.void(types.int32, types.int32, types.int32, types.int64, types.int64, types.int64,
                     ft, ptr, types.int64, ptr, types.int64, ft, ptr, types.int64)
    return cfunc(sig, cache=True, nopython=True)(_cblas_gemm_naive)


def gemm_ref(trans_a, trans_b, alpha, a, b, beta, c):
    opa = a.T if trans_a else a
    opb = b.T if trans_b else b
    c[...] = alpha * (opa @ opb) + (beta * c if beta != 0 else 0)


def _self_test(gemm_fn) -> bool:
    """gemm_fn (gemm's signature) on strided float32 and float64 operands against numpy."""
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        a = rng.normal(size=(7, 9)).astype(dtype)[:, :5]          # strided view, lda 9
        b = rng.normal(size=(6, 5)).astype(dtype)
        c = np.ones((7, 11), dtype)[:, 1:7]
        gemm_fn(False, True, 2.0, a, b, 1.0, c)
        if not np.allclose(c, 2.0 * a @ b.T + 1.0, rtol=1e-5, atol=1e-5):
            return False
    return True


def _through_ctypes(found):
    """gemm's signature over the found CBLAS functions called as _SIG declares them: tests the
    library (and the 64-bit integer arguments) before anything is compiled against it."""
    c_int32, c_int64, c_void_p = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    fns = {}
    for t, ct in (("s", ctypes.c_float), ("d", ctypes.c_double)):
        proto = ctypes.CFUNCTYPE(None, c_int32, c_int32, c_int32, c_int64, c_int64, c_int64, ct, c_void_p,
                                 c_int64, c_void_p, c_int64, ct, c_void_p, c_int64)
        fns[t] = proto(found[t])

    def call(trans_a, trans_b, alpha, a, b, beta, c):
        isz = c.itemsize
        fns["s" if isz == 4 else "d"](ROW_MAJOR, TRANS if trans_a else NO_TRANS, TRANS if trans_b else NO_TRANS,
                                      c.shape[0], c.shape[1], a.shape[0] if trans_a else a.shape[1], alpha,
                                      a.ctypes.data, a.strides[0] // isz, b.ctypes.data, b.strides[0] // isz,
                                      beta, c.ctypes.data, c.strides[0] // isz)
    return call


_bound = {}  # the addresses the aliases are bound to
_naive = {}  # the compiled callbacks, kept alive while LLVM holds their addresses


def _bind() -> bool:
    """Binds the aliases to CBLAS, or else to gemm_naive; True for CBLAS."""
    import llvmlite.binding as llvm
    found = _find_gemm()
    if found is not None and not _self_test(_through_ctypes(found)):
        log.warning("the CBLAS gemm found failed its self-test: the model runs on the naive gemm")
        found = None
    elif found is None:
        log.info("no CBLAS gemm found: the model runs on the naive gemm")
    if found is None:
        for t, ft in (("s", types.float32), ("d", types.float64)):
            _naive[t] = _naive_callback(ft)
        found = {t: f.address for t, f in _naive.items()}
    for t, alias in _ALIASES.items():
        llvm.add_symbol(alias, found[t])
    _bound.update(found)
    if not _self_test(gemm):
        raise RuntimeError("cllmd.kernels.blas: gemm failed its self-test")
    return not _naive


AVAILABLE = _bind()


# --------------------------------------------------------------------------------------------
# MKL: cblas_sgemm and cblas_gemm_bf16bf16f32 (MKL_BF16 = uint16 operands, float alpha, beta
# and C; otherwise sgemm's CBLAS signature, so _SIG["s"] declares both).

_mkl_sgemm = types.ExternalFunction(_MKL_ALIASES["s"], _SIG["s"])
_mkl_gemm_bf16 = types.ExternalFunction(_MKL_ALIASES["bf16"], _SIG["s"])
# cblas_gemm_bf16bf16f32_compute: gemm's signature, transb = PACKED for a packed b;
# cblas_gemm_bf16bf16f32_pack(layout, identifier, trans, m, n, k, src, ld, dest)
_mkl_gemm_bf16_compute = types.ExternalFunction(_MKL_ALIASES["bf16_compute"], _SIG["s"])
_PACK_SIG = types.void(types.int32, types.int32, types.int32, types.int64, types.int64, types.int64,
                       types.voidptr, types.int64, types.voidptr)
_mkl_gemm_bf16_pack = types.ExternalFunction(_MKL_ALIASES["bf16_pack"], _PACK_SIG)
_mkl_pack_size = None  # cblas_gemm_bf16bf16f32_pack_get_size through ctypes (bytes), when MKL is bound
_mkl_lib = None  # the loaded libmkl_rt, kept while LLVM holds its addresses


def _mkl_paths() -> list[str]:
    """libmkl_rt from the `mkl` package's files (it installs into sys.prefix/lib, outside any
    search path), then the system's (Debian's libmkl-rt)."""
    from importlib import metadata
    paths = []
    try:
        paths = [str(f.locate()) for f in metadata.distribution("mkl").files or ()
                 if f.name.startswith("libmkl_rt.so")]
    except metadata.PackageNotFoundError:
        pass
    system = ctypes.util.find_library("mkl_rt")
    return paths + ([system] if system else [])


def _find_mkl() -> dict[str, int] | None:
    """Addresses of MKL's cblas_sgemm and cblas_gemm_bf16bf16f32, or None. MKL is set to its
    sequential layer (the sphere threads are the parallelism; no OpenMP runtime of its own)
    and to LP64, before any call: _SIG's 64-bit integers reach it as their low halves (see _SIG;
    the self-test checks), and PyTorch's own MKL, linked into torch, was seen to crash in a
    process where this one ran ILP64. Conditional numerical reproducibility is set to its
    strict mode on the CPU's own code branch (MKL_CBWR_AUTO | MKL_CBWR_STRICT), also before any
    call: a product's bits then depend neither on its operands' alignment nor on the run, which
    the trainer's bit-identical weights for any thread count rest on (measured: the same bits
    and speed as without it; MKL_CBWR=COMPATIBLE would cost 20x)."""
    global _mkl_lib
    if os.environ.get("CLLMD_NO_MKL"):
        return None
    for path in _mkl_paths():
        try:
            lib = ctypes.CDLL(path)
            fns = {"s": lib.cblas_sgemm, "bf16": lib.cblas_gemm_bf16bf16f32,
                   "bf16_pack": lib.cblas_gemm_bf16bf16f32_pack, "bf16_compute": lib.cblas_gemm_bf16bf16f32_compute}
            lib.cblas_gemm_bf16bf16f32_pack_get_size  # noqa: B018 - present, or AttributeError
            set_threading, set_interface = lib.MKL_Set_Threading_Layer, lib.MKL_Set_Interface_Layer
            set_cbwr = lib.MKL_CBWR_Set
        except (OSError, AttributeError) as e:
            log.info("MKL at %s not usable (%s)", path, e)
            continue
        set_threading.argtypes = set_interface.argtypes = set_cbwr.argtypes = [ctypes.c_int]
        set_interface(MKL_INTERFACE_LP64)
        set_threading(MKL_THREADING_SEQUENTIAL)
        if set_cbwr(MKL_CBWR_AUTO | MKL_CBWR_STRICT) != MKL_CBWR_SUCCESS:  # MKL ran before this
            log.warning("MKL at %s refused strict reproducibility (MKL_CBWR_Set): bfloat16 products "
                        "may then depend on their operands' alignment", path)
        _mkl_lib = lib
        return {t: ctypes.cast(f, ctypes.c_void_p).value for t, f in fns.items()}
    return None


def _mkl_self_test(found) -> bool:
    """MKL's two gemms called through ctypes as _SIG declares them, on a strided transposed
    operand, against numpy: sgemm to float32 rounding, the bf16 gemm against the float32
    product of the same bfloat16 values (each product is exact in float32; only the order of
    the sums differs)."""
    proto = ctypes.CFUNCTYPE(None, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_int64,
                             ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
                             ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
                             ctypes.c_void_p, ctypes.c_int64)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(9, 7)).astype(np.float32)[:, :5]   # op(a) = a.T [5, 9], lda 7
    b = rng.normal(size=(9, 6)).astype(np.float32)
    bits = {"s": (a, b), "bf16": (a.view(np.uint32)[:, :] >> 16 << 16, b.view(np.uint32) >> 16 << 16)}
    for t, fn in found.items():
        if t not in bits:
            continue
        x, y = bits[t]
        if t == "bf16":  # the upper halves: bfloat16 operands, and their exact float32 values
            x32, y32 = x.view(np.float32), y.view(np.float32)
            x, y = (x >> 16).astype(np.uint16), (y >> 16).astype(np.uint16)
        else:
            x32, y32 = x, y
        c = np.ones((5, 6), np.float32)
        proto(fn)(ROW_MAJOR, TRANS, NO_TRANS, 5, 6, 9, 2.0, x.ctypes.data, x.strides[0] // x.itemsize,
                  y.ctypes.data, y.strides[0] // y.itemsize, 1.0, c.ctypes.data, 6)
        if not np.allclose(c, 2.0 * x32.T.astype(np.float64) @ y32 + 1.0, rtol=1e-5, atol=1e-5):
            return False
    return True


@intrinsic
def _store_zeros_streaming(typingctx, array, start, count):
    """Elements [start, start + 16 count) of array's data = 0 by 64-byte non-temporal stores
    (float32 whose rows are contiguous in memory; start at a 64-byte boundary): written around
    the caches, no line read first."""
    def codegen(context, builder, signature, args):
        ary, at, n = args
        data = context.make_array(signature.args[0])(context, builder, ary).data
        vec = ir.VectorType(ir.FloatType(), 16)
        to = builder.bitcast(builder.gep(data, [at]), vec.as_pointer())
        zeros = ir.Constant(vec, [0.0] * 16)
        nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        with cgutils.for_range(builder, n) as loop:
            builder.store(zeros, builder.gep(to, [loop.index]), align=64).set_metadata("nontemporal", nontemporal)
        return context.get_dummy_value()
    return types.void(array, start, count), codegen


@kernel
def clear_streaming(c):
    """c[...] = 0 for a float32 matrix [R, S] stored contiguously (row stride S, whatever its
    type says), its 64-byte-aligned bulk by non-temporal stores: ~3x faster than a plain fill
    on a matrix that is not in cache, which reads every line before writing it (measured 0.38
    against 1.21 ms for 768 x 3072 at one thread)."""
    R, S = c.shape
    n = R * S
    head = min(n, ((64 - c.ctypes.data % 64) % 64) // 4)
    blocks = (n - head) // 16
    for i in range(head):
        c[i // S, i % S] = 0.0
    _store_zeros_streaming(c, head, blocks)
    for i in range(head + 16 * blocks, n):
        c[i // S, i % S] = 0.0


# output elements (4 MiB) from which gemm_bf16 clears c itself. Below it the output is one
# its consumer soon reads again, from cache after MKL's own clear (at the 85M shape: the
# 768 x 768 weight gradient, the 256 x 3072 input gradient); measured per 85M sphere: 330 ms
# at 1 << 20, 355 at 1 << 19 and at 1 << 21 (GPT-2 small: 2.06 s at 1 << 20, 2.08 at 1 << 19)
STREAMING_CLEAR_MIN = 1 << 20


@kernel
def gemm_bf16(trans_a, trans_b, alpha, a, b, beta, c):
    """c = alpha op(a) op(b) + beta c: a, b bfloat16 bits (uint16, cllmd.kernels.bf16), c float32,
    every product accumulated in float32. Same shapes and strides as gemm.

    beta = 0 on a large contiguous c (the weight gradients): MKL first clears c in a pass of
    its own that reads every line of it, then accumulates; c is instead cleared here by
    streaming stores (clear_streaming) and MKL accumulates onto it (beta = 1). The same bits
    (0 + x = x; tested), measured 3.9 -> 2.9 ms for a 256-row 768 x 3072 weight gradient."""
    M, N, K, ta, tb, lda, ldb, ldc = _cblas_dims(trans_a, trans_b, a, b, c)
    if M == 0 or N == 0:
        return
    if beta == 0.0 and ldc == N and M * N >= STREAMING_CLEAR_MIN:
        clear_streaming(c)
        beta = 1.0
    _mkl_gemm_bf16(ROW_MAJOR, ta, tb, M, N, K, np.float32(alpha), a.ctypes, lda, b.ctypes, ldb,
                   np.float32(beta), c.ctypes, ldc)


@kernel
def gemm_mkl(trans_a, trans_b, alpha, a, b, beta, c):
    """gemm (float32 only) on MKL's sgemm where MKL is present, else on gemm's own provider."""
    M, N, K, ta, tb, lda, ldb, ldc = _cblas_dims(trans_a, trans_b, a, b, c)
    if M == 0 or N == 0:
        return
    _mkl_sgemm(ROW_MAJOR, ta, tb, M, N, K, np.float32(alpha), a.ctypes, lda, b.ctypes, ldb,
               np.float32(beta), c.ctypes, ldc)


PACK_ALIGN = 32  # packed operands start at 64-byte boundaries (uint16 elements)


def pack_bf16_size(rows: int, n: int, k: int) -> int:
    """uint16 elements a packed second operand op(b) [k, n] takes, for products of about
    `rows` rows (MKL's pack_get_size, which reserves more than it writes: from np.zeros the
    pages never written stay unallocated), rounded up to PACK_ALIGN."""
    size = (_mkl_pack_size(B_MATRIX, rows, n, k) + 1) // 2 if _mkl_pack_size is not None else PACK_ALIGN + n * k
    return -(-size // PACK_ALIGN) * PACK_ALIGN


@kernel
def pack_bf16(dest, rows, trans_b, b):
    """dest (uint16, pack_bf16_size(rows, n, k) elements, 64-byte aligned) = op(b) [k, n]
    packed as a product's second operand (b bfloat16 bits, unit column stride; op(b) = b.T
    when trans_b), for products of about `rows` rows (any row count reads it)."""
    if trans_b:
        n, k = b.shape
    else:
        k, n = b.shape
    ld = max(b.strides[0] // b.itemsize, b.shape[1], 1)
    _mkl_gemm_bf16_pack(ROW_MAJOR, B_MATRIX, TRANS if trans_b else NO_TRANS, rows, n, k, b.ctypes, ld, dest.ctypes)


@kernel
def gemm_bf16_packed(trans_a, alpha, a, b_packed, beta, c):
    """c = alpha op(a) op(b) + beta c as gemm_bf16, op(b) [K, N] packed by pack_bf16 (at a
    64-byte boundary): a bfloat16 bits (unit column stride), op(a) [M, K] (a.T when trans_a),
    c [M, N] float32. A large contiguous c with beta = 0 is cleared by streaming stores first
    (as gemm_bf16)."""
    M, N = c.shape
    K = a.shape[0] if trans_a else a.shape[1]
    if M == 0 or N == 0:
        return
    lda = max(a.strides[0] // a.itemsize, a.shape[1], 1)
    ldc = max(c.strides[0] // c.itemsize, N, 1)
    if beta == 0.0 and ldc == N and M * N >= STREAMING_CLEAR_MIN:
        clear_streaming(c)
        beta = 1.0
    _mkl_gemm_bf16_compute(ROW_MAJOR, TRANS if trans_a else NO_TRANS, PACKED, M, N, K, np.float32(alpha), a.ctypes,
                           lda, b_packed.ctypes, K, np.float32(beta), c.ctypes, ldc)


@kernel
def aligned_u16(scratch):
    """scratch's elements from its first 64-byte boundary on (a place for pack_bf16)."""
    return scratch[((64 - scratch.ctypes.data % 64) % 64) // 2:]


def gemm_bf16_ref(trans_a, trans_b, alpha, a, b, beta, c):
    """numpy reference of gemm_bf16: the bfloat16 values decoded, the product in float64."""
    from .bf16 import from_bf16_ref
    opa = from_bf16_ref(a).astype(np.float64)
    opb = from_bf16_ref(b).astype(np.float64)
    gemm_ref(trans_a, trans_b, alpha, opa, opb, 0.0, out := np.zeros(c.shape))
    c[...] = out + (beta * c if beta != 0 else 0)


@kernel
def _gemm_bf16_decoded(trans_a, trans_b, alpha, a, b, beta, c):
    """gemm_bf16 without MKL: the bfloat16 operands decoded to float32 (exactly), then gemm."""
    A = np.empty(a.shape, np.float32)
    B = np.empty(b.shape, np.float32)
    from_bf16(A, a)
    from_bf16(B, b)
    gemm(trans_a, trans_b, alpha, A, B, beta, c)


def _cblas_gemm_bf16_fallback(order, ta, tb, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc):
    """_gemm_bf16_decoded behind the CBLAS signature."""
    ra, ca = (K, M) if ta == TRANS else (M, K)
    rb, cb = (N, K) if tb == TRANS else (K, N)
    _gemm_bf16_decoded(ta == TRANS, tb == TRANS, alpha, carray(a, (ra, lda))[:, :ca], carray(b, (rb, ldb))[:, :cb],
                       beta, carray(c, (M, ldc))[:, :N])


def _cblas_gemm_bf16_pack_fallback(layout, identifier, trans, m, n, k, src, ld, dest):
    """Without MKL: a header of PACK_ALIGN elements, the first saying whether op(src) was
    transposed, then src's matrix as it was ([n, k] or [k, n] rows): the product then takes
    the same fallback path as gemm_bf16 on the unpacked operand, the same bits."""
    rows, cols = (n, k) if trans == TRANS else (k, n)
    out = carray(dest, (PACK_ALIGN + rows * cols,))
    out[0] = 1 if trans == TRANS else 0
    out[PACK_ALIGN:] = carray(src, (rows, ld))[:, :cols].copy().reshape(-1)


def _cblas_gemm_bf16_compute_fallback(order, ta, tb, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc):
    """Without MKL: a packed b (see above) through gemm_bf16's fallback, in its own layout."""
    ra, ca = (K, M) if ta == TRANS else (M, K)
    packed = carray(b, (PACK_ALIGN + N * K,))
    trans = packed[0] == 1
    B = packed[PACK_ALIGN:].reshape((N, K) if trans else (K, N))
    _gemm_bf16_decoded(ta == TRANS, trans, alpha, carray(a, (ra, lda))[:, :ca], B, beta, carray(c, (M, ldc))[:, :N])


def _bind_mkl() -> bool:
    """Binds the MKL aliases to MKL, or else to the fallbacks; True for MKL."""
    import llvmlite.binding as llvm
    found = _find_mkl()
    if found is not None and not _mkl_self_test(found):
        log.warning("MKL's gemms failed their self-test: bfloat16 products run on the float32 gemm")
        found = None
    if found is None:
        u16, f32 = types.CPointer(types.uint16), types.CPointer(types.float32)
        sig = types.void(types.int32, types.int32, types.int32, types.int64, types.int64, types.int64,
                         types.float32, u16, types.int64, u16, types.int64, types.float32, f32, types.int64)
        _naive["bf16"] = cfunc(sig, cache=True, nopython=True)(_cblas_gemm_bf16_fallback)
        _naive["bf16_compute"] = cfunc(sig, cache=True, nopython=True)(_cblas_gemm_bf16_compute_fallback)
        _naive["bf16_pack"] = cfunc(types.void(types.int32, types.int32, types.int32, types.int64, types.int64,
                                               types.int64, u16, types.int64, u16),
                                    cache=True, nopython=True)(_cblas_gemm_bf16_pack_fallback)
        found = {"s": _bound["s"], **{t: _naive[t].address for t in ("bf16", "bf16_compute", "bf16_pack")}}
    else:
        global _mkl_pack_size
        _mkl_pack_size = _mkl_lib.cblas_gemm_bf16bf16f32_pack_get_size
        _mkl_pack_size.restype = ctypes.c_size_t
        _mkl_pack_size.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    for t, alias in _MKL_ALIASES.items():
        llvm.add_symbol(alias, found[t])
    return found["s"] != _bound["s"]


MKL_AVAILABLE = _bind_mkl()

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo's names for the bfloat16 units


def bf16_cpu_features() -> list[str]:
    """Which of BF16_CPU_FLAGS this CPU has (Linux's /proc/cpuinfo; none elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [name for name in BF16_CPU_FLAGS if name in flags]
    except OSError:
        pass
    return []


def bf16_unavailable() -> str | None:
    """Why the trainer cannot run its products in bfloat16 here, or None when it can: MKL must
    be bound (without it gemm_bf16 only emulates, at float32 speed and with extra copies) and
    the CPU must multiply bfloat16 natively (AMX or AVX-512 BF16)."""
    if not MKL_AVAILABLE:
        why = "CLLMD_NO_MKL is set" if os.environ.get("CLLMD_NO_MKL") else "install the extra: pip install 'cllmd[mkl]'"
        return f"bfloat16 products need Intel's MKL, which is not loaded ({why})"
    if not bf16_cpu_features():
        return "bfloat16 products need a CPU with AMX or AVX-512 BF16 (neither flag is in /proc/cpuinfo)"
    return None
