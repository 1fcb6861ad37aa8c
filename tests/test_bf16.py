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
# installed and not turned off: CLLMD_NO_MKL in the test run's environment leaves it unloaded
requires_mkl = pytest.mark.skipif(not _mkl_installed() or bool(os.environ.get("CLLMD_NO_MKL")),
                                  reason=MKL_REASON + ", or CLLMD_NO_MKL is set")


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


def test_bf16_clear_streaming_zeroes_exactly_its_array():
    buf = np.ones(3 + 37 * 41 + 5, np.float32)
    blas.clear_streaming(buf[3:-5].reshape(37, 41))  # an unaligned start and end: scalar head and tail
    assert np.all(buf[3:-5] == 0) and np.all(buf[:3] == 1) and np.all(buf[-5:] == 1)


@pytest.mark.skipif(not blas.MKL_AVAILABLE, reason="MKL is not loaded (" + MKL_REASON + ", or CLLMD_NO_MKL is set)")
def test_bf16_gemm_beta_zero_on_a_large_output_keeps_mkls_bits():
    # gemm_bf16 clears a large c itself and accumulates onto it (beta = 1): the bits must be
    # those of MKL's own beta = 0, whatever c held (NaN included), for each operand layout
    import ctypes
    fn = blas._mkl_lib.cblas_gemm_bf16bf16f32
    fn.argtypes = [ctypes.c_int] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int64,
                                                                 ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
                                                                 ctypes.c_void_p, ctypes.c_int64]
    rng = np.random.default_rng(13)
    M, N = 768, 2048
    assert M * N >= blas.STREAMING_CLEAR_MIN
    for K in (12, 256):
        for ta in (False, True):
            a = _bf16_bits(rng.normal(size=(K, M) if ta else (M, K)))
            b = _bf16_bits(rng.normal(size=(K, N)))
            c = np.full((M, N), np.nan, np.float32)
            blas.gemm_bf16(ta, False, 1.0, a, b, 0.0, c)
            r = np.full((M, N), np.nan, np.float32)
            fn(blas.ROW_MAJOR, blas.TRANS if ta else blas.NO_TRANS, blas.NO_TRANS, M, N, K, 1.0, a.ctypes.data,
               a.shape[1], b.ctypes.data, N, 0.0, r.ctypes.data, N)
            np.testing.assert_array_equal(c.view(np.uint32), r.view(np.uint32))


def _aligned_u16(n: int) -> np.ndarray:
    raw = np.zeros(n + blas.PACK_ALIGN, np.uint16)
    skip = (-raw.ctypes.data % (2 * blas.PACK_ALIGN)) // 2
    return raw[skip:skip + n]


def check_packed_products() -> int:
    """pack_bf16 then gemm_bf16_packed against gemm_bf16 on the same operands, bit for bit: b in
    either layout, beta 0 and 1, a strided a, a large output (the streaming clear), row counts
    other than the one packed for. Returns the number of products compared."""
    rng = np.random.default_rng(14)
    done = 0
    for M, K, N, rows in ((40, 96, 72, 40), (256, 768, 2304, 256), (7, 50, 70, 256), (512, 3072, 768, 256),
                          (1024, 64, 1100, 256)):
        a = _bf16_bits(rng.normal(size=(M, K + 3)))[:, :K]  # lda K + 3
        for trans_b in (False, True):
            b = _bf16_bits(rng.normal(size=(N, K) if trans_b else (K, N)))
            packed = _aligned_u16(blas.pack_bf16_size(rows, N, K))
            blas.pack_bf16(packed, rows, trans_b, b)
            for beta in (0.0, 1.0):
                c = rng.normal(size=(M, N)).astype(np.float32)
                want = c.copy()
                blas.gemm_bf16(False, trans_b, 0.5, a, b, beta, want)
                blas.gemm_bf16_packed(False, 0.5, a, packed, beta, c)
                assert np.array_equal(c.view(np.uint32), want.view(np.uint32)), (M, K, N, rows, trans_b, beta)
                done += 1
            if not trans_b:  # a transposed, as the weight gradients take it: a^T [M, K] from [K, M]
                at = _bf16_bits(rng.normal(size=(K, M + 5)))[:, :M]
                c = rng.normal(size=(M, N)).astype(np.float32)
                want = c.copy()
                blas.gemm_bf16(True, False, 1.0, at, b, 0.0, want)
                blas.gemm_bf16_packed(True, 1.0, at, packed, 0.0, c)
                assert np.array_equal(c.view(np.uint32), want.view(np.uint32)), (M, K, N, rows, "a^T")
                done += 1
    return done


def test_bf16_packed_products_give_gemm_bf16s_bits():
    # on MKL's pack / compute where MKL is loaded, else on their fallbacks (and in a process
    # without MKL in test_bf16_float32_passes_are_bit_identical_with_and_without_mkl)
    assert check_packed_products() == 25


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
    from test_bf16 import check_packed_products
    out['packed_products'] = check_packed_products()
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
    assert runs["1"]["packed_products"] == 25


