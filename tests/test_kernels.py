"""Every numba kernel against its numpy reference, forward and backward, float32 and float64."""
import math

import numpy as np
import pytest

from cllmd.kernels import adamw, attention, blas, crossentropy, embedding, gelu, layernorm, linear, transformer, vecmath

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def rand(rng, shape, dtype, scale=1.0):
    return (rng.normal(size=shape) * scale).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_layernorm_matches_reference(dtype):
    rng = np.random.default_rng(0)
    N, C = 37, 48
    inp, w, b, dout = rand(rng, (N, C), dtype, 3.0), rand(rng, C, dtype), rand(rng, C, dtype), rand(rng, (N, C), dtype)
    outs = []
    for fwd in (layernorm.layernorm_forward, layernorm.layernorm_forward_ref):
        out, mean, rstd = np.empty((N, C), dtype), np.empty(N, dtype), np.empty(N, dtype)
        fwd(out, mean, rstd, inp, w, b, 1e-5)
        outs.append((out, mean, rstd))
    for a, r in zip(outs[0], outs[1]):
        np.testing.assert_allclose(a, r, **TOL[dtype])
    grads = []
    for bwd in (layernorm.layernorm_backward, layernorm.layernorm_backward_ref):
        dinp, dw, db = np.ones((N, C), dtype), np.ones(C, dtype), np.ones(C, dtype)  # accumulate onto 1
        bwd(dinp, dw, db, dout, inp, w, outs[1][1], outs[1][2])
        grads.append((dinp, dw, db))
    for a, r in zip(grads[0], grads[1]):
        np.testing.assert_allclose(a, r, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_gelu_matches_reference(dtype):
    rng = np.random.default_rng(1)
    x = rand(rng, (33, 70), dtype, 4.0)
    x[0, :6] = [0.0, -12.0, 12.0, 1e-4, -9.0, 8.5]  # zero, saturation, tiny
    dout = rand(rng, x.shape, dtype)
    a, r = np.empty_like(x), np.empty_like(x)
    # float32 uses a rational tanh with |error| < 4e-7; in the tails 1 +- tanh cancels, so the
    # bound there is absolute and grows with |x| (0.5 |x| * 4e-7), not relative
    slack = 0.0 if dtype == np.float64 else 5e-7 * (1.0 + np.abs(x))
    gelu.gelu_forward(a, x)
    gelu.gelu_forward_ref(r, x)
    assert np.all(np.abs(a - r) <= TOL[dtype]["rtol"] * np.abs(r) + TOL[dtype]["atol"] + slack)
    gelu.gelu_backward(a, x, dout)
    gelu.gelu_backward_ref(r, x, dout)
    assert np.all(np.abs(a - r) <= TOL[dtype]["rtol"] * np.abs(r) + TOL[dtype]["atol"] + slack * np.abs(dout))


def test_kernels_gelu_derivative_matches_finite_differences():
    x = np.linspace(-6.0, 6.0, 241)
    out, deriv, up, down = (np.empty_like(x) for _ in range(4))
    gelu.gelu_forward_grad(out, deriv, x)
    h = 1e-6
    gelu.gelu_forward(up, x + h)
    gelu.gelu_forward(down, x - h)
    np.testing.assert_allclose(deriv, (up - down) / (2 * h), rtol=1e-7, atol=1e-8)
    # GPT-2's formula, as its paper writes it
    expected = [0.5 * v * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3))) for v in x]
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-15)


