"""The model: finite-difference gradient checks in float64, golden behaviour, errors, save/load."""
import numpy as np
import pytest

from cllmd.model import Model, ModelConfig, Workspace, clock_features, lattice_embedding, num_params, param_table

TINY = dict(vocab_size=13, n_layer=2, n_head=2, n_embd=8, block_size=6)


def _perturbed(cfg, seed=1):
    m = Model(cfg, seed=seed, dtype=np.float64)
    # move away from the init's symmetric point (LN weights 1, biases 0) so every
    # parameter gets a sizeable gradient and the relative error is meaningful
    m.flat += np.random.default_rng(seed).normal(0.0, 0.3, m.flat.shape)
    return m


def _max_rel_error(m, idx, targets, mask, samples=8, h=1e-5):
    _, grads = m.loss_and_grads(idx, targets, mask)
    rng = np.random.default_rng(7)
    worst = (0.0, None)
    for name, p in m.params.items():
        flat = p.reshape(-1)
        for j in rng.choice(flat.size, min(samples, flat.size), replace=False):
            old = flat[j]
            flat[j] = old + h
            up, _ = m.loss_and_grads(idx, targets, mask)
            flat[j] = old - h
            down, _ = m.loss_and_grads(idx, targets, mask)
            flat[j] = old
            numeric = (up - down) / (2 * h)
            analytic = grads[name].reshape(-1)[j]
            rel = abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-3)
            if rel > worst[0]:
                worst = (rel, (name, int(j), numeric, analytic))
    return worst


@pytest.mark.parametrize("options", [{}, {"init": "lattice", "clock_positions": True}],
                         ids=["default", "crystalline"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_model_gradients_match_finite_differences(options, masked):
    cfg = ModelConfig(**TINY, **options)
    m = _perturbed(cfg)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.vocab_size, (3, 5))
    targets = rng.integers(0, cfg.vocab_size, (3, 5))
    mask = (rng.random((3, 5)) > 0.3).astype(np.float64) if masked else None
    rel, where = _max_rel_error(m, idx, targets, mask)
    assert rel < 1e-5, f"max relative error {rel:.2e} at {where}"


def test_model_masked_positions_contribute_nothing():
    cfg = ModelConfig(**TINY)
    m = _perturbed(cfg)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, cfg.vocab_size, (2, 6))
    targets = rng.integers(0, cfg.vocab_size, (2, 6))
    mask = np.ones((2, 6))
    mask[1, 3:] = 0.0
    loss, grads = m.loss_and_grads(idx, targets, mask)
    other = targets.copy()
    other[1, 3:] = (other[1, 3:] + 5) % cfg.vocab_size  # change only masked targets
    loss2, grads2 = m.loss_and_grads(idx, other, mask)
    assert loss == loss2
    for name in grads:
        np.testing.assert_array_equal(grads[name], grads2[name])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_model_gradient_checkpointing_gives_identical_gradients(dtype):
    cfg = ModelConfig(vocab_size=13, n_layer=3, n_head=2, n_embd=8, block_size=6)
    m = _perturbed(cfg)
    m32 = Model(cfg, dtype=dtype, _flat=m.flat.astype(dtype))
    rng = np.random.default_rng(6)
    idx, targets = rng.integers(0, 13, (2, 6)), rng.integers(0, 13, (2, 6))
    mask = (rng.random((2, 6)) > 0.3).astype(np.float64)
    loss, grads = m32.loss_and_grads(idx, targets, mask)
    loss_ck, grads_ck = m32.loss_and_grads(idx, targets, mask, checkpointing=True)
    assert m32.workspace(2, 6, checkpointing=True).ln1.shape[0] == 1  # one layer slot, recomputed
    assert loss_ck == loss
    for name in grads:  # the recomputation repeats the very same operations: equal bit for bit
        np.testing.assert_array_equal(grads_ck[name], grads[name], err_msg=name)


def test_model_checkpointing_workspace_is_smaller():
    cfg = ModelConfig(vocab_size=257, n_layer=4, n_head=4, n_embd=64, block_size=32)
    full, ckpt = Workspace(cfg, 2, 32), Workspace(cfg, 2, 32, checkpointing=True)
    assert ckpt.residual3.shape[0] == 4 and ckpt.fch.shape[0] == 1 and full.fch.shape[0] == 4
    assert ckpt.nbytes < 0.5 * full.nbytes


def test_model_chunked_head_gradients_match_finite_differences():
    cfg = ModelConfig(**TINY)
    m = _perturbed(cfg)
    rng = np.random.default_rng(11)
    idx, targets = rng.integers(0, 13, (3, 5)), rng.integers(0, 13, (3, 5))
    mask = (rng.random((3, 5)) > 0.3).astype(np.float64)
    m._workspace = Workspace(cfg, 3, 5, np.float64, head_rows=4)  # 15 rows of logits, 4 at a time
    rel, where = _max_rel_error(m, idx, targets, mask)
    assert m._workspace.logits.shape == (4, 13)
    assert rel < 1e-5, f"max relative error {rel:.2e} at {where}"


