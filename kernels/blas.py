"""CBLAS gemm callable from inside numba kernels (so a whole pass runs in one GIL-free call).

numpy's matmul reaches BLAS only from Python; calling sgemm/dgemm from numba lets the model's
forward and backward run as one nogil kernel per sphere. The BLAS library is the one numpy
itself loaded (found through threadpoolctl); its gemm address is registered with LLVM under a
fixed alias, so numba's on-disk cache stays valid across processes and numpy versions.
AVAILABLE is False when no CBLAS gemm is found: the model then uses its numpy path.
"""
from __future__ import annotations

import ctypes
import logging
import os

import numpy as np
from numba import types

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
    except Exception as e:  # noqa: BLE001 - any failure means: use the numpy path
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


def gemm_ref(trans_a, trans_b, alpha, a, b, beta, c):
    opa = a.T if trans_a else a
    opb = b.T if trans_b else b
    c[...] = alpha * (opa @ opb) + (beta * c if beta != 0 else 0)


def _self_test() -> bool:
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        a = rng.normal(size=(7, 9)).astype(dtype)[:, :5]          # strided view, lda 9
        b = rng.normal(size=(6, 5)).astype(dtype)
        c = np.ones((7, 11), dtype)[:, 1:7]
        gemm(False, True, 2.0, a, b, 1.0, c)
        if not np.allclose(c, 2.0 * a @ b.T + 1.0, rtol=1e-5, atol=1e-5):
            return False
    return True


def _bind() -> bool:
    found = _find_gemm()
    if found is None:
        log.info("no CBLAS gemm found: the model runs on its numpy path")
        return False
    import llvmlite.binding as llvm
    for t, alias in _ALIASES.items():
        llvm.add_symbol(alias, found[t])
    if not _self_test():
        log.warning("the CBLAS gemm found failed its self-test: the model runs on its numpy path")
        return False
    return True


AVAILABLE = _bind()