# ---- the trainer's bfloat16 path ---------------------------------------------------------------

BF16_REASON = blas.bf16_unavailable()
requires_bf16 = pytest.mark.skipif(BF16_REASON is not None, reason=BF16_REASON or "")


def _bf16_bits(x) -> np.ndarray:
    h = np.zeros(x.shape, np.uint16)
    bf16.to_bf16(h, np.ascontiguousarray(x, np.float32))
    return h


def test_bf16_linear_products_match_their_rounded_references_and_float32():
    # the layer's bf16 products against the exact products of the rounded operands (float32
    # sums only), and against the float32 layer within BF16_TOL (rounding both operands)
    from cllmd.kernels import linear
    rng = np.random.default_rng(21)
    N, K, M = 40, 96, 72
    inp, w = rng.normal(size=(N, K)).astype(np.float32), rng.normal(size=(K, M)).astype(np.float32)
    b, res, dout = (rng.normal(size=s).astype(np.float32) for s in (M, (N, M), (N, M)))
    w_h, w_ht = _bf16_bits(w), _bf16_bits(w.T)
    none = np.empty((0, 0), np.uint16)
    out, ref, f32 = (np.full((N, M), np.nan, np.float32) for _ in range(3))
    linear.linear_forward(out, inp, w, b, res, w_ht, np.zeros((N, K), np.uint16))
    linear.linear_forward_ref(ref, inp, w, b, res, w_ht, none)
    linear.linear_forward(f32, inp, w, b, res, none, none)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5 * np.sqrt(K))
    assert 1e-4 < np.linalg.norm(out - res - (inp.astype(np.float64) @ w + b)) / np.linalg.norm(f32 - res) < BF16_TOL
    grads = {}
    for name, fn, wh in (("bf16", linear.linear_backward, w_h), ("ref", linear.linear_backward_ref, w_h),
                         ("f32", linear.linear_backward, none)):
        g = (np.full((N, K), np.nan, np.float32), np.full((K, M), np.nan, np.float32), np.full(M, np.nan, np.float32))
        fn(*g, dout, inp, w, np.empty((0, 0), np.float32), wh, np.zeros((N, K), np.uint16), np.zeros((N, M), np.uint16))
        grads[name] = g
    for got, want, exact in zip(grads["bf16"], grads["ref"], grads["f32"]):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.sqrt(max(N, M)))
        err = np.linalg.norm(got - exact) / np.linalg.norm(exact)
        assert err < BF16_TOL
    np.testing.assert_array_equal(grads["bf16"][2], grads["f32"][2])  # the bias gradient stays float32