def test_model_transposed_weights_give_the_same_gradients():
    cfg = ModelConfig(vocab_size=13, n_layer=2, n_head=2, n_embd=8, block_size=6)
    m = _perturbed(cfg)
    rng = np.random.default_rng(8)
    idx, targets = rng.integers(0, 13, (3, 6)), rng.integers(0, 13, (3, 6))
    ws_a, ws_b = Workspace(cfg, 3, 6, np.float64), Workspace(cfg, 3, 6, np.float64)
    la = m.forward_backward(ws_a, idx, targets)
    lb = m.forward_backward(ws_b, idx, targets, weights_t=m.transposed_weights())
    assert la == lb
    np.testing.assert_allclose(ws_b.grad_flat, ws_a.grad_flat, rtol=1e-12, atol=1e-15)


def test_model_attention_is_causal():
    cfg = ModelConfig(**TINY)
    m = _perturbed(cfg)
    idx = np.array([[1, 2, 3, 4, 5, 6]])
    later_changed = np.array([[1, 2, 3, 9, 9, 9]])
    a, b = m.forward(idx), m.forward(later_changed)
    np.testing.assert_array_equal(a[:, :3], b[:, :3])
    assert not np.allclose(a[:, 3:], b[:, 3:])


def test_model_float32_matches_float64():
    cfg = ModelConfig(**TINY)
    m64 = _perturbed(cfg)
    m32 = Model(cfg, dtype=np.float32)
    m32.flat[:] = m64.flat
    rng = np.random.default_rng(4)
    idx = rng.integers(0, cfg.vocab_size, (2, 6))
    targets = rng.integers(0, cfg.vocab_size, (2, 6))
    l64, g64 = m64.loss_and_grads(idx, targets)
    l32, g32 = m32.loss_and_grads(idx, targets)
    assert abs(l64 - l32) < 1e-5
    for name in g64:
        np.testing.assert_allclose(g32[name], g64[name], rtol=1e-3, atol=1e-5, err_msg=name)


def test_model_init_follows_gpt2():
    cfg = ModelConfig(vocab_size=300, n_layer=4, n_head=4, n_embd=64, block_size=32)
    m = Model(cfg, seed=0)
    assert [n for n, _ in param_table(cfg)] == list(m.params)
    assert m.num_params == num_params(cfg)
    assert m.params["wte"].shape == (300, 64) and m.params["h.0.attn.c_attn.weight"].shape == (64, 192)
    assert m.params["h.3.mlp.c_proj.weight"].shape == (256, 64)
    assert abs(m.params["wte"].std() - 0.02) < 0.002
    assert abs(m.params["h.1.mlp.c_proj.weight"].std() - 0.02 / np.sqrt(8)) < 0.001
    assert np.all(m.params["h.2.ln_1.weight"] == 1) and np.all(m.params["h.2.attn.c_attn.bias"] == 0)
    # same seed, same weights; another seed, others
    assert np.array_equal(Model(cfg, seed=0).flat, m.flat)
    assert not np.array_equal(Model(cfg, seed=1).flat, m.flat)


def test_model_lattice_init_is_deterministic_and_scaled():
    e = lattice_embedding(257, 128)
    assert e.shape == (257, 128)
    assert np.array_equal(e, lattice_embedding(257, 128))
    assert abs(e.std() - 0.02) < 1e-9 and abs(e.mean()) < 1e-12
    # distinct tokens get distinct embeddings
    assert np.unique(np.round(e, 12), axis=0).shape[0] == 257
    cfg = ModelConfig(**TINY, init="lattice")
    assert np.array_equal(Model(cfg, seed=0).params["wte"], Model(cfg, seed=5).params["wte"])


def test_model_clock_features_are_12_periodic():
    f = clock_features(40, 16)
    np.testing.assert_allclose(f[:28], f[12:40], atol=1e-12)
    assert not np.allclose(f[0], f[6])


def test_model_config_rejects_bad_values():
    with pytest.raises(ValueError, match="n_embd"):
        ModelConfig(n_embd=10, n_head=4)
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig(vocab_size=0)
    with pytest.raises(ValueError, match="init"):
        ModelConfig(init="crystal")
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "n_kv_head": 2})


def test_model_rejects_bad_inputs():
    m = Model(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="block_size"):
        m.forward(np.zeros((1, 7), dtype=int))
    with pytest.raises(ValueError, match="token ids"):
        m.forward(np.array([[0, 13]]))
    with pytest.raises(ValueError, match="2-D"):
        m.forward(np.array([1, 2]))
    with pytest.raises(ValueError, match="targets shape"):
        m.loss_and_grads(np.zeros((1, 3), dtype=int), np.zeros((1, 2), dtype=int))


