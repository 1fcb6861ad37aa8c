"""Every numba kernel against its numpy reference, forward and backward, float32 and float64."""
import math

import numpy as np
import pytest

from cllmd.kernels import adamw, attention, crossentropy, embedding, gelu, layernorm

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
    assert np.all(att_a[:, :, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)  # exact causal zeros
    dq_a, dq_r = np.ones_like(qkv), np.ones_like(qkv)
    attention.attention_backward(dq_a, dout, qkv, att_a, NH)
    attention.attention_backward_ref(dq_r, dout, qkv, att_r, NH)
    np.testing.assert_allclose(dq_a, dq_r, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_causal_softmax_matches_reference(dtype):
    rng = np.random.default_rng(3)
    pre = rand(rng, (2, 3, 7, 7), dtype, 5.0)
    a, r = pre.copy(), pre.copy()
    attention.causal_softmax_forward(a, 0.3)
    attention.causal_softmax_forward_ref(r, 0.3)
    np.testing.assert_allclose(a, r, **TOL[dtype])
    datt = rand(rng, pre.shape, dtype)
    da, dr = np.empty_like(a), np.empty_like(a)
    attention.causal_softmax_backward(da, datt, a, 0.3)
    attention.causal_softmax_backward_ref(dr, datt, r, 0.3)
    np.testing.assert_allclose(da, dr, **TOL[dtype])


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
            update(p, rand(rng2, n, dtype), m, v, 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
        states.append((p, m, v))
    for a, r in zip(*states):
        np.testing.assert_allclose(a, r, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)


def test_kernels_sum_rows_is_fixed_order_and_chunk_independent():
    rng = np.random.default_rng(7)
    rows = rand(rng, (12, 10007), np.float32)
    used = np.array([0, 3, 4, 11])
    a, r = np.zeros(10007, np.float32), np.zeros(10007, np.float32)
    adamw.sum_rows_into(a, rows, used, 0, 5000)
    adamw.sum_rows_into(a, rows, used, 5000, 10007)
    adamw.sum_rows_into_ref(r, rows, used, 0, 10007)
    np.testing.assert_array_equal(a, r)  # bit-identical, however the range is chunked
