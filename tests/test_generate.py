"""Generation: KV cache equals recomputation, sampling options, stop strings, UTF-8 streaming."""
import threading

import numpy as np
import pytest

from cllmd.generate import Generation, SamplingOptions, StopMatcher, generate, sample_next
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


def test_generate_rejects_bad_options():
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingOptions(temperature=-1)
    with pytest.raises(ValueError, match="stop"):
        SamplingOptions(stop=("",))