@requires_bf16
@pytest.mark.parametrize("T", [11, 2 * 128 + 37], ids=["one-block", "causal-blocks"])
def test_bf16_attention_matches_its_rounded_reference_and_float32(T):
    # the T x T products in bfloat16: against the exact products of the rounded operands
    # (float32 sums only), and against float32 attention within BF16_TOL; with T past
    # CAUSAL_BLOCK, the blocks above the diagonal are skipped
    from cllmd.kernels import attention
    assert attention.CAUSAL_BLOCK == 128
    rng = np.random.default_rng(5)
    B, C, NH = 2, 12, 3  # (B, T, 3C) -> heads (B, NH, T, hs)
    qkv = (2.0 * rng.normal(size=(B, T, 3 * C))).astype(np.float32)
    dout = rng.normal(size=(B, T, C)).astype(np.float32)
    out, att_h = np.full((B, T, C), np.nan, np.float32), np.zeros((B, NH, T, T), np.uint16)
    attention.attention_forward_bf16(out, att_h, np.empty((T, T), np.float32), qkv,
                                     np.zeros((B, T, 3 * C), np.uint16), NH)
    out_r, att_hr = np.empty((B, T, C)), np.zeros_like(att_h)
    attention.attention_forward_bf16_ref(out_r, att_hr, qkv, NH)
    p, p_r = bf16.from_bf16_ref(att_h), bf16.from_bf16_ref(att_hr)
    upper = np.triu(np.ones((T, T), dtype=bool))  # key s <= query t: what the backward reads
    np.testing.assert_allclose(p[:, :, upper], p_r[:, :, upper], rtol=2 ** -7, atol=1e-7)  # a rounding step
    # the value product of the kernel's own probabilities (a rounding step apart from the
    # reference's here and there), exact but for float32 sums
    v = attention._heads(attention._rounded(qkv), NH)[2]
    y = (attention._causal_values(att_h).transpose(0, 1, 3, 2) @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    np.testing.assert_allclose(out, y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(out, out_r, rtol=0, atol=2e-2)
    blocks = np.arange(T) // attention.CAUSAL_BLOCK
    masked = (blocks[:, None] == blocks[None, :]) & ~upper  # past each query, in the diagonal blocks
    assert np.all(att_h[:, :, masked] == 0)
    out32, att32 = np.empty_like(out), np.empty((B, NH, T, T), np.float32)
    attention.attention_forward(out32, att32, qkv, NH)
    assert 1e-4 < np.linalg.norm(out - out32) / np.linalg.norm(out32) < BF16_TOL
    dqkv, dqkv_r = np.full_like(qkv, np.nan), np.empty(qkv.shape)  # written whole
    attention.attention_backward_bf16(dqkv, dout, qkv, att_h, np.zeros((B, T, 3 * C), np.uint16),
                                      np.zeros((B, T, C), np.uint16), np.empty((T, T), np.float32))
    attention.attention_backward_bf16_ref(dqkv_r, dout, qkv, att_h, NH)
    np.testing.assert_allclose(dqkv, dqkv_r, rtol=2e-5, atol=2e-5 * np.abs(dqkv_r).max())
    d32 = np.empty_like(qkv)
    attention.attention_backward(d32, dout, qkv, att32, NH)
    # two more roundings on the way (the probabilities and dz, besides the operands): measured
    # 0.5% at T = 11 and 1.0% at T = 293
    assert 1e-4 < np.linalg.norm(dqkv - d32) / np.linalg.norm(d32) < 2 * BF16_TOL


def test_bf16_crossentropy_fused_is_the_two_kernels_rounded_bit_for_bit():
    from cllmd.kernels import crossentropy
    rng = np.random.default_rng(6)
    N, V = 7, 301
    logits = (3.0 * rng.normal(size=(N, V))).astype(np.float32)
    targets, dlosses = rng.integers(0, V, N), rng.random(N).astype(np.float32)
    losses, losses_h = np.empty(N, np.float32), np.empty(N, np.float32)
    d = np.empty_like(logits)
    crossentropy.crossentropy_forward(d, losses, logits, targets)
    crossentropy.crossentropy_backward(d, d, targets, dlosses)
    d_h = np.zeros((N, V), np.uint16)
    crossentropy.crossentropy_forward_backward_h(d_h, losses_h, logits, targets, dlosses)
    np.testing.assert_array_equal(losses_h, losses)
    np.testing.assert_array_equal(d_h, _bf16_bits(d))
    with pytest.raises(IndexError, match="target id"):
        crossentropy.crossentropy_forward_backward_h(d_h, losses_h, logits, np.full(N, V), dlosses)


def test_bf16_weights_are_each_matrix_rounded_and_transposed():
    from cllmd.model import Model, ModelConfig
    m = Model(ModelConfig(vocab_size=11, n_layer=2, n_head=2, n_embd=20, block_size=5), seed=3)
    h = m.bf16_weights()
    P = m.flat.size
    for name, shape in m.table:
        if len(shape) != 2 or name == "wpe":  # the products' weights: the blocks' four, and wte
            continue
        at = sum(int(np.prod(s)) for n, s in m.table[:[n for n, _ in m.table].index(name)])
        n = int(np.prod(shape))
        np.testing.assert_array_equal(h[at:at + n].reshape(shape), bf16.to_bf16_ref(m.params[name]))
        np.testing.assert_array_equal(h[P + at:P + at + n].reshape(shape[::-1]), bf16.to_bf16_ref(m.params[name].T))


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(np.ravel(b)))


# A bf16 pass rounds every product's operands to 8 significant bits (relative 2**-9 each):
# against the float64 gradients (themselves checked by finite differences in test_model.py)
# each tensor's gradient is off by about 1e-3 to 1e-2 of its norm. BF16_GRAD_TOL bounds it.
BF16_GRAD_TOL = 3e-2


@requires_bf16
@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
def test_bf16_gradients_match_float64_and_finite_differences_within_the_bf16_tolerance(checkpointing):
    from cllmd.model import Model, ModelConfig
    cfg = ModelConfig(vocab_size=23, n_layer=2, n_head=2, n_embd=32, block_size=12, clock_positions=True)
    m64 = Model(cfg, seed=1, dtype=np.float64)
    m64.flat += np.random.default_rng(1).normal(0.0, 0.05, m64.flat.shape)  # away from the init
    m32 = Model(cfg, dtype=np.float32, _flat=m64.flat.astype(np.float32))
    rng = np.random.default_rng(2)
    idx, targets = rng.integers(0, 23, (3, 12)), rng.integers(0, 23, (3, 12))
    mask = (rng.random((3, 12)) > 0.2).astype(np.float32)
    loss64, g64 = m64.loss_and_grads(idx, targets, mask)
    loss16, g16 = m32.loss_and_grads(idx, targets, mask, checkpointing=checkpointing, bf16=True)
    _, g32 = m32.loss_and_grads(idx, targets, mask, checkpointing=checkpointing)
    assert abs(loss16 - loss64) < 1e-2 * loss64
    worst = {name: _rel(g16[name], g64[name]) for name in g64}
    assert max(worst.values()) < BF16_GRAD_TOL, worst
    assert _rel(np.concatenate([g.ravel() for g in g16.values()]),
                np.concatenate([g.ravel() for g in g32.values()])) > 1e-5  # the products did run in bf16
    # the directional derivative along random directions, by central differences in float64
    for seed in range(3):
        d = {n: np.random.default_rng(10 + seed).normal(size=g.shape) for n, g in g64.items()}
        eps = 1e-5
        flat_d = np.concatenate([d[n].ravel() for n, _ in m64.table])
        m64.flat += eps * flat_d
        up, _ = m64.loss_and_grads(idx, targets, mask)
        m64.flat -= 2 * eps * flat_d
        down, _ = m64.loss_and_grads(idx, targets, mask)
        m64.flat += eps * flat_d
        numeric = (up - down) / (2 * eps)
        analytic = sum(float((g16[n].astype(np.float64) * d[n]).sum()) for n in d)
        assert abs(analytic - numeric) < BF16_GRAD_TOL * abs(numeric), (seed, analytic, numeric)


def _train(threads, precision, steps=4, batch=13, **cfg):
    from cllmd.model import Model, ModelConfig
    from cllmd.tokensource import TokenArraySource
    from cllmd.trainer import TrainConfig, Trainer
    rng = np.random.default_rng(0)
    tokens = (np.arange(6000) % 37 + (rng.random(6000) < 0.1) * rng.integers(0, 3, 6000)) % 40
    model_cfg = ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=12)
    tr = Trainer(Model(model_cfg, seed=0), TokenArraySource(tokens.astype(np.uint16), 0.1),
                 TrainConfig(batch_size=batch, warmup=2, precision=precision, **cfg), threads=threads)
    losses = [tr.step()["loss"] for _ in range(steps)]
    tr.val_loss = tr.evaluate()["val_loss"]
    tr.close()
    return tr, losses