def test_model_save_load_round_trip(tmp_path):
    from cllmd.tokenizer import BytesTokenizer
    cfg = ModelConfig(**TINY, clock_positions=True)
    m = Model(cfg, seed=3, tokenizer=BytesTokenizer(), metadata={"note": "hi"})
    path = tmp_path / "m.cllm"
    m.save(path, metadata={"steps": 5})
    m2 = Model.load(path)
    assert m2.cfg == cfg
    assert np.array_equal(m2.flat, m.flat)
    assert m2.metadata == {"note": "hi", "steps": 5}
    assert m2.tokenizer.kind == "bytes"
    idx = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(m.forward(idx), m2.forward(idx))


def test_model_matches_pytorch_reference_when_available():
    torch = pytest.importorskip("torch", reason="PyTorch is an optional cross-check, not a dependency")
    import sys
    from tests.conftest import ROOT
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from torch_reference import TorchGPT

    cfg = ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=16, block_size=8)
    m = _perturbed(cfg)
    tm = TorchGPT(cfg, m.params)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, 40, (3, 8))
    targets = rng.integers(0, 40, (3, 8))
    _, tloss = tm(torch.tensor(idx), torch.tensor(targets))
    tloss.backward()
    loss, grads = m.loss_and_grads(idx, targets)
    assert abs(loss - tloss.item()) < 1e-10
    for name, g in grads.items():
        np.testing.assert_allclose(g, tm.w(name).grad.numpy(), rtol=1e-7, atol=1e-10, err_msg=name)


def test_model_passes_refuse_mismatched_inputs():
    cfg = ModelConfig(**TINY)
    m = Model(cfg)
    ws = Workspace(cfg, 2, 5)
    ok = np.zeros((2, 5), dtype=np.int64)
    with pytest.raises(ValueError, match="workspace is for"):
        m.forward_into(ws, np.zeros((1, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="targets has shape"):
        m.forward_backward(ws, ok, np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="mask has"):
        m.forward_loss(ws, ok, ok, mask=np.ones(3))
    with pytest.raises(ValueError, match="does not fit"):
        m.forward_into(Workspace(cfg, 2, 5, np.float64), ok)
    # ids are checked inside the kernels (no bounds checks otherwise): an error, not a stray read
    with pytest.raises(IndexError, match="token id"):
        m.forward_into(ws, np.full((2, 5), cfg.vocab_size))
    with pytest.raises(IndexError, match="target id"):
        m.forward_backward(ws, ok, np.full((2, 5), -1))


def test_model_naive_gemm_path_matches_the_cblas_path(tmp_path):
    # without a CBLAS gemm (CLLMD_NO_CBLAS set) the same passes run on the naive gemm
    import json
    import os
    import subprocess
    import sys
    script = (
        "import json, numpy as np\n"
        "from cllmd.kernels import blas\n"
        "from cllmd.model import Model, ModelConfig\n"
        "m = Model(ModelConfig(vocab_size=13, n_layer=2, n_head=2, n_embd=8, block_size=6), seed=4, dtype=np.float64)\n"
        "rng = np.random.default_rng(9)\n"
        "loss, g = m.loss_and_grads(rng.integers(0, 13, (2, 6)), rng.integers(0, 13, (2, 6)))\n"
        "flat = np.concatenate([v.ravel() for v in g.values()]).tolist()\n"
        "print(json.dumps({'cblas': blas.AVAILABLE, 'loss': loss, 'g': flat}))\n"
    )
    runs = {}
    for flag in ("1", ""):
        env = {**os.environ, "CLLMD_NO_CBLAS": flag}
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        runs[flag] = json.loads(r.stdout)
    assert runs["1"]["cblas"] is False and runs[""]["cblas"] is True
    assert runs["1"]["loss"] == pytest.approx(runs[""]["loss"], rel=1e-12)
    np.testing.assert_allclose(runs["1"]["g"], runs[""]["g"], rtol=1e-10, atol=1e-13)


def test_model_gradients_are_the_same_bits_compiled_fresh_and_loaded_from_the_cache(tmp_path):
    # The same kernels compiled afresh (inlined into the model pass) and loaded from numba's
    # cache once gave gradients differing in the last bit (LLVM's reassociated sums in layer
    # norm); a resumed run, or another machine, would drift from the first.
    import hashlib
    import os
    import subprocess
    import sys
    script = (
        "import hashlib, numpy as np\n"
        "from cllmd.model import Model, ModelConfig\n"
        "m = Model(ModelConfig(vocab_size=67, n_layer=2, n_head=2, n_embd=80, block_size=24), seed=3)\n"
        "rng = np.random.default_rng(0)\n"
        "idx, tg = rng.integers(0, 67, (3, 24)), rng.integers(0, 67, (3, 24))\n"
        "ws = m.workspace(3, 24)\n"
        "loss, _ = m.forward_backward(ws, idx, tg, weights_t=m.transposed_weights())\n"
        "print(hashlib.sha256(ws.grad_flat.tobytes()).hexdigest(), repr(loss))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    runs = []
    for _ in ("fresh", "cached"):
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr
        runs.append(r.stdout)
    assert any((tmp_path / "numba").rglob("*.nbi")), "the second run did not load from a cache"
    assert runs[0] == runs[1], f"fresh: {runs[0]} cached: {runs[1]}"
