"""Generation: KV cache equals recomputation, sampling options, stop strings, UTF-8 streaming."""
import threading

import numpy as np
import pytest

from cllmd.generate import Decoder, Generation, SamplingOptions, StopMatcher, generate, sample_next
from cllmd.model import Model, ModelConfig
from cllmd.tokenizer import BytesTokenizer


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=257, n_layer=2, n_head=2, n_embd=32, block_size=16)
    m = Model(cfg, seed=0, tokenizer=BytesTokenizer())
    m.flat += np.random.default_rng(0).normal(0, 0.2, m.flat.shape).astype(np.float32)  # non-trivial outputs
    return m


def _greedy_by_recomputation(model, ids, n):
    """The reference: full forward over the context at each step, with the same window policy."""
    block = model.cfg.block_size
    history = list(ids)
    context = history[-block:]
    out = []
    for _ in range(n):
        logits = model.forward(np.array([context]))[0, -1]
        token = int(np.argmax(logits))
        out.append(token)
        history.append(token)
        context = history[-(block // 2):] if len(context) == block else context + [token]
    return out


@pytest.mark.parametrize("n", [10, 40], ids=["within-context", "sliding-window"])
def test_generate_kv_cache_equals_recomputation(model, n):
    ids = [int(i) for i in model.tokenizer.encode("The cat")]
    g = Generation(model, ids, SamplingOptions(temperature=0, max_tokens=n, stop_at_eot=False))
    g.text()
    assert g.stats.token_ids == _greedy_by_recomputation(model, ids, n)
    assert g.stats.tokens_generated == n and g.stats.stop_reason == "max_tokens"


def test_generate_seed_reproduces_text(model):
    opts = dict(temperature=1.0, top_k=50, top_p=0.9, max_tokens=30, seed=42, stop_at_eot=False)
    a = generate(model, "abc", **opts)
    b = generate(model, "abc", **opts)
    assert a.text() == b.text()
    assert a.stats.token_ids == b.stats.token_ids
    c = generate(model, "abc", **{**opts, "seed": 43})
    c.text()
    assert c.stats.token_ids != a.stats.token_ids


def _biased_model(favoured: list[int]) -> Model:
    """A model whose next-token distribution is (nearly) uniform over `favoured` ids."""
    cfg = ModelConfig(vocab_size=257, n_layer=1, n_head=1, n_embd=8, block_size=32)
    m = Model(cfg, seed=0, tokenizer=BytesTokenizer())
    u = np.zeros(8, np.float32)
    u[0] = 6.0  # logit gap of 36 over every other token
    m.params["wte"][favoured] = u
    m.params["ln_f.weight"][:] = 0.0   # the final hidden state is the bias: logits = wte @ bias
    m.params["ln_f.bias"][:] = u
    return m


def test_generate_pieces_never_split_utf8():
    # tokens drawn from the bytes of multi-byte characters: streaming must give exactly what
    # decoding all bytes at once gives (a split character would show up as U+FFFD)
    favoured = list("€é".encode("utf-8"))
    m = _biased_model(favoured)
    g = Generation(m, "x", SamplingOptions(temperature=1.0, max_tokens=300, seed=3, stop_at_eot=False))
    pieces = list(g)
    assert set(g.stats.token_ids) <= set(favoured)
    assert "".join(pieces) == bytes(g.stats.token_ids).decode("utf-8", errors="replace")
    assert "€" in "".join(pieces) and "é" in "".join(pieces)


def test_generate_stop_strings_end_output_before_them(model):
    g = generate(model, "x", temperature=0, max_tokens=40, stop_at_eot=False)
    full = g.text()
    assert len(full) > 6
    stop = full[3:5]
    g2 = generate(model, "x", temperature=0, max_tokens=40, stop=[stop], stop_at_eot=False)
    text = g2.text()
    assert text == full[:full.find(stop)]
    assert g2.stats.stop_reason == "stop"


def test_generate_stop_matcher_holds_back_prefixes():
    m = StopMatcher(("END",))
    assert m.feed("abcE") == ("abc", False)
    assert m.feed("N") == ("", False)
    assert m.feed("X") == ("ENX", False)
    assert m.feed("..EN") == ("..", False)
    assert m.feed("D tail") == ("", True)


def test_generate_cancel_stops_with_reason(model):
    cancel = threading.Event()
    g = generate(model, "a", cancel=cancel, temperature=0.5, max_tokens=1000, seed=1, stop_at_eot=False)
    next(g, None)
    cancel.set()
    rest = list(g)
    assert g.stats.stop_reason == "cancelled"
    assert g.stats.tokens_generated < 1000
    del rest


def test_generate_eot_stops():
    m = _biased_model([256])  # end-of-text is the likeliest token
    g = generate(m, "hello", temperature=0, max_tokens=20)
    g.text()
    assert g.stats.stop_reason == "eot" and g.stats.tokens_generated == 0


def test_generate_sampling_filters():
    rng = np.random.default_rng(0)
    logits = np.array([5.0, 4.0, 1.0, 0.0, -1.0])
    greedy = SamplingOptions(temperature=0)
    assert sample_next(logits, greedy, rng, []) == 0
    top1 = SamplingOptions(temperature=1.0, top_k=1)
    assert {sample_next(logits, top1, rng, []) for _ in range(20)} == {0}
    nucleus = SamplingOptions(temperature=1.0, top_p=0.5)
    assert {sample_next(logits, nucleus, rng, []) for _ in range(30)} == {0}
    minp = SamplingOptions(temperature=1.0, min_p=0.3)  # keeps tokens within 0.3 of the top
    assert {sample_next(logits, minp, rng, []) for _ in range(50)} <= {0, 1}
    penalty = SamplingOptions(temperature=0, repeat_penalty=10.0)
    assert sample_next(logits, penalty, rng, [0]) == 1


@pytest.mark.parametrize("V", [5, 257, 4096])
def test_sample_rows_matches_reference(V):
    """The batched sampling kernel picks, row by row, the token of the numpy reference, with
    every option mixed across the rows of one call (greedy rows draw nothing)."""
    from cllmd.kernels.sampling import sample_row_ref, sample_rows
    rng = np.random.default_rng(V)
    S = 64
    logits = (rng.normal(0, 3, (S, V))).astype(np.float32)
    logits[3, :] = logits[3, 0]      # all tied: greedy takes the first, sampling any
    temperature = rng.choice([0.0, 0.5, 1.0, 1.7], S)
    top_k = rng.choice([0, 1, 3, V // 2, V + 5], S)
    top_p = rng.choice([1.0, 0.9, 0.3, 0.01], S)
    min_p = rng.choice([0.0, 0.05, 0.5], S)
    penalty = rng.choice([1.0, 1.3, 0.7], S)
    recent = [list(rng.integers(0, V, rng.integers(0, 20))) for _ in range(S)]
    flat = np.array([t for r in recent for t in r], np.int64)
    offsets = np.cumsum([0] + [len(r) for r in recent]).astype(np.int64)
    u = rng.random(S)
    tokens = np.empty(S, np.int64)
    sample_rows(tokens, logits, temperature, top_k, top_p, min_p, penalty, flat, offsets, u)
    want = [sample_row_ref(logits[s], temperature[s], top_k[s], top_p[s], min_p[s], penalty[s], recent[s], u[s])
            for s in range(S)]
    assert tokens.tolist() == want
    assert all(0 <= t < V for t in want)
    from cllmd.kernels.sampling import _sample_rows_parallel, _sample_rows_serial, sampling_scratch
    for rows in (_sample_rows_serial, _sample_rows_parallel):  # (a batch's rows on the threads or not)
        again = np.empty(S, np.int64)
        rows(again, logits, temperature, top_k, top_p, min_p, penalty, flat, offsets, u, V, *sampling_scratch(S, V))
        assert again.tolist() == want
    # the first V columns of a wider buffer (the int8 head's padded logits), read in place
    wide = np.full((S, V + 11), 1e30, np.float32)
    wide[:, :V] = logits
    again = np.empty(S, np.int64)
    sample_rows(again, wide, temperature, top_k, top_p, min_p, penalty, flat, offsets, u, vocab=V)
    assert again.tolist() == want


def test_generate_rejects_bad_options():
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingOptions(temperature=-1)
    with pytest.raises(ValueError, match="stop"):
        SamplingOptions(stop=("",))


# ---- the prompt in one pass, int8 weights, batched decoding ------------------------------------------

def _logits_token_by_token(model, weights, ids):
    dec = Decoder(model, weights)
    out = [dec.prefill(ids[:1])]
    out += [dec.step(t) for t in ids[1:]]
    return np.array(out)


def _mkl():
    from cllmd.kernels import blas
    return blas.MKL_AVAILABLE


NEEDS_MKL = pytest.mark.skipif("not _mkl()", reason="bf16 weights need MKL (the extra cllmd[mkl])")
WEIGHTS = ["float32", "int8", pytest.param("bf16", marks=NEEDS_MKL)]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_prompt_pass_equals_token_by_token(model, weights):
    ids = [int(i) for i in model.tokenizer.encode("To be or not")]
    steps = _logits_token_by_token(model, weights, ids)
    dec = Decoder(model, weights)
    prompt = dec.prefill(ids)
    assert dec.cache.length == len(ids)
    if weights != "float32":  # below GEMM_ROWS positions each row's arithmetic is its own: exactly equal
        np.testing.assert_array_equal(prompt, steps[-1])
    else:                  # BLAS may block a product of many rows differently from one row
        np.testing.assert_allclose(prompt, steps[-1], rtol=1e-5, atol=1e-5)
    # the whole prompt pass agrees with the training forward at every position (float32)
    if weights == "float32":
        np.testing.assert_allclose(steps, model.forward(np.array([ids]))[0], rtol=1e-4, atol=1e-4)


def test_int8_logits_close_to_float32(model):
    """int8 weights and activations (groups of 32): logits within 3% of the logits' range."""
    ids = [int(i) for i in model.tokenizer.encode("The quick fox")]
    f32 = _logits_token_by_token(model, "float32", ids)
    i8 = _logits_token_by_token(model, "int8", ids)
    spread = f32.max() - f32.min()
    assert np.abs(i8 - f32).max() <= 0.03 * spread
    assert (i8.argmax(axis=1) == f32.argmax(axis=1)).mean() >= 0.75


@NEEDS_MKL
def test_bf16_logits_close_to_float32():
    """bf16 weights (activations float32): logits within 2% of the logits' range, step by step
    and through a prompt's pass (MKL's gemm_bf16 from GEMM_ROWS rows on)."""
    from cllmd.kernels.kvattention import GEMM_ROWS
    cfg = ModelConfig(vocab_size=257, n_layer=2, n_head=2, n_embd=64, block_size=64)
    m = Model(cfg, seed=1, tokenizer=BytesTokenizer())
    m.flat += np.random.default_rng(1).normal(0, 0.2, m.flat.shape).astype(np.float32)
    ids = [int(i) for i in m.tokenizer.encode("The quick brown fox jumps over")]
    assert len(ids) >= GEMM_ROWS
    f32 = _logits_token_by_token(m, "float32", ids)
    b16 = _logits_token_by_token(m, "bf16", ids)
    spread = f32.max() - f32.min()
    assert np.abs(b16 - f32).max() <= 0.02 * spread
    assert (b16.argmax(axis=1) == f32.argmax(axis=1)).mean() >= 0.9
    prompt = Decoder(m, "bf16").prefill(ids)
    assert np.abs(prompt - f32[-1]).max() <= 0.02 * spread


def test_bf16_kernel_matches_reference():
    from cllmd.kernels import bf16linear as bl
    rng = np.random.default_rng(6)
    for K, M, N in [(64, 48, 1), (100, 257, 3), (96, 300, 9)]:   # padding of M included
        W = rng.normal(size=(K, M)).astype(np.float32)
        w = bl.BF16Weight(W)
        assert w.Mp % bl.COLUMNS == 0 and np.abs(w.dense()[:, M:]).max(initial=0) == 0
        bias = np.zeros(w.Mp, np.float32)
        bias[:M] = rng.normal(size=M)
        x = rng.normal(size=(N, K)).astype(np.float32)
        out = np.empty((N, w.Mp), np.float32)
        bl.bf16_linear(out, x, w, bias)
        ref = bl.bf16_linear_ref(x, w, bias)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        assert np.abs(out[:, :M] - (x @ W + bias[:M])).max() <= 0.01 * np.abs(x @ W).max()  # bf16 rounding
        one = np.empty((1, w.Mp), np.float32)  # a row alone gives exactly its row of the batch
        bl.bf16_linear(one, x[-1:], w, bias)
        np.testing.assert_array_equal(one[0], out[-1])
        par = np.empty_like(out)               # the threads' split of the columns changes nothing
        bl._linear_parallel(par, x, w.w, bias)
        np.testing.assert_array_equal(par, out)


@NEEDS_MKL
def test_bf16_batch_with_a_prompt_joining_gives_each_its_tokens_alone():
    """A long prompt (MKL's gemm) joining sequences that are decoding (the row-exact kernel):
    everyone's tokens are those they get alone."""
    from cllmd.generate import Sequence
    cfg = ModelConfig(vocab_size=257, n_layer=2, n_head=2, n_embd=64, block_size=64)
    m = Model(cfg, seed=2, tokenizer=BytesTokenizer())
    m.flat += np.random.default_rng(2).normal(0, 0.2, m.flat.shape).astype(np.float32)
    requests = [("ab", dict(temperature=0, max_tokens=40)),
                ("A rather long prompt, past sixteen bytes", dict(temperature=0.9, seed=4, max_tokens=20)),
                ("x", dict(temperature=1.0, top_k=30, seed=9, max_tokens=30))]
    alone = []
    for prompt, o in requests:
        g = Generation(m, prompt, SamplingOptions(stop_at_eot=False, **o), weights="bf16")
        g.text()
        alone.append(g.stats.token_ids)
    dec = Decoder(m, "bf16")
    seqs = [Sequence(m, p, SamplingOptions(stop_at_eot=False, **o)) for p, o in requests]
    active = [seqs[0], seqs[2]]
    for step in range(200):
        if step == 3:
            active.insert(1, seqs[1])   # joins in the middle of the pass's sequences
        active = [s for s in active if not s.done]
        if not active:
            break
        dec.advance(active)
    assert [s.stats.token_ids for s in seqs] == alone


def test_bf16_refused_without_mkl(tmp_path):
    """Without MKL, bf16 weights are refused with a message that says what to install."""
    import os
    import subprocess
    import sys
    cfg = ModelConfig(vocab_size=257, n_layer=1, n_head=1, n_embd=32, block_size=16)
    Model(cfg, seed=0, tokenizer=BytesTokenizer()).save(tmp_path / "m.cllm")
    env = {**os.environ, "CLLMD_NO_MKL": "1"}
    r = subprocess.run([sys.executable, "-m", "cllmd", "generate", str(tmp_path / "m.cllm"), "hi",
                        "--weights", "bf16", "--max-tokens", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "cllmd[mkl]" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_q8_kernel_matches_reference():
    from cllmd.kernels import q8
    rng = np.random.default_rng(3)
    for K, M, N in [(64, 48, 1), (100, 257, 3), (96, 16, 9), (64, 32, 4), (64, 48, 13)]:   # padding, tiles of 8, 4, 1
        W = rng.normal(size=(K, M)).astype(np.float32)
        w = q8.Q8Weight(W)
        # the scale is max|w| / 127 rounded to float16 (relative error 2^-11 at most)
        assert np.abs(w.dequantized() - W).max() <= np.abs(W).max() / 127 * 0.5 * (1 + 2 ** -10)
        x = rng.normal(size=(N, K)).astype(np.float32)
        xq, xs, xc = q8.quantized_rows(x)
        for got, expect in zip((xq, xs, xc), q8.quantized_rows_ref(x)):  # (vector IR, partial groups)
            np.testing.assert_array_equal(got, expect)
        out = np.empty((N, w.Mp), np.float32)
        q8.q8_matmul(out, xq, xs, xc, w)
        ref = q8.q8_matmul_ref(xq, xs, w)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        generic = np.empty_like(out)  # the no-VNNI path gives the same sums
        q8._matmul_generic(generic, xq, xs, xc, w.wu, w.ws)
        np.testing.assert_allclose(generic, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        assert np.abs(out[:, :M] - x @ W).max() <= 0.02 * np.abs(x @ W).max()
        for n in range(N):  # a row alone gives exactly its row of the batch (tiled or not)
            one = np.empty((1, w.Mp), np.float32)
            q8.q8_matmul(one, xq[n:n + 1], xs[n:n + 1], xc[n:n + 1], w)
            np.testing.assert_array_equal(one[0], out[n])
        if q8.VNNI:  # the parallel kernel (large products) computes every element as the serial one
            par = np.empty_like(out)
            q8._matmul_vnni(par, xq, xs, xc, w.wu, w.ws)
            np.testing.assert_array_equal(par, out)


def test_q8_linear_prompt_rows_of_a_small_model_match_the_parallel_path():
    """A small model's prompt rows (its products under PARALLEL_MIN_MACS a row) run on the
    calling thread: the same bits as quantizing them all and multiplying on the threads, and
    as each row alone."""
    from cllmd.kernels import q8
    rng = np.random.default_rng(9)
    W = rng.normal(size=(128, 384)).astype(np.float32)
    w, bias = q8.Q8Weight(W), rng.normal(size=384).astype(np.float32)
    assert w.Mp * w.Kp < q8.PARALLEL_MIN_MACS
    x = rng.normal(size=(70, 128)).astype(np.float32)
    got = q8.q8_linear(x, w, bias)
    xq, xs, xc = q8.quantized_rows(x)
    full = np.empty((70, w.Mp), np.float32)
    q8.q8_matmul(full, xq, xs, xc, w)
    np.testing.assert_array_equal(got, full[:, :384] + bias)
    for n in (0, 33, 69):
        np.testing.assert_array_equal(q8.q8_linear(x[n:n + 1], w, bias)[0], got[n])


def test_q8_linear_without_vnni_gives_the_same_products(monkeypatch):
    """q8_linear on a CPU without VNNI (the generic kernel, chosen by the module's flag) gives
    the VNNI path's values, padding and bias included."""
    from cllmd.kernels import q8
    rng = np.random.default_rng(8)
    W = rng.normal(size=(100, 70)).astype(np.float32)
    w, bias = q8.Q8Weight(W), rng.normal(size=70).astype(np.float32)
    x = rng.normal(size=(5, 100)).astype(np.float32)
    fast = q8.q8_linear(x, w, bias)
    monkeypatch.setattr(q8, "VNNI", False)
    generic = q8.q8_linear(x, w, bias)
    assert generic.shape == fast.shape == (5, 70)
    np.testing.assert_allclose(generic, fast, rtol=1e-5, atol=1e-5 * np.abs(fast).max())
    assert np.abs(generic - (x @ W + bias)).max() <= 0.02 * np.abs(x @ W).max()


def test_q8_scales_round_to_float16_as_numpy_does():
    """The weights' scales: max|w| / 127 rounded to the nearest float16 (ties to even), as
    numpy's cast does, subnormals included; a scale beyond float16's range is refused."""
    from cllmd.kernels import q8
    rng = np.random.default_rng(7)
    magnitude = np.repeat(np.exp(rng.uniform(-22, 8, size=(2, 512))), q8.GROUP, axis=0)  # per group
    W = (rng.normal(size=(64, 512)) * magnitude).astype(np.float32)
    w = q8.Q8Weight(W)
    amax = np.abs(W).reshape(2, q8.GROUP, 512).max(axis=1).T            # [M, groups]
    expect = (amax / np.float32(127)).astype(np.float16)
    np.testing.assert_array_equal(w.scales[:512], expect.astype(np.float32))
    assert (w.scales[:512] < 2 ** -14).any()                              # subnormal scales occur
    # each group within half its scale (and float16's subnormal step) of its weights
    err = np.abs(w.dequantized() - W).reshape(2, q8.GROUP, 512).max(axis=1).T
    assert (err <= amax / 127 * 0.5 * (1 + 2 ** -10) + 127 * 2.0 ** -25).all()
    big = np.ones((32, 16), np.float32)
    big[3, 5] = 1e7
    with pytest.raises(ValueError, match="float16"):
        q8.Q8Weight(big)
    big[3, 5] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        q8.Q8Weight(big)


@pytest.mark.parametrize("N", [1, 6, 20], ids=["step", "rows", "gemm"])
def test_kv_attention_matches_reference(N):
    from cllmd.kernels.kvattention import kv_attention, kv_attention_ref, kv_attention_rows
    rng = np.random.default_rng(4)
    NH, cap, hs, first = 3, 40, 8, 5
    k = rng.normal(size=(NH, cap, hs)).astype(np.float32)
    v = rng.normal(size=(NH, cap, hs)).astype(np.float32)
    q = rng.normal(size=(N, NH * hs)).astype(np.float32)
    out, rows, ref = np.empty_like(q), np.empty_like(q), np.empty((N, NH * hs))
    kv_attention(out, q, k, v, first)
    kv_attention_rows(rows, q, k, v, first)
    kv_attention_ref(ref, q, k, v, first)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows, ref, rtol=1e-5, atol=1e-5)
    for i in range(N):  # a row alone (one decoding step at its position) gives exactly its row
        one = np.empty((1, NH * hs), np.float32)
        kv_attention_rows(one, q[i:i + 1], k, v, first + i)
        np.testing.assert_array_equal(one[0], rows[i])
    # storing the new positions' keys and values, then attending, as the decoder does
    from cllmd.kernels.kvattention import kv_append_attention
    qkv = np.concatenate([q, k[:, first:first + N].transpose(1, 0, 2).reshape(N, -1),
                          v[:, first:first + N].transpose(1, 0, 2).reshape(N, -1)], axis=1)
    k2, v2 = k.copy(), v.copy()
    k2[:, first:first + N] = v2[:, first:first + N] = 0.0
    both = np.empty_like(q)
    kv_append_attention(both, qkv, k2, v2, first)
    np.testing.assert_array_equal(k2, k)
    np.testing.assert_array_equal(v2, v)
    np.testing.assert_array_equal(both, out)


def test_kv_attention_batch_gives_each_sequence_its_rows_alone():
    """One call over several sequences' few rows (their caches in typed lists, their rows
    anywhere in the pass) stores and attends exactly as one call per sequence."""
    from numba.typed import List
    from cllmd.kernels.kvattention import kv_append_attention_batch, kv_attention_ref, kv_attention_rows
    rng = np.random.default_rng(5)
    L, NH, hs, layer = 2, 3, 8, 1
    C = NH * hs
    caps, news, firsts = [40, 12, 25], [1, 3, 1], [20, 0, 24]
    spans, n = [], 2                 # rows 0-1 belong to another sequence (a prompt's gemm rows)
    for m, first in zip(news, firsts):
        spans.append((n, n + m, first))
        n += m
    qkv = rng.normal(size=(n, 3 * C)).astype(np.float32)
    ks = [rng.normal(size=(L, NH, c, hs)).astype(np.float32) for c in caps]
    vs = [rng.normal(size=(L, NH, c, hs)).astype(np.float32) for c in caps]
    alone_k, alone_v = [k.copy() for k in ks], [v.copy() for v in vs]
    out = np.full((n, C), 7.0, np.float32)
    kv_append_attention_batch(out, qkv, List(ks), List(vs), layer, np.array(spans, np.int64))
    np.testing.assert_array_equal(out[:2], 7.0)     # other rows untouched
    for s, (a, b, first) in enumerate(spans):
        k, v = alone_k[s][layer], alone_v[s][layer]
        k[:, first:first + b - a] = qkv[a:b, C:2 * C].reshape(b - a, NH, hs).transpose(1, 0, 2)
        v[:, first:first + b - a] = qkv[a:b, 2 * C:].reshape(b - a, NH, hs).transpose(1, 0, 2)
        np.testing.assert_array_equal(ks[s], alone_k[s])
        np.testing.assert_array_equal(vs[s], alone_v[s])
        one = np.empty((b - a, C), np.float32)
        kv_attention_rows(one, qkv[a:b], k, v, first)
        np.testing.assert_array_equal(out[a:b], one)
        ref = np.empty((b - a, C))
        kv_attention_ref(ref, qkv[a:b, :C], k, v, first)
        np.testing.assert_allclose(out[a:b], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hs", [20, 64], ids=["tail", "gpt2"])
def test_kv_attention_batch_gives_the_same_bits_serial_and_parallel(hs):
    """The (sequence, head) pairs on numba's threads give exactly the bits of the serial batch
    and of each sequence alone (every sum in a fixed order, whatever the compiled context),
    and agree with numpy's float64 attention."""
    from numba.typed import List
    from cllmd.kernels.kvattention import kv_append_attention_batch, kv_attention_ref, kv_attention_rows
    rng = np.random.default_rng(hs)
    L, NH, layer, cap = 2, 4, 1, 80
    C = NH * hs
    news, firsts = [1, 1, 2, 1, 1, 3, 1, 1], [0, 79, 30, 5, 63, 17, 40, 1]
    spans = np.array([(a, a + m, f) for a, m, f in zip(np.cumsum([0] + news[:-1]), news, firsts)], np.int64)
    n = int(spans[-1, 1])
    qkv = rng.normal(size=(n, 3 * C)).astype(np.float32)
    ks = [rng.normal(size=(L, NH, cap, hs)).astype(np.float32) for _ in news]
    vs = [rng.normal(size=(L, NH, cap, hs)).astype(np.float32) for _ in news]
    outs = {}
    for parallel in (False, True):
        k2, v2 = [k.copy() for k in ks], [v.copy() for v in vs]
        outs[parallel] = np.empty((n, C), np.float32)
        kv_append_attention_batch(outs[parallel], qkv, List(k2), List(v2), layer, spans, parallel=parallel)
    np.testing.assert_array_equal(outs[True], outs[False])
    for s, (a, b, first) in enumerate(spans):
        k, v = k2[s][layer], v2[s][layer]
        one = np.empty((b - a, C), np.float32)
        kv_attention_rows(one, qkv[a:b], k, v, first)
        np.testing.assert_array_equal(outs[True][a:b], one)
        ref = np.empty((b - a, C))
        kv_attention_ref(ref, qkv[a:b, :C], k, v, first)
        np.testing.assert_allclose(outs[True][a:b], ref, rtol=1e-5, atol=1e-5)


def test_kv_attention_batch_goes_parallel_only_with_enough_work():
    """A batch attends on numba's threads from 2 sequences on, where the pass's products run
    there anyway or the attention alone reaches the int8 products' bound of multiply-adds."""
    from cllmd.kernels.kvattention import batch_runs_parallel
    from cllmd.kernels.q8 import PARALLEL_MIN_MACS

    def spans(firsts, new=1):
        return np.array([(i * new, (i + 1) * new, f) for i, f in enumerate(firsts)], np.int64)

    assert not batch_runs_parallel(spans([500]), 768, threads_busy=True)      # one sequence: serial
    assert batch_runs_parallel(spans([5, 5]), 768, threads_busy=True)
    assert not batch_runs_parallel(spans([100] * 8), 128)                   # the default shape, 8 streams
    assert batch_runs_parallel(spans([600] * 8), 768)                       # GPT-2's width, long caches
    keys = -(-PARALLEL_MIN_MACS // (2 * 64))   # keys the rows see together at the bound, width 64
    assert batch_runs_parallel(spans([keys // 2 - 1, keys - keys // 2 - 1]), 64)   # a row sees first + 1
    assert not batch_runs_parallel(spans([keys // 2 - 1, keys - keys // 2 - 2]), 64)
    f = -(-keys // 4) - 2                       # 2 rows each: 2 x (first + 2) keys per sequence
    assert batch_runs_parallel(spans([f, f], new=2), 64)
    assert not batch_runs_parallel(spans([f - 1, f - 1], new=2), 64)


def test_decoder_rejects_bad_weights_and_overflow(model):
    with pytest.raises(ValueError, match="weights must be one of"):
        Decoder(model, "int4")
    dec = Decoder(model)
    with pytest.raises(ValueError, match="do not fit"):
        dec.prefill(list(range(model.cfg.block_size + 1)))


@pytest.mark.parametrize("weights", WEIGHTS)
def test_batched_decoding_gives_each_request_its_own_tokens(model, weights):
    """Sequences decoded together (one pass per step, joining late, leaving early, sliding
    their windows) produce exactly the tokens each produces alone: greedy and seeded sampling."""
    from cllmd.generate import Sequence
    requests = [("The cat", dict(temperature=0, max_tokens=30)),
                ("A", dict(temperature=1.0, top_k=20, seed=7, max_tokens=12)),
                ("Hello there", dict(temperature=0.9, top_p=0.9, seed=11, max_tokens=25)),
                ("xyz", dict(temperature=0.7, repeat_penalty=1.3, seed=3, max_tokens=5))]
    alone = []
    for prompt, o in requests:
        g = Generation(model, prompt, SamplingOptions(stop_at_eot=False, **o), weights=weights)
        alone.append((g.text(), g.stats.token_ids))
    dec = Decoder(model, weights)
    seqs = [Sequence(model, p, SamplingOptions(stop_at_eot=False, **o)) for p, o in requests]
    texts = ["" for _ in seqs]
    active, step = [], 0
    while step == 0 or active:
        if step < len(seqs):      # one request joins at each of the first steps
            active.append(seqs[step])
        for s, pieces in zip(active, dec.advance(active)):
            texts[seqs.index(s)] += "".join(pieces)
        active = [s for s in active if not s.done]
        step += 1
    assert [(t, s.stats.token_ids) for t, s in zip(texts, seqs)] == alone
    assert [s.stats.stop_reason for s in seqs] == ["max_tokens"] * 4


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decoding_steps_reuse_one_logits_buffer(weights):
    """advance() writes a step's logits into a buffer its Decoder keeps and samples them in
    place with work arrays it keeps: a fresh [S, V] array each step is, from 1 MiB on (GPT-2's
    vocabulary, 8 sequences), a fresh mapping whose pages fault in on every step (cllmd/heap.py
    has malloc map such blocks; 11-14% of the daemon's step of 8). numpy and numba report their
    arrays to tracemalloc: after the first steps a step allocates nothing as large as its
    logits (top_k and top_p still do: a partition and a sort of the row; both are off by
    default). The tokens are those of fresh logits sampled the plain way (a vocabulary of
    20,001: int8's head is padded to 20,016)."""
    import tracemalloc
    from cllmd.generate import Sequence, sample_batch
    V = 20_001
    model = Model(ModelConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=32, block_size=32), seed=0)

    def seqs():
        return [Sequence(model, [1 + i, 2, 3], SamplingOptions(temperature=0.9, min_p=0.01, repeat_penalty=1.2, seed=i, max_tokens=9,
                                                               stop_at_eot=False)) for i in range(4)]
    reused, fresh = seqs(), seqs()
    dec, plain = Decoder(model, weights), Decoder(model, weights)
    for _ in range(2):
        dec.advance(reused)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        dec.advance(reused)
        grown = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert grown < 4 * V * 4, f"a step allocated {grown:,} bytes: its logits are {4 * V * 4:,}"
    for _ in range(3):
        logits = plain.forward([s.cache for s in fresh], [s.feed() for s in fresh])
        assert logits.shape == (4, V) and logits.flags.c_contiguous
        for s, t in zip(fresh, sample_batch(logits, fresh)):
            s.take(int(t))
    assert [s.stats.token_ids for s in reused] == [s.stats.token_ids for s in fresh]
    while not all(s.done for s in reused):   # to the end: rows leave, the buffer's rows are copied
        dec.advance([s for s in reused if not s.done])
    assert all(len(s.stats.token_ids) == 9 for s in reused)


def test_q8_linear_writes_into_a_given_buffer():
    """q8_linear(out=) fills a caller's [N, Mp] buffer (padding columns 0) and returns its first
    M columns, the same values as a fresh result; a buffer of another shape is refused."""
    from cllmd.kernels import q8
    rng = np.random.default_rng(10)
    W = rng.normal(size=(64, 70)).astype(np.float32)
    w, bias = q8.Q8Weight(W), rng.normal(size=70).astype(np.float32)
    for N in (1, 8, 70):
        x = rng.normal(size=(N, 64)).astype(np.float32)
        buf = np.full((N, w.Mp), np.nan, np.float32)
        got = q8.q8_linear(x, w, bias, out=buf)
        assert got.base is buf and got.shape == (N, 70)
        np.testing.assert_array_equal(got, q8.q8_linear(x, w, bias))
        np.testing.assert_array_equal(buf[:, 70:], 0.0)
    with pytest.raises(ValueError, match="out must be"):
        q8.q8_linear(x, w, bias, out=np.empty((N, 70), np.float32))