@requires_bf16
@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
def test_bf16_trainer_weights_bit_identical_across_1_2_and_12_threads(checkpointing):
    results = [_train(threads, "bf16", grad_checkpointing=checkpointing) for threads in (1, 2, 12)]
    base, losses = results[0]
    assert base.precision == "bf16" and base.snapshot()["precision"] == "bf16"
    for tr, ls in results[1:]:
        assert np.array_equal(tr.model.flat, base.model.flat), f"{tr.pool.size} threads diverged"
        assert ls == losses
    f32, f32_losses = _train(1, "float32", grad_checkpointing=checkpointing)
    assert not np.array_equal(f32.model.flat, base.model.flat)  # bf16 really ran
    assert max(abs(a - b) for a, b in zip(losses, f32_losses)) < 0.02


@requires_bf16
def test_bf16_trainer_losses_stay_close_to_float32_while_learning():
    # CI scale of the quality check (docs/benchmarks.md has the 2000-step tinyshakespeare one)
    results = {p: _train(2, p, steps=60, batch=12, lr=3e-3) for p in ("float32", "bf16")}
    (f32, lf), (b16, lb) = results["float32"], results["bf16"]
    assert lf[-1] < lf[0] - 1.0  # it learned
    assert abs(lb[-1] - lf[-1]) < 0.05, (lf[-1], lb[-1])
    assert abs(f32.val_loss - b16.val_loss) < 0.05


@requires_bf16
def test_bf16_checkpoint_records_the_precision_and_resumes_bit_for_bit(tmp_path):
    from cllmd.modelfile import read_model_file
    from cllmd.trainer import Trainer
    straight, _ = _train(2, "bf16", steps=6)
    half, _ = _train(2, "bf16", steps=3)
    half.save_checkpoint(tmp_path / "ck.cllm")
    header, _ = read_model_file(tmp_path / "ck.cllm")
    meta = header["metadata"]["checkpoint"]
    assert meta["precision"] == "bf16" and meta["train_config"]["precision"] == "bf16"
    resumed = Trainer.from_checkpoint(tmp_path / "ck.cllm", half.source, threads=1)
    assert resumed.precision == "bf16"
    for _ in range(3):
        resumed.step()
    resumed.close()
    assert np.array_equal(resumed.model.flat, straight.model.flat)


_TRAIN_SCRIPT = """
import hashlib, json, sys
import numpy as np
sys.path.insert(0, %r)
from test_bf16 import _train
out = {}
for precision in ("float32", "auto"):
    try:
        tr, losses = _train(2, precision, steps=3)
        out[precision] = [tr.precision, hashlib.sha256(tr.model.flat.tobytes()).hexdigest(), losses]
    except ValueError as e:
        out[precision] = str(e)
try:
    _train(1, "bf16", steps=1)
    out["bf16"] = "ran"
except ValueError as e:
    out["bf16"] = str(e)
print(json.dumps(out))
"""