def test_kernels_tanh_f32_is_accurate():
    x = np.linspace(-20, 20, 200001).astype(np.float32)
    err = max(abs(float(gelu.tanh_f32(v)) - math.tanh(float(v))) for v in x[::97])
    assert err < 5e-7


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_attention_matches_reference(dtype):
    rng = np.random.default_rng(2)
    B, T, C, NH = 3, 9, 12, 3
    qkv = rand(rng, (B, T, 3 * C), dtype, 2.0)
    dout = rand(rng, (B, T, C), dtype)
    out_a, att_a = np.empty((B, T, C), dtype), np.empty((B, NH, T, T), dtype)
    out_r, att_r = np.empty_like(out_a), np.empty_like(att_a)
    attention.attention_forward(out_a, att_a, qkv, NH)
    attention.attention_forward_ref(out_r, att_r, qkv, NH)
    np.testing.assert_allclose(out_a, out_r, **TOL[dtype])
    np.testing.assert_allclose(att_a, att_r, **TOL[dtype])
    # att[b, h, s, t]: key s, query t; exact zeros where a query would see a later key
    below = np.tril_indices(T, -1)
    assert np.all(att_a[:, :, below[0], below[1]] == 0)
    np.testing.assert_allclose(att_a.sum(axis=2), 1.0, rtol=1e-6)  # each query's weights sum to 1
    dq_a, dq_r = np.full_like(qkv, np.nan), np.full_like(qkv, np.nan)  # written whole, never read
    attention.attention_backward(dq_a, dout, qkv, att_a, NH)
    attention.attention_backward_ref(dq_r, dout, qkv, att_r, NH)
    np.testing.assert_allclose(dq_a, dq_r, **TOL[dtype])


