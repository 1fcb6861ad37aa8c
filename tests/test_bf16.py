"""bfloat16: the conversions against their numpy references and PyTorch, gemm_bf16 against float32
products, and MKL as a second BLAS provider that leaves the float32 path as it was."""
import json
import os
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

from cllmd.kernels import bf16, blas


def _mkl_installed() -> bool:
    try:
        metadata.distribution("mkl")
        return True
    except metadata.PackageNotFoundError:
        return False


MKL_REASON = "MKL is not installed (pip install 'cllmd[mkl]')"
requires_mkl = pytest.mark.skipif(not _mkl_installed(), reason=MKL_REASON)


def bits(*u32) -> np.ndarray:
    return np.array(u32, np.uint32).view(np.float32)


# Float32 bit patterns whose bfloat16 rounding is a decision: ties (lower half exactly 0x8000)
# with an even and an odd upper half, one below and above a tie, the largest finite float32
# (rounds up to inf), subnormals (a tie among them too), signed zeros, infinities, and NaNs
# whose payload is only in the lower half (adding the rounding bias must not make them inf).
SPECIAL = bits(
    0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF808000, 0xBF818000,  # ties and neighbours
    0x7F7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0xFF7FFFFF,                          # near the largest
    0x00000001, 0x00008000, 0x00018000, 0x0000C000, 0x007FFFFF, 0x80008000,  # subnormals
    0x00000000, 0x80000000, 0x7F800000, 0xFF800000,                          # zeros, infinities
    0x7F800001, 0x7FC00000, 0xFFFFFFFF, 0x7FBFFFFF, 0xFF80FFFF)              # NaNs
EXPECTED = np.array([
    0x3F80, 0x3F82, 0x3F80, 0x3F81, 0xBF80, 0xBF82,
    0x7F80, 0x7F7F, 0x7F80, 0xFF80,
    0x0000, 0x0000, 0x0002, 0x0001, 0x0080, 0x8000,
    0x0000, 0x8000, 0x7F80, 0xFF80,
    0x7FC0, 0x7FC0, 0xFFFF, 0x7FFF, 0xFFC0], np.uint16)


def test_bf16_reference_rounds_ties_to_even_and_keeps_special_values():
    np.testing.assert_array_equal(bf16.to_bf16_ref(SPECIAL), EXPECTED)
    back = bf16.from_bf16_ref(EXPECTED)
    assert np.isnan(back[-5:]).all() and np.signbit(back[[-3, -1]]).all()
    assert back[6] == np.inf and back[18] == np.inf and back[19] == -np.inf


def test_bf16_to_bf16_matches_reference_on_special_and_random_values():
    rng = np.random.default_rng(3)
    random = rng.integers(0, 2**32, size=(37, 300), dtype=np.uint32).view(np.float32)
    for x in (SPECIAL.reshape(1, -1), random, random[:, 5:250]):  # the last a strided view
        h = np.zeros(x.shape, np.uint16)
        bf16.to_bf16(h, x)
        np.testing.assert_array_equal(h, bf16.to_bf16_ref(x))


def test_bf16_from_bf16_decodes_every_pattern_exactly_and_round_trips():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    x = np.zeros(h.shape, np.float32)
    bf16.from_bf16(x, h)
    np.testing.assert_array_equal(x.view(np.uint32), h.astype(np.uint32) << 16)
    np.testing.assert_array_equal(x.view(np.uint32), bf16.from_bf16_ref(h).view(np.uint32))
    again = np.zeros_like(h)
    bf16.to_bf16(again, x)
    nan = np.isnan(x)
    np.testing.assert_array_equal(again[~nan], h[~nan])  # finite values and infinities exactly
    assert np.isnan(bf16.from_bf16_ref(again[nan])).all()  # NaNs stay NaNs (quieted)