@requires_mkl
def test_bf16_float32_training_is_bit_identical_with_mkl_absent_and_present_but_not_chosen():
    # float32 chosen (and auto at this small width) with MKL loaded, and with MKL kept out
    # (CLLMD_NO_MKL): the same weights to the bit. Without MKL, bf16 is refused by name.
    runs = {}
    for flag in ("", "1"):
        env = {**os.environ, "CLLMD_NO_MKL": flag}
        r = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT % os.path.dirname(__file__)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        runs[flag] = json.loads(r.stdout)
    with_mkl, without = runs[""], runs["1"]
    assert with_mkl["float32"] == without["float32"] == with_mkl["auto"] == without["auto"]
    assert with_mkl["float32"][0] == "float32"
    assert without["bf16"] == ("train.precision = bf16: bfloat16 products need Intel's MKL, which is not "
                               "loaded (CLLMD_NO_MKL is set)")
    if BF16_REASON is None:
        assert with_mkl["bf16"] == "ran"


def test_bf16_precision_auto_chooses_by_machine_and_width():
    from cllmd.model import Model, ModelConfig
    from cllmd.trainer import BF16_AUTO_MIN_WIDTH, choose_precision
    small = Model(ModelConfig(n_embd=32, n_head=2, n_layer=1, block_size=8), seed=0)
    wide = Model(ModelConfig(n_embd=BF16_AUTO_MIN_WIDTH, n_head=4, n_layer=1, block_size=8), seed=0)
    assert choose_precision("float32", wide.cfg.n_embd, wide.dtype)[0] == "float32"
    assert choose_precision("auto", small.cfg.n_embd, small.dtype)[0] == "float32"
    if BF16_REASON is None:
        assert choose_precision("auto", wide.cfg.n_embd, wide.dtype)[0] == "bf16"
        assert choose_precision("bf16", small.cfg.n_embd, small.dtype)[0] == "bf16"
    else:
        assert choose_precision("auto", wide.cfg.n_embd, wide.dtype) == ("float32", f"auto: {BF16_REASON}")
        with pytest.raises(ValueError, match="train.precision = bf16: "):
            choose_precision("bf16", wide.cfg.n_embd, wide.dtype)
    with pytest.raises(ValueError, match="train.precision must be"):
        choose_precision("fp8", wide.cfg.n_embd, wide.dtype)


# ---- weight gradients added straight into node zero's sum (cllmd.kernels.ordered) -----------

def _direct_layout(rng):
    """Three matrices [K, M] with rest elements between and around them: ranges, P, shapes."""
    shapes, ranges, at = [(48, 80), (80, 48), (16, 200)], [], 7
    for K, M in shapes:
        ranges.append((at, at + K * M))
        at += K * M + 5
    return shapes, np.array(ranges, np.int64), at + 3