def test_kernels_attention_is_stable_for_large_scores():
    rng = np.random.default_rng(3)
    B, T, C, NH = 1, 7, 8, 2
    qkv = rand(rng, (B, T, 3 * C), np.float32, 60.0)  # scores in the thousands: exp would overflow unshifted
    out, att = np.empty((B, T, C), np.float32), np.empty((B, NH, T, T), np.float32)
    out_r, att_r = np.empty((B, T, C)), np.empty((B, NH, T, T))
    attention.attention_forward(out, att, qkv, NH)
    attention.attention_forward_ref(out_r, att_r, qkv.astype(np.float64), NH)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(att))
    np.testing.assert_allclose(att, att_r, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_crossentropy_matches_reference(dtype):
    rng = np.random.default_rng(4)
    N, V = 29, 41
    logits = rand(rng, (N, V), dtype, 10.0)
    targets = rng.integers(0, V, N)
    p_a, l_a = np.empty_like(logits), np.empty(N, dtype)
    p_r, l_r = np.empty_like(logits), np.empty(N, dtype)
    crossentropy.crossentropy_forward(p_a, l_a, logits, targets)
    crossentropy.crossentropy_forward_ref(p_r, l_r, logits, targets)
    np.testing.assert_allclose(p_a, p_r, **TOL[dtype])
    np.testing.assert_allclose(l_a, l_r, **TOL[dtype])
    in_place = logits.copy()
    l_i = np.empty(N, dtype)
    crossentropy.crossentropy_forward(in_place, l_i, in_place, targets)  # probs aliasing logits
    np.testing.assert_allclose(in_place, p_r, **TOL[dtype])
    np.testing.assert_allclose(l_i, l_r, **TOL[dtype])
    w = rng.random(N).astype(dtype)
    d_a, d_r = np.empty_like(logits), np.empty_like(logits)
    crossentropy.crossentropy_backward(d_a, p_a, targets, w)
    crossentropy.crossentropy_backward_ref(d_r, p_r, targets, w)
    np.testing.assert_allclose(d_a, d_r, **TOL[dtype])


def test_kernels_crossentropy_extreme_logits_stay_finite():
    logits = np.array([[1000.0, -1000.0, 0.0], [-1e4, 1e4, 0.0]], dtype=np.float32)
    probs, losses = np.empty_like(logits), np.empty(2, np.float32)
    crossentropy.crossentropy_forward(probs, losses, logits, np.array([1, 1]))
    assert np.all(np.isfinite(losses)) and losses[0] == pytest.approx(2000.0) and losses[1] == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_embedding_matches_reference(dtype):
    rng = np.random.default_rng(5)
    B, T, V, C = 3, 5, 7, 4
    idx = rng.integers(0, V, (B, T))
    idx[0, :] = 2  # repeated tokens must accumulate
    wte, wpe = rand(rng, (V, C), dtype), rand(rng, (8, C), dtype)
    a, r = np.empty((B, T, C), dtype), np.empty((B, T, C), dtype)
    embedding.embedding_forward(a, idx, wte, wpe, 2)
    embedding.embedding_forward_ref(r, idx, wte, wpe, 2)
    np.testing.assert_allclose(a, r, **TOL[dtype])
    dout = rand(rng, (B, T, C), dtype)
    grads = []
    for bwd in (embedding.embedding_backward, embedding.embedding_backward_ref):
        dwte, dwpe = np.ones((V, C), dtype), np.ones((8, C), dtype)
        bwd(dwte, dwpe, dout, idx, 2)
        grads.append((dwte, dwpe))
    for x, y in zip(*grads):
        np.testing.assert_allclose(x, y, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_adamw_matches_reference(dtype):
    rng = np.random.default_rng(6)
    n = 1000
    states = []
    for update in (adamw.adamw_update, adamw.adamw_update_ref):
        p, m, v = rand(rng, n, dtype), np.zeros(n, dtype), np.zeros(n, dtype)
        rng2 = np.random.default_rng(9)
        p[:] = np.random.default_rng(8).normal(size=n)
        for step in range(1, 6):
            update(p, rand(rng2, n, dtype), m, v, 1e-2, 0.9, 0.95, 1e-8, 0.1, step, 0.5)
        states.append((p, m, v))
    for a, r in zip(*states):
        np.testing.assert_allclose(a, r, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)


def test_kernels_add_row_into_adds_in_commit_order_and_squares_fixed_blocks():
    rng = np.random.default_rng(7)
    P = 3 * adamw.REDUCE_BLOCK + 1007
    rows = rand(rng, (4, P), np.float32)
    blocks = -(-P // adamw.REDUCE_BLOCK)
    a, r = rows[0].copy(), rows[0].copy()
    sq_a, sq_r = np.zeros(blocks), np.zeros(blocks)
    for k in range(1, 4):
        last = k == 3
        adamw.add_row_into(a, rows[k], True, sq_a if last else sq_a[:0])
        adamw.add_row_into_ref(r, rows[k], True, sq_r if last else sq_r[:0])
    expected = rows[0].copy()
    for k in range(1, 4):  # the same additions, in the same order: equal bits
        expected += rows[k]
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(r, expected)
    np.testing.assert_allclose(sq_a, sq_r, rtol=1e-6)
    assert float(sq_a.sum()) == pytest.approx(float(np.dot(expected.astype(np.float64), expected)), rel=1e-6)
    before = a.copy()
    adamw.add_row_into(a, a, False, sq_a)  # squares only (the first sphere wrote into the sum)
    np.testing.assert_array_equal(a, before)


def test_kernels_gemm_and_naive_gemm_match_numpy_for_every_transpose_and_stride():
    assert blas.AVAILABLE, "numpy's BLAS should expose a CBLAS gemm on this platform"
    rng = np.random.default_rng(10)
    for dtype in DTYPES:
        for ta in (False, True):
            for tb in (False, True):
                M, N, K = 5, 7, 6
                a = rand(rng, (9, 11), dtype)[:K, 2:2 + M] if ta else rand(rng, (9, 11), dtype)[:M, 1:1 + K]
                b = rand(rng, (8, 12), dtype)[:N, 3:3 + K] if tb else rand(rng, (8, 12), dtype)[:K, :N]
                c0 = rand(rng, (M, 10), dtype)[:, 2:2 + N]
                c, r = c0.copy(), c0.copy()
                blas.gemm(ta, tb, 0.5, a, b, 2.0, c)
                blas.gemm_ref(ta, tb, 0.5, a, b, 2.0, r)
                np.testing.assert_allclose(c, r, **TOL[dtype])
                c[...] = np.nan  # beta = 0: c is never read
                blas.gemm(ta, tb, 1.0, a, b, 0.0, c)
                blas.gemm_ref(ta, tb, 1.0, a, b, 0.0, r)
                np.testing.assert_allclose(c, r, **TOL[dtype])
                for beta in (2.0, 0.0):  # the naive fallback, on the same operands
                    n, r = c0.copy(), c0.copy()
                    if beta == 0.0:
                        n[...] = np.nan
                    blas.gemm_naive(ta, tb, 0.5, a, b, beta, n)
                    blas.gemm_ref(ta, tb, 0.5, a, b, beta, r)
                    np.testing.assert_allclose(n, r, **TOL[dtype])


NO_BF16 = np.empty((0, 0), np.uint16)  # "no bfloat16 operand": the float32 products


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_linear_matches_reference(dtype):
    rng = np.random.default_rng(11)
    N, K, M = 13, 6, 10
    inp, w, b, res = rand(rng, (N, K), dtype), rand(rng, (K, M), dtype), rand(rng, M, dtype), rand(rng, (N, M), dtype)
    for residual in (res, np.empty((0, M), dtype)):
        a, r = np.full((N, M), np.nan, dtype), np.full((N, M), np.nan, dtype)
        linear.linear_forward(a, inp, w, b, residual, NO_BF16, NO_BF16)
        linear.linear_forward_ref(r, inp, w, b, residual, NO_BF16, NO_BF16)
        np.testing.assert_allclose(a, r, **TOL[dtype])
    dout = rand(rng, (N, M), dtype)
    w_t = np.empty((M, K), dtype)
    linear.transpose(w_t, w)
    np.testing.assert_array_equal(w_t, w.T)
    results = []
    for bwd, weight_t in ((linear.linear_backward, np.empty((0, 0), dtype)), (linear.linear_backward, w_t),
                          (linear.linear_backward_ref, np.empty((0, 0), dtype))):
        dinp, dw, db = np.full((N, K), np.nan, dtype), np.full((K, M), np.nan, dtype), np.full(M, np.nan, dtype)
        bwd(dinp, dw, db, dout, inp, w, weight_t, NO_BF16, NO_BF16, NO_BF16)
        results.append((dinp, dw, db))
    for got in results[:2]:
        for x, y in zip(got, results[2]):
            np.testing.assert_allclose(x, y, **TOL[dtype])


@pytest.mark.parametrize("rows", [20, 64, 80], ids=["tiled", "tiled-edge", "whole"])
def test_kernels_weight_grad_matches_reference_across_tiles(rows):
    rng = np.random.default_rng(15)
    inp, dout = rand(rng, (rows, 300), np.float32), rand(rng, (rows, 150), np.float32)  # 3 x 3 tiles, ragged
    a, r = np.full((300, 150), np.nan, np.float32), np.empty((300, 150), np.float32)
    linear.weight_grad(a, inp, dout)
    linear.weight_grad_ref(r, inp, dout)
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)
    b = np.empty_like(a)
    linear.weight_grad(b, inp, dout)
    np.testing.assert_array_equal(a, b)  # the same tiles every call: deterministic


def test_kernels_transpose_matches_reference_on_ragged_tiles():
    rng = np.random.default_rng(12)
    x = rand(rng, (37, 50), np.float32)
    a, r = np.empty((50, 37), np.float32), np.empty((50, 37), np.float32)
    linear.transpose(a, x)
    linear.transpose_ref(r, x)
    np.testing.assert_array_equal(a, r)


def test_kernels_exp_f32_is_accurate_and_keeps_special_values():
    x = np.linspace(-87.0, 88.0, 400001).astype(np.float32)[::41]
    got = np.array([vecmath.exp_f32(v) for v in x], dtype=np.float32)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 3e-7
    assert vecmath.exp_f32(np.float32(0.0)) == 1.0
    assert vecmath.exp_f32(np.float32(-np.inf)) == 0.0 and vecmath.exp_f32(np.float32(-100.0)) == 0.0
    assert vecmath.exp_f32(np.float32(np.inf)) == np.inf
    assert np.isnan(vecmath.exp_f32(np.float32(np.nan)))
    assert vecmath.exp_f32(np.float32(1.5)) == pytest.approx(vecmath.exp_f32_ref(np.float32(1.5)), rel=3e-7)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 257, 768])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_lane_sums_follow_their_documented_order_bit_for_bit(n, dtype):
    rng = np.random.default_rng(n)
    a, b = rand(rng, n, dtype, 3.0), rand(rng, n, dtype, 2.0)
    ca, cb = dtype(0.25), dtype(-1.5)
    assert vecmath.row_sum(a) == vecmath.lane_order_sum_ref(a)
    assert vecmath.row_dot_centered(a, ca, b, cb) == vecmath.lane_order_sum_ref((a - ca) * (b - cb))
    assert vecmath.row_dot_centered(a, dtype(0), b, dtype(0)) == vecmath.lane_order_sum_ref(a * b)
    assert vecmath.row_dot(a, b) == vecmath.lane_order_sum_ref(a * b, vecmath.DOT_LANES)
    rows = rand(rng, (3, n), dtype, 1.0)  # a row of a matrix is a row too
    assert vecmath.row_sum(rows[1]) == vecmath.lane_order_sum_ref(rows[1])
    if n:
        assert vecmath.row_sum(a) == pytest.approx(float(a.astype(np.float64).sum()), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 257])
