"""CBLAS gemm callable from inside numba kernels (so a whole pass runs in one GIL-free call).

numpy's matmul reaches BLAS only from Python; calling sgemm/dgemm from numba lets the model's
forward and backward run as one nogil kernel per sphere. The BLAS library is the one numpy
itself loaded (found through threadpoolctl); its gemm address is registered with LLVM under a
fixed alias, so numba's on-disk cache stays valid across processes and numpy versions.

When no CBLAS gemm is found (or CLLMD_NO_CBLAS is set), the alias is bound to gemm_naive
instead, compiled as a C callback with the CBLAS signature: the same model passes then run
on plain loops, as llm.c keeps its naive matmul beside the fast one. AVAILABLE says which.
"""
from __future__ import annotations

import ctypes
import logging
import os

import numpy as np
from numba import carray, cfunc, types

from ._jit import kernel

log = logging.getLogger(__name__)

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS enum values
_ALIASES = {"s": "cllmd_cblas_sgemm", "d": "cllmd_cblas_dgemm"}


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


@kernel
def gemm(trans_a, trans_b, alpha, a, b, beta, c):
    """c = alpha op(a) op(b) + beta c, op(x) = x.T when trans_x; 2-D arrays with unit column stride.

    Shapes: op(a) [M, K], op(b) [K, N], c [M, N]; a, b, c may be strided views (row stride >= cols).
    """
    M, N = c.shape
    K = a.shape[0] if trans_a else a.shape[1]
    if M == 0 or N == 0:
        return
    isz = c.itemsize
    ta = TRANS if trans_a else NO_TRANS
    tb = TRANS if trans_b else NO_TRANS
    lda = max(a.strides[0] // isz, a.shape[1], 1)  # a single row may report any stride
    ldb = max(b.strides[0] // isz, b.shape[1], 1)
    ldc = max(c.strides[0] // isz, c.shape[1], 1)
    if isz == 4:
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
    if not _self_test(gemm):
        raise RuntimeError("cllmd.kernels.blas: gemm failed its self-test")
    return not _naive


AVAILABLE = _bind()