@requires_bf16
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("tile", [500, 1 << 19], ids=["small-tiles", "whole"])
def test_bf16_direct_weight_gradients_are_the_row_commits_bit_for_bit_whatever_the_finishing_order(tile, packed):
    # 7 spheres on 3 threads, each sphere's matrices in its own random order and at random
    # delays: the sum must be exactly that of committing whole rows in sphere order
    import threading
    import time

    from cllmd.kernels import ordered
    from cllmd.reduction import OrderedGradientSum
    rng = np.random.default_rng(5)
    shapes, ranges, P = _direct_layout(rng)
    N, spheres = 32, list(range(1, 8))
    ops = {(s, m): (_bf16_bits(rng.normal(size=(N, K)) * 10.0 ** rng.uniform(-3, 3)),
                    _bf16_bits(rng.normal(size=(N, M)) * 10.0 ** rng.uniform(-3, 3)))
           for s in spheres for m, (K, M) in enumerate(shapes)}
    rest = {s: (rng.normal(size=P) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32) for s in spheres}

    def row_of(s):
        row = rest[s].copy()
        for m, ((K, M), (a, b)) in enumerate(zip(shapes, ranges)):
            blas.gemm_bf16(True, False, 1.0, *ops[s, m], 0.0, row[a:b].reshape(K, M))
        return row

    for overwrite in (True, False):
        start = rng.normal(size=P).astype(np.float32)
        expected = OrderedGradientSum(P, np.float32, rows=1)
        expected.grad[:] = start
        expected.begin(spheres, overwrite, norm=True)
        for s in spheres:
            row = expected.take(s)
            row[:] = row_of(s)
            expected.give(s, row)
        reversed_sum = start.copy() if not overwrite else np.zeros(P, np.float32)
        for s in spheres[::-1]:  # the wrong order gives other bits: the test can fail
            reversed_sum += row_of(s)
        assert not np.array_equal(reversed_sum, expected.grad)
        deferred = 0
        for seed in range(3):
            gs = OrderedGradientSum(P, np.float32, rows=3, direct=ranges)
            gs.grad[:] = start
            gs.begin(spheres, overwrite, norm=True, direct=True)
            delays = np.random.default_rng(seed).random((8, 4)) * 0.003
            delays[1 + seed, 1] = delays[4 + seed, 2] = 0.02  # late turns: later spheres defer
            orders = {s: np.random.default_rng(seed * 10 + s).permutation(3) for s in spheres}
            scratch = [np.empty(tile, np.float32) for _ in range(3)]
            # the gradient operand packed once per matrix (sized for the largest), or not
            pack = [np.empty(max(ordered.tile_pack_size(K, M, N, tile) for K, M in shapes) if packed else 0,
                             np.uint16) for _ in range(3)]

            def worker(t, ids):
                for s in ids:
                    row = gs.take(s)
                    sink = gs.sink(s)
                    row[:] = np.nan  # the direct matrices of a row are never read
                    for a, b in gs._rest:
                        row[a:b] = rest[s][a:b]
                    for i, m in enumerate(orders[s]):
                        time.sleep(delays[s, i])
                        (K, M), (a, b) = shapes[m], ranges[m]
                        ordered.weight_grad_h(row, a, K, M, *ops[s, m], *sink, m, scratch[t], pack[t])
                    ordered.flush_deferred(row, *sink)  # as the pass ends
                    gs.give(s, row)

            work = [spheres[i::3] for i in range(3)]
            threads = [threading.Thread(target=worker, args=(i, w)) for i, w in enumerate(work)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert np.array_equal(gs.grad.view(np.uint32), expected.grad.view(np.uint32)), (overwrite, seed)
            assert not gs.sumsq.any()  # left to finish(), on every thread
            deferred += gs.deferred
            gs.finish(lambda fns: [f() for f in fns])
            np.testing.assert_array_equal(gs.sumsq, expected.sumsq)
            assert gs.rows_allocated <= 3
        assert deferred > 0  # the deferring path ran (turns 20 ms late)


@requires_bf16
def test_bf16_direct_sphere_waiting_for_its_turn_defers_or_gives_up_when_the_micro_step_aborts():
    import threading

    from cllmd.kernels import ordered
    from cllmd.reduction import OrderedGradientSum
    rng = np.random.default_rng(6)
    shapes, ranges, P = _direct_layout(rng)
    gs = OrderedGradientSum(P, np.float32, rows=2, direct=ranges)
    gs.begin([1, 2], overwrite=True, norm=False, direct=True)
    first = gs.take(1)
    assert first is gs.grad and gs.sink(1)[2][1] == ordered.FIRST
    second = gs.take(2)
    sink = gs.sink(2)
    info = sink[2]
    assert info[1] == ordered.ADD
    before = gs.grad.copy()
    (K, M), (a, b) = shapes[0], ranges[0]
    inp, dout = _bf16_bits(rng.normal(size=(8, K))), _bf16_bits(rng.normal(size=(8, M)))
    # a zero-gradient sphere waits without a limit (add_zero_in_turn): the abort must end it
    zero_info = info.copy()  # (one sphere's info is its thread's alone)
    ordered.add_zero_in_turn(gs.grad, a, K * M, sink[1], np.array([1, ordered.ROW, 0, 0], np.int64), 0)  # compiled
    waiter = threading.Thread(target=ordered.add_zero_in_turn, args=(gs.grad, a, K * M, sink[1], zero_info, 0))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # sphere 1 has not added matrix 0: sphere 2 waits its turn
    # a weight gradient waits about as long as its product takes, then goes to the row
    ordered.weight_grad_h(second, a, K, M, inp, dout, *sink, 0, np.empty(ordered.TILE, np.float32),
                          np.empty(0, np.uint16))
    assert info[ordered.INFO] == ordered.DEFERRED and info[3] == 1
    assert ordered.flush_deferred(second, *sink) == 1  # still not its turn
    gs.give_back(first)
    gs.abort()  # sphere 1 failed
    waiter.join(10)
    assert not waiter.is_alive()
    assert ordered.flush_deferred(second, *sink) == 0  # aborted: nothing more to do
    assert np.array_equal(gs.grad, before)  # nothing was added
    # the waiting was counted (nanoseconds; the waiter's share depends on when its thread ran)
    assert zero_info[2] > 0 and info[2] >= ordered.DEFER_MIN_NS


@requires_bf16
def test_bf16_direct_sphere_without_counted_positions_adds_zeros_in_turn():
    # a fully masked sphere's row is zeros; committed, fl(-0 + 0) = +0: the direct path too
    from cllmd.model import Model, ModelConfig
    from cllmd.reduction import OrderedGradientSum
    m = Model(ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=12), seed=0)
    ws = m.workspace(1, 12, bf16=True)
    idx = np.arange(12).reshape(1, 12)
    gs = OrderedGradientSum(m.flat.size, np.float32, rows=1, direct=m.sink_ranges())
    gs.begin([1, 2], overwrite=False, norm=False, direct=True)
    gs.grad[:] = -0.0
    h = m.bf16_weights()
    for s in (1, 2):
        row = gs.take(s)
        m.forward_backward(ws, idx, idx, np.zeros((1, 12)), normalizer=1.0, grad=row, weights_h=h, sink=gs.sink(s))
        gs.give(s, row)
    assert np.all(gs.turns[:-1] == 2)  # both spheres took their turns
    assert not np.signbit(gs.grad).any() and not gs.grad.any()