def test_kernels_row_reductions_match_reference(n):
    rng = np.random.default_rng(n)
    x = rand(rng, n, np.float32, 3.0)
    assert vecmath.row_max(x) == vecmath.row_max_ref(x)  # a max is exact in any order
    assert vecmath.row_sum(x) == pytest.approx(float(vecmath.row_sum_ref(x)), rel=1e-5, abs=1e-5)
    assert vecmath.row_sumsq64(x) == pytest.approx(vecmath.row_sumsq64_ref(x), rel=1e-6)
    assert vecmath.row_sumsq64(x.astype(np.float64)) == pytest.approx(vecmath.row_sumsq64_ref(x), rel=1e-13)
    x64 = x.astype(np.float64)
    assert vecmath.row_sum(x64) == pytest.approx(vecmath.row_sum_ref(x64), rel=1e-13, abs=1e-13)
    x[n // 2] = np.nan
    assert np.isnan(vecmath.row_sum(x)) and np.isnan(vecmath.row_sumsq64(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_gelu_forward_grad_matches_reference_and_backward(dtype):
    rng = np.random.default_rng(13)
    x = rand(rng, (17, 40), dtype, 4.0)
    out, deriv, out_r, deriv_r = (np.empty_like(x) for _ in range(4))
    gelu.gelu_forward_grad(out, deriv, x)
    gelu.gelu_forward_grad_ref(out_r, deriv_r, x)
    slack = 0.0 if dtype == np.float64 else 5e-7 * (1.0 + np.abs(x))
    assert np.all(np.abs(out - out_r) <= TOL[dtype]["rtol"] * np.abs(out_r) + TOL[dtype]["atol"] + slack)
    assert np.all(np.abs(deriv - deriv_r) <= TOL[dtype]["rtol"] * np.abs(deriv_r) + TOL[dtype]["atol"] + slack)
    plain = np.empty_like(x)
    gelu.gelu_forward(plain, x)
    np.testing.assert_array_equal(out, plain)  # the same forward values as gelu_forward
    dout = rand(rng, x.shape, dtype)
    bwd = np.empty_like(x)
    gelu.gelu_backward(bwd, x, dout)
    via_deriv = dout.copy()
    gelu.mul_inplace(via_deriv, deriv)
    np.testing.assert_allclose(via_deriv, bwd, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"])
    ref = dout.copy()
    gelu.mul_inplace_ref(ref, deriv)
    np.testing.assert_array_equal(via_deriv, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
def test_kernels_transformer_passes_agree_with_each_other_and_the_op_references(dtype, checkpointing):
    # the whole pass is written once (its oracle: finite differences and PyTorch, tests/test_model.py);
    # here its variants agree (transposed weights, checkpointing, the head in chunks of rows),
    # and its head matches the cross-entropy reference
    from cllmd.model import Model, ModelConfig, Workspace
    cfg = ModelConfig(vocab_size=19, n_layer=3, n_head=2, n_embd=8, block_size=7, clock_positions=True)
    m = Model(cfg, seed=2, dtype=dtype)
    rng = np.random.default_rng(14)
    m.flat += rng.normal(0.0, 0.3, m.flat.shape).astype(dtype)  # away from the init's symmetric point
    B, T = 2, 6
    idx, targets = rng.integers(0, 19, (B, T)), rng.integers(0, 19, (B, T))
    mask = (rng.random(B * T) > 0.25).astype(dtype)
    wpe = m.params["wpe"] + m.clock
    flat_t = m.transposed_weights()
    outs = []
    variants = ((flat_t, checkpointing, None), (m.flat[:0], checkpointing, None), (m.flat[:0], not checkpointing, None),
                (flat_t, checkpointing, 5), (m.flat[:0], checkpointing, 1))  # the fused head in chunks of 5, 1 rows
    for weights_t, ck, head_rows in variants:
        ws = Workspace(cfg, B, T, dtype, checkpointing=ck, head_rows=head_rows)
        assert ws.logits.shape == (head_rows or B * T, cfg.vocab_size)
        ws.grad_flat[:] = np.nan  # every gradient must be written
        total = transformer.model_forward_backward(ws.buffers, idx, targets, mask, 0.25, m.flat, weights_t,
                                                   NO_BF16.reshape(0), NO_BF16.reshape(0), m._no_pack_at, m.offsets,
                                                   wpe, cfg.n_head, ws.grad_flat, m._row_sink)
        outs.append((total, ws.losses.copy(), ws.residual3.copy(), ws.grad_flat.copy()))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-6)
    assert not np.isnan(outs[0][3]).any()
    for got in outs[1:]:
        assert got[0] == pytest.approx(outs[0][0], rel=tol["rtol"])
        for x, y in zip(got[1:], outs[0][1:]):
            np.testing.assert_allclose(x, y, **tol)
    # forward only: logits whose cross-entropy (numpy reference) gives the losses above
    ws = Workspace(cfg, B, T, dtype)
    transformer.model_forward(ws.buffers, idx, m.flat, flat_t, m.offsets, wpe, cfg.n_head)
    probs, losses = np.empty_like(ws.logits), np.empty(B * T, dtype)
    crossentropy.crossentropy_forward_ref(probs, losses, ws.logits.copy(), targets.reshape(-1))
    np.testing.assert_allclose(losses, outs[0][1], **tol)
    assert float((losses.astype(np.float64) * mask).sum()) == pytest.approx(outs[0][0], rel=tol["rtol"])
    # forward and loss only: the same total
    ws = Workspace(cfg, B, T, dtype)
    total = transformer.model_forward_loss(ws.buffers, idx, targets, mask, m.flat, m.flat[:0], NO_BF16.reshape(0),
                                           NO_BF16.reshape(0), m._no_pack_at, m.offsets, wpe, cfg.n_head)
    assert total == pytest.approx(outs[0][0], rel=tol["rtol"])


def test_kernels_transpose_weights_transposes_each_matrix_in_place():
    from cllmd.model import Model, ModelConfig
    cfg = ModelConfig(vocab_size=11, n_layer=2, n_head=2, n_embd=20, block_size=5)
    m = Model(cfg, seed=3)
    a = np.zeros_like(m.flat)
    for part in range(cfg.n_layer + 1):  # the layers, then the token embedding
        transformer.transpose_weights(a, m.flat, m.offsets, part, cfg.n_embd)
    np.testing.assert_array_equal(a, m.transposed_weights())
    expected = np.zeros_like(m.flat)
    at = 0
    for name, shape in m.table:
        n = math.prod(shape)
        if len(shape) == 2 and name != "wpe":  # the weight matrices and the tied head's wte
            expected[at:at + n] = m.params[name].T.reshape(-1)
        at += n
    np.testing.assert_array_equal(a, expected)