def test_bf16_rounding_agrees_with_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = np.concatenate([SPECIAL, rng.integers(0, 2**32, 100_000, dtype=np.uint32).view(np.float32),
                        rng.normal(size=100_000).astype(np.float32)])
    x = x[~np.isnan(x)]  # PyTorch writes every NaN as 0x7FC0; ours keep their sign
    ours = bf16.to_bf16_ref(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


def _operands(rng, M, N, K, ta, tb):
    """float32 op(a) [M, K] and op(b) [K, N] as strided views, and their bfloat16 bits."""
    a = rng.normal(size=(K + 3, M + 5)).astype(np.float32)[:K, 2:2 + M] if ta else \
        rng.normal(size=(M + 2, K + 7)).astype(np.float32)[:M, 1:1 + K]
    b = rng.normal(size=(N + 1, K + 4)).astype(np.float32)[:N, 3:3 + K] if tb else \
        rng.normal(size=(K, N + 6)).astype(np.float32)[:, :N]
    ha, hb = np.zeros(a.shape, np.uint16), np.zeros(b.shape, np.uint16)
    bf16.to_bf16(ha, a)
    bf16.to_bf16(hb, b)
    return a, b, ha, hb


# Against the exact product of the bfloat16 values, gemm_bf16 differs only by float32 sums
# (each bf16 x bf16 product is exact in float32). Against the float32 product of the unrounded
# operands, the error is that of rounding both to 8 significant bits (unit roundoff 2**-9):
# norm-wise relative error bounded by BF16_TOL; measured 2e-3 at K = 96 to 768.
BF16_TOL = 8e-3


def check_gemm_bf16(gemm_bf16) -> float:
    """gemm_bf16 over every transpose, strided operands, beta 0 and not; the worst norm-wise
    relative error against the float32 products of the unrounded operands."""
    rng = np.random.default_rng(11)
    worst = 0.0
    for M, N, K in ((5, 7, 6), (64, 80, 96), (1, 33, 768)):
        for ta in (False, True):
            for tb in (False, True):
                a, b, ha, hb = _operands(rng, M, N, K, ta, tb)
                c0 = rng.normal(size=(M, N + 4)).astype(np.float32)[:, 2:2 + N]
                c, r = c0.copy(), c0.astype(np.float64)
                gemm_bf16(ta, tb, 0.5, ha, hb, 2.0, c)
                blas.gemm_bf16_ref(ta, tb, 0.5, ha, hb, 2.0, r)
                np.testing.assert_allclose(c, r, rtol=2e-5, atol=2e-5 * np.sqrt(K))
                c[...] = np.nan  # beta = 0: c is never read
                gemm_bf16(ta, tb, 1.0, ha, hb, 0.0, c)
                exact = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b)
                worst = max(worst, float(np.linalg.norm(c - exact) / np.linalg.norm(exact)))
    assert worst < BF16_TOL
    return worst


def test_bf16_gemm_matches_float32_products_within_the_stated_tolerance():
    # on MKL's cblas_gemm_bf16bf16f32 where MKL is installed, else on the float32 fallback
    assert check_gemm_bf16(blas.gemm_bf16) > 1e-4  # the operands were rounded: not a float32 product


def test_bf16_gemm_mkl_matches_gemm():
    rng = np.random.default_rng(12)
    for ta in (False, True):
        for tb in (False, True):
            a, b, _, _ = _operands(rng, 9, 13, 17, ta, tb)
            c, r = np.ones((9, 13), np.float32), np.ones((9, 13), np.float32)
            blas.gemm_mkl(ta, tb, 0.5, a, b, 2.0, c)
            blas.gemm(ta, tb, 0.5, a, b, 2.0, r)
            np.testing.assert_allclose(c, r, rtol=2e-5, atol=2e-5)


@requires_mkl
def test_bf16_mkl_is_found_when_installed_and_runs_sequential():
    assert blas.MKL_AVAILABLE, "the mkl package is installed but cllmd.kernels.blas did not bind it"
    maps = open("/proc/self/maps").read()
    assert "libmkl_sequential" in maps or "libmkl_core" in maps
    assert "libiomp5" not in maps  # no OpenMP runtime of MKL's own beside numba's


@requires_mkl
def test_bf16_pytorch_products_run_beside_mkl():
    # PyTorch's own MKL shares a process with this one in the cross-check tests; it crashed
    # while this one ran ILP64, so cllmd.kernels.blas loads it LP64
    torch = pytest.importorskip("torch")
    assert blas.MKL_AVAILABLE
    a = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(a @ a.T, torch.from_numpy(a.numpy() @ a.numpy().T))


_SCRIPT = """
import json, numpy as np
from cllmd.kernels import blas
from cllmd.model import Model, ModelConfig
m = Model(ModelConfig(vocab_size=13, n_layer=2, n_head=2, n_embd=16, block_size=6), seed=4)
rng = np.random.default_rng(9)
loss, g = m.loss_and_grads(rng.integers(0, 13, (2, 6)), rng.integers(0, 13, (2, 6)))
flat = np.concatenate([v.ravel() for v in g.values()])
out = {'mkl': blas.MKL_AVAILABLE, 'loss': float(loss), 'g': flat.view(np.uint32).tolist()}
if not blas.MKL_AVAILABLE:
    import sys; sys.path.insert(0, %r)
    from test_bf16 import check_gemm_bf16
    out['bf16_error'] = check_gemm_bf16(blas.gemm_bf16)
print(json.dumps(out))
"""


@requires_mkl
def test_bf16_float32_passes_are_bit_identical_with_and_without_mkl():
    # MKL present (and bound) or absent (CLLMD_NO_MKL), the float32 model pass is the same to
    # the bit: gemm stays on numpy's BLAS. Without MKL, gemm_bf16 runs on its fallback.
    # The first run warms numba's cache: a process that compiles the model's kernels afresh was
    # seen to differ in the last bit from processes that load them from the cache (MKL or not).
    runs = {}
    for flag in ("", "1", ""):
        env = {**os.environ, "CLLMD_NO_MKL": flag}
        r = subprocess.run([sys.executable, "-c", _SCRIPT % os.path.dirname(__file__)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        runs[flag] = json.loads(r.stdout)
    assert runs["1"]["mkl"] is False and runs[""]["mkl"] is True
    assert runs["1"]["loss"] == runs[""]["loss"]
    assert runs["1"]["g"] == runs[""]["g"]
    assert runs["1"]["bf16_error"] < BF16_TOL