@requires_bf16
@pytest.mark.parametrize("cfg", [dict(), dict(accum_steps=2), dict(grad_checkpointing=True)],
                         ids=["plain", "accum2", "checkpointed"])
def test_bf16_trainer_direct_weight_gradients_give_the_row_paths_weights_at_1_2_and_12_threads(cfg, monkeypatch):
    import cllmd.trainer
    from cllmd.reduction import OrderedGradientSum
    from cllmd.trainer import Trainer
    monkeypatch.setattr(cllmd.trainer, "DIRECT_MIN_PARAMS", 0)  # the small test model adds directly too

    rows_only = Trainer.__init__

    def init(self, *a, **kw):  # the trainer with every gradient through rows (as in MPI's chain)
        rows_only(self, *a, **kw)
        self.gradsum = OrderedGradientSum(self.model.flat.size, self.model.dtype, rows=self.pool.size)
        self.grad = self.gradsum.grad

    Trainer.__init__ = init
    try:
        expected, expected_losses = _train(2, "bf16", steps=3, **cfg)
    finally:
        Trainer.__init__ = rows_only
    assert not expected.gradsum._direct
    for threads in (1, 2, 12):
        tr, losses = _train(threads, "bf16", steps=3, **cfg)
        assert tr.gradsum._direct
        assert np.array_equal(tr.model.flat, expected.model.flat), f"{threads} threads"
        assert losses == expected_losses


@requires_bf16
def test_bf16_a_failing_sphere_fails_the_step_without_a_hang_and_training_goes_on_as_on_rows(monkeypatch):
    import cllmd.trainer
    from cllmd.model import Model, ModelConfig
    from cllmd.reduction import OrderedGradientSum
    from cllmd.tokensource import TokenArraySource
    from cllmd.trainer import TrainConfig, Trainer
    rng = np.random.default_rng(0)
    tokens = (np.arange(6000) % 37 + (rng.random(6000) < 0.1) * rng.integers(0, 3, 6000)) % 40
    cfg = ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=12)
    monkeypatch.setattr(cllmd.trainer, "DIRECT_MIN_PARAMS", 0)
    weights = []
    for direct in (True, False):
        tr = Trainer(Model(cfg, seed=0), TokenArraySource(tokens.astype(np.uint16), 0.1),
                     TrainConfig(batch_size=24, warmup=2, precision="bf16"), threads=2)
        if not direct:
            tr.gradsum = OrderedGradientSum(tr.model.flat.size, np.float32, rows=tr.pool.size)
            tr.grad = tr.gradsum.grad
        tr.step()
        assert tr.gradsum._direct == direct
        sphere, original = tr.spheres[4], tr.spheres[4].compute

        def broken(forward_only, ws, grad=None, sink=None):
            raise RuntimeError("sphere 5 broke")

        sphere.compute = broken
        with pytest.raises(RuntimeError, match="sphere 5 broke"):
            tr.step()  # spheres 6-12 wait for sphere 5's turns: the abort lets them go
        sphere.compute = original
        tr.step()
        tr.step()
        tr.close()
        weights.append(tr.model.flat)
    assert np.array_equal(*weights)


@requires_bf16
@pytest.mark.parametrize("T", [256, 1024])
def test_bf16_direct_tiles_at_gpt2_widths_give_the_rows_bits(T):
    # one layer of GPT-2 small's width: each matrix added into a zero sum in tiles of
    # ordered.TILE elements (several per matrix, odd row counts) equals the row's whole product
    from cllmd.model import Model, ModelConfig
    from cllmd.reduction import OrderedGradientSum
    m = Model(ModelConfig(vocab_size=257, n_layer=1, n_head=12, n_embd=768, block_size=T), seed=1)
    rng = np.random.default_rng(2)
    idx, targets = rng.integers(0, 257, (1, T)), rng.integers(0, 257, (1, T))
    ws, h = m.workspace(1, T, bf16=True), m.bf16_weights()
    row = np.full(m.flat.size, np.nan, np.float32)
    m.forward_backward(ws, idx, targets, normalizer=1.0, grad=row, weights_h=h)
    gs = OrderedGradientSum(m.flat.size, np.float32, rows=1, direct=m.sink_ranges())
    gs.begin([1, 2], overwrite=False, norm=False, direct=True)  # the sum starts at zero: 0 + g = g
    got = gs.take(1)
    m.forward_backward(ws, idx, targets, normalizer=1.0, grad=got, weights_h=h, sink=gs.sink(1))
    gs.give(1, got)
    assert np.array_equal(gs.grad.view(np.uint32), row.view(np.uint32))


def test_bf16_trainer_adds_weight_gradients_directly_only_from_direct_min_params():
    import cllmd.trainer
    tr, _ = _train(2, "bf16", steps=1)
    assert tr.model.flat.size < cllmd.trainer.DIRECT_MIN_PARAMS
    assert tr.gradsum.direct.shape[0] == 0 and not tr.gradsum._direct  # rows, as before


@requires_bf16
@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
def test_bf16_packed_weights_give_the_unpacked_passes_bits(checkpointing):
    # forward_backward and forward_loss reading the block matrices packed (PackedWeights, made
    # for another row count than the pass has) give the bits of the passes on weights_h; with
    # them, weights_h's block matrices are not read (here: zeros, only the head's written)
    from cllmd.model import Model, ModelConfig, PackedWeights
    m = Model(ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=12), seed=3)
    rng = np.random.default_rng(8)
    idx, targets = rng.integers(0, 40, (3, 12)), rng.integers(0, 40, (3, 12))
    mask = (rng.random(36) > 0.2).astype(np.float32)
    ws = m.workspace(3, 12, checkpointing=checkpointing, bf16=True)
    weights_h = m.bf16_weights()
    weights_p = PackedWeights(m, rows=24)
    weights_p.fill()
    head_only = m.bf16_weights(np.zeros_like(weights_h), (m.cfg.n_layer,))
    assert weights_p.at.shape == (8, 2, 2) and np.all(weights_p.at[:, :, 1] > weights_p.at[:, :, 0])
    assert weights_p.buf.ctypes.data % 64 == 0
    out = {}
    for name, wh, wp in (("plain", weights_h, None), ("packed", head_only, weights_p)):
        g = np.full(m.flat.size, np.nan, np.float32)
        loss = m.forward_backward(ws, idx, targets, mask, grad=g, weights_h=wh, weights_p=wp)
        out[name] = (loss, g, m.forward_loss(ws, idx, targets, mask, wh, wp), ws.losses.copy())
    assert out["packed"][0] == out["plain"][0] and out["packed"][2] == out["plain"][2]
    assert np.array_equal(out["packed"][1].view(np.uint32), out["plain"][1].view(np.uint32))
    assert np.array_equal(out["packed"][3], out["plain"][3])
    with pytest.raises(ValueError, match="need weights_h"):
        m.forward_backward(ws, idx, targets, mask, weights_p=weights_p)


@requires_bf16
def test_bf16_packed_weights_refill_allocates_no_rounding_scratch():
    # fill() rounds each layer through a scratch matrix its thread keeps: a fresh one per layer
    # and step (4 n_embd^2 bfloat16, 4.7 MB at width 768) was a fresh mapping under the
    # daemon's mmap threshold (cllmd/heap.py), ~13,800 page faults a step at the 85M shape
    import threading
    import tracemalloc
    from cllmd.model import Model, ModelConfig, PackedWeights
    m = Model(ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=64, block_size=12), seed=3)
    rng = np.random.default_rng(8)
    idx, targets = rng.integers(0, 40, (3, 12)), rng.integers(0, 40, (3, 12))
    ws = m.workspace(3, 12, bf16=True)
    head_only = m.bf16_weights(np.zeros(2 * m.flat.size, np.uint16), (m.cfg.n_layer,))
    weights_p = PackedWeights(m, rows=24)
    weights_p.fill()
    expected = m.forward_loss(ws, idx, targets, None, head_only, weights_p), ws.losses.copy()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        weights_p.fill()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 4 * 64 * 64 * 2, peak   # smaller than one scratch matrix
    # other threads round through scratch of their own: layers filled at once give the same
    # products (the packed bytes themselves differ in places from thread to thread, measured;
    # the products do not)
    threads = [threading.Thread(target=weights_p.fill, args=((part,),)) for part in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(weights_p._scratch) == 3
    assert m.forward_loss(ws, idx, targets, None, head_only, weights_p) == expected[0]
    assert np.array_equal(ws.losses, expected[1])


@requires_bf16
@pytest.mark.parametrize("cfg", [dict(), dict(grad_checkpointing=True)], ids=["plain", "checkpointed"])
def test_bf16_trainer_packed_weights_give_the_unpacked_weights_at_1_2_and_12_threads(cfg, monkeypatch):
    import cllmd.trainer
    expected, expected_losses = _train(2, "bf16", steps=3, **cfg)
    assert expected.weights_p is None  # the small model is below PACKED_MIN_PARAMS
    monkeypatch.setattr(cllmd.trainer, "PACKED_MIN_PARAMS", 0)
    for threads in (1, 2, 12):
        tr, losses = _train(threads, "bf16", steps=3, **cfg)
        assert tr.weights_p is not None
        assert np.array_equal(tr.model.flat, expected.model.flat), f"{threads} threads"
        assert losses == expected_losses
        assert tr.val_loss == expected.val_loss  # the evaluation's forward reads them too
