"""The 12-sphere trainer: determinism across thread counts, accumulation, skips, checkpoints."""
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from cllmd.datastore import DataStore
from cllmd.model import Model, ModelConfig
from cllmd.optim import Schedule, clip_by_global_norm
from cllmd.spheres import split_rows
from cllmd.tokensource import TokenArraySource
from cllmd.trainer import Trainer, TrainConfig

CFG = ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=16, block_size=12)


def _source(n=6000, seed=0):
    rng = np.random.default_rng(seed)
    # a learnable pattern: mostly a repeating ramp, some noise
    tokens = (np.arange(n) % 37 + (rng.random(n) < 0.1) * rng.integers(0, 3, n)) % 40
    return TokenArraySource(tokens.astype(np.uint16), 0.1)


def _train(threads, steps=4, batch=13, dtype=np.float32, **cfg):
    tr = Trainer(Model(CFG, seed=0, dtype=dtype), _source(), TrainConfig(batch_size=batch, warmup=2, **cfg), threads=threads)
    losses = [tr.step()["loss"] for _ in range(steps)]
    tr.close()
    return tr, losses


def test_trainer_split_rows_covers_batch_in_sphere_order():
    assert split_rows(12) == [(i, i + 1) for i in range(12)]
    assert split_rows(5)[:5] == [(i, i + 1) for i in range(5)] and all(a == b for a, b in split_rows(5)[5:])
    rows = split_rows(30)
    assert rows[0][0] == 0 and rows[-1][1] == 30 and all(rows[i][1] == rows[i + 1][0] for i in range(11))


def test_trainer_weights_bit_identical_across_thread_counts():
    results = [_train(threads) for threads in (1, 2, 3, 12)]
    base = results[0][0].model.flat
    for tr, losses in results[1:]:
        assert np.array_equal(tr.model.flat, base), f"{tr.pool.size} threads diverged"
        assert losses == results[0][1]


def test_trainer_gradient_rows_and_workspaces_grow_with_threads_not_spheres():
    for threads in (1, 2, 3):
        tr = Trainer(Model(CFG, seed=0), _source(), TrainConfig(batch_size=24, warmup=2, eval_windows=48),
                     threads=threads)
        for _ in range(2):
            tr.step()  # all 12 spheres busy, two rows each
        tr.evaluate()
        assert not hasattr(tr, "sphere_grads") and not hasattr(tr.spheres[0], "workspace")
        assert 1 <= tr.gradsum.rows_allocated <= threads, (threads, tr.gradsum.rows_allocated)
        workspaces = tr.workspaces.all()
        assert 1 <= len(workspaces) <= threads and tr.workspaces.allocations <= threads
        assert all(ws.capacity == 2 for ws in workspaces)
        tr.close()
        deadline = time.monotonic() + 10
        while tr.workspaces.all() and time.monotonic() < deadline:  # the threads leave as they wake
            time.sleep(0.01)
        assert tr.workspaces.all() == []  # threads leaving the pool let their workspaces go
    tr = Trainer(Model(CFG, seed=0), _source(), TrainConfig(batch_size=24, warmup=2), threads=3)
    tr.step()
    tr.set_threads(1)
    tr.step()
    assert tr.gradsum.rows_allocated == 1  # the surplus rows are let go when the pool shrinks
    deadline = time.monotonic() + 10
    while len(tr.workspaces.all()) > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(tr.workspaces.all()) == 1
    tr.close()


def test_trainer_uses_transposed_weights_only_for_small_spheres(monkeypatch):
    import cllmd.trainer
    small, small_losses = _train(2)
    assert small.weights_t is not None  # 2 rows of 12 tokens per sphere
    monkeypatch.setattr(cllmd.trainer, "TRANSPOSED_MAX_TOKENS", 12)
    large, large_losses = _train(2)
    assert large.weights_t is None and all(s.weights_t is None for s in large.spheres)
    np.testing.assert_allclose(large_losses, small_losses, rtol=1e-5)  # other gemms, same maths
    np.testing.assert_allclose(large.model.flat, small.model.flat, rtol=1e-4, atol=1e-6)


def test_trainer_ordered_sum_adds_rows_in_sphere_order_whatever_the_finishing_order():
    import threading

    from cllmd.reduction import OrderedGradientSum
    rng = np.random.default_rng(3)
    grads = {k: rng.normal(size=5000).astype(np.float32) for k in range(1, 13)}
    expected = grads[1].copy()
    for k in range(2, 13):
        expected += grads[k]
    for seed in range(3):
        gs = OrderedGradientSum(5000, np.float32, rows=2)
        gs.begin(list(range(1, 13)), overwrite=True, norm=True)
        delays = np.random.default_rng(seed).random(13) * 0.004

        def worker(ids):
            for k in ids:
                row = gs.take(k)
                time.sleep(delays[k])
                row[:] = grads[k]
                gs.give(k, row)

        work = [list(range(1, 13))[i::3] for i in range(3)]
        threads = [threading.Thread(target=worker, args=(w,)) for w in work]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        np.testing.assert_array_equal(gs.grad, expected)
        assert gs.rows_allocated <= 2
        assert float(gs.sumsq.sum()) == pytest.approx(float(np.dot(expected.astype(np.float64), expected)), rel=1e-6)


def test_trainer_a_failing_sphere_fails_the_step_and_the_next_step_works():
    tr = Trainer(Model(CFG, seed=0), _source(), TrainConfig(batch_size=24, warmup=2), threads=2)
    sphere = tr.spheres[4]
    original = sphere.compute

    def broken(forward_only, ws, grad=None, sink=None):
        raise RuntimeError("sphere 5 broke")

    sphere.compute = broken
    with pytest.raises(RuntimeError, match="sphere 5 broke"):
        tr.step()
    sphere.compute = original
    tr.step()
    tr.close()
    assert tr.gradsum.rows_allocated <= 2


def test_trainer_gradient_checkpointing_changes_nothing_but_memory():
    base, base_losses = _train(2)
    ck = Trainer(Model(CFG, seed=0), _source(), TrainConfig(batch_size=13, warmup=2, grad_checkpointing=True),
                 threads=3)
    ck_losses = [ck.step()["loss"] for _ in range(4)]
    assert np.array_equal(ck.model.flat, base.model.flat) and ck_losses == base_losses
    assert ck.workspaces.all() and all(ws.checkpointing and ws.ln1.shape[0] == 1 for ws in ck.workspaces.all())
    ck.close()
    # switched on while training runs: the threads reallocate their workspaces at the next step
    tr = Trainer(Model(CFG, seed=0), _source(), TrainConfig(batch_size=13, warmup=2), threads=2)
    tr.step()
    assert not any(ws.checkpointing for ws in tr.workspaces.all())
    tr.update_config(grad_checkpointing=True)
    for _ in range(3):
        tr.step()
    assert tr.workspaces.all() and all(ws.checkpointing for ws in tr.workspaces.all())
    tr.close()
    assert np.array_equal(tr.model.flat, base.model.flat)


def test_trainer_thread_count_changes_between_steps_without_changing_results():
    tr = Trainer(Model(CFG, seed=0), _source(), TrainConfig(batch_size=13, warmup=2), threads=1)
    for threads in (3, 2, 12):
        tr.set_threads(threads)
        tr.step()
        assert tr.pool.size == threads
    tr.step()
    tr.close()
    ref, _ = _train(1, steps=4)
    assert np.array_equal(tr.model.flat, ref.model.flat)


def test_trainer_loss_is_token_weighted_mean_of_the_batch():
    tr = Trainer(Model(CFG, seed=0, dtype=np.float64), _source(), TrainConfig(batch_size=7, lr=1e-12, min_lr=0, warmup=0), threads=2)
    rng_state = tr.rng.bit_generator.state
    r = tr.step()
    rng = np.random.default_rng()
    rng.bit_generator.state = rng_state
    x, y = tr.source.sample_batch(rng, 7, 12)
    fresh = Model(CFG, seed=0, dtype=np.float64)
    loss, grads = fresh.loss_and_grads(x, y)
    assert r["loss"] == pytest.approx(loss, rel=1e-12)
    # the reduced gradient is the token-summed gradient: divided by the count, the batch mean's
    np.testing.assert_allclose(tr.grad / r["tokens"], np.concatenate([g.ravel() for g in grads.values()]),
                               rtol=1e-9, atol=1e-12)
    assert r["grad_norm"] == pytest.approx(np.linalg.norm(tr.grad) / r["tokens"], rel=1e-12)
    tr.close()


def test_trainer_accumulation_adds_micro_steps():
    # two micro-steps of 6 rows == one step of the same 12 rows (float64, same gradient sum)
    class Fixed:
        def __init__(self, src):
            self.batches = [src.sample_batch(np.random.default_rng(i), 6, 12) for i in range(2)]
            self.calls = 0

        def sample_batch(self, rng, batch_size, block_size, split="train"):
            if batch_size == 12:
                return tuple(np.concatenate(parts) for parts in zip(*self.batches))
            b = self.batches[self.calls % 2]
            self.calls += 1
            return b

    src = _source()
    acc = Trainer(Model(CFG, seed=0, dtype=np.float64), Fixed(src), TrainConfig(batch_size=6, accum_steps=2, warmup=0), threads=2)
    one = Trainer(Model(CFG, seed=0, dtype=np.float64), Fixed(src), TrainConfig(batch_size=12, warmup=0), threads=2)
    ra, ro = acc.step(), one.step()
    assert ra["tokens"] == ro["tokens"] == 144
    assert ra["loss"] == pytest.approx(ro["loss"], rel=1e-12)
    np.testing.assert_allclose(acc.model.flat, one.model.flat, rtol=1e-10, atol=1e-12)
    acc.close()
    one.close()


def test_trainer_skips_non_finite_steps_and_counts_them():
    tr = Trainer(Model(CFG, seed=0), _source(), TrainConfig(batch_size=4, warmup=0), threads=2)
    tr.model.params["h.0.mlp.c_fc.weight"][0, 0] = np.nan
    before = tr.model.flat.copy()
    r = tr.step()
    assert r["skipped"] and tr.skipped_steps == 1 and tr.step_num == 1
    assert np.array_equal(tr.model.flat, before, equal_nan=True)  # no update applied
    assert tr.optimizer.step_count == 0
    tr.close()


def test_trainer_spheres_report_their_work():
    tr = Trainer(Model(CFG, seed=0), _source(), TrainConfig(batch_size=5, warmup=0), threads=2)
    tr.step()
    snap = tr.snapshot()
    states = [s["state"] for s in snap["spheres"]]
    assert states[:5] == ["idle"] * 5 and states[5:] == ["sitting_out"] * 7
    assert [s["batches"] for s in snap["spheres"]] == [1] * 5 + [0] * 7
    assert all(s["tokens"] == 12 and s["mean_loss"] > 0 for s in snap["spheres"][:5])
    assert snap["step"] == 1 and snap["threads"] == 2 and snap["loss"] > 0
    tr.close()
    assert {s["state"] for s in tr.snapshot()["spheres"]} == {"stopped"}


def test_trainer_learns_and_evaluates():
    tr = Trainer(Model(CFG, seed=0), _source(), TrainConfig(batch_size=12, lr=3e-3, warmup=10, decay_end_step=150, eval_windows=48), threads=2)
    first = tr.evaluate()["val_loss"]
    for _ in range(150):
        tr.step()
    ev = tr.evaluate()
    tr.close()
    assert ev["val_loss"] < first - 1.0
    assert ev["perplexity"] == pytest.approx(np.exp(ev["val_loss"]))
    assert len(ev["group_loss"]) == 12


def test_trainer_padded_batches_from_the_store(tmp_path):
    store = DataStore(tmp_path / "data", vocab_size=40)
    rng = np.random.default_rng(0)
    for i in range(60):
        n = int(rng.integers(3, 10))  # documents shorter than the block: padding needed
        store.append(np.arange(n) % 40, source=f"doc{i}", sha256=hashlib.sha256(b"%d" % i).hexdigest())
    tr = Trainer(Model(CFG, seed=0), store, TrainConfig(batch_size=8, padded=True, warmup=0, lr=3e-3), threads=2)
    losses = [tr.step()["loss"] for _ in range(40)]
    tokens = tr.last["tokens"]
    tr.close()
    store.close()
    assert tokens < 8 * 12  # only real targets were counted
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_trainer_schedule_and_clipping():
    s = Schedule(lr=1e-3, min_lr=1e-4, warmup=10, decay_end_step=110)
    assert s(0) == pytest.approx(1e-4) and s(9) == pytest.approx(1e-3)
    assert s(60) == pytest.approx(0.55e-3) and s(110) == s(500) == 1e-4
    assert all(s(i) >= s(i + 1) for i in range(10, 200))
    g = np.full(100, 1.0, np.float32)
    assert clip_by_global_norm(g, 1.0) == pytest.approx(10.0)
    assert np.linalg.norm(g) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError):
        TrainConfig(batch_size=0)


def _cllmd(*args, cwd):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "cllmd.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_trainer_resume_continues_bit_for_bit(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    common = ["train", "--data", str(data), "--n-layer", "2", "--n-embd", "32", "--block-size", "32",
              "--batch-size", "6", "--steps", "20", "--warmup", "5", "--eval-interval", "0", "--quiet"]
    r = _cllmd(*common, "--out", str(tmp_path / "straight.cllm"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cllmd(*common, "--stop-at", "10", "--out", str(tmp_path / "half.cllm"),
               "--checkpoint", str(tmp_path / "ck.cllm"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cllmd(*common, "--resume", str(tmp_path / "ck.cllm"), "--threads", "1",
               "--out", str(tmp_path / "resumed.cllm"), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 20
    a, b = Model.load(tmp_path / "straight.cllm"), Model.load(tmp_path / "resumed.cllm")
    assert np.array_equal(a.flat, b.flat)
    assert not np.array_equal(a.flat, Model.load(tmp_path / "half.cllm").flat)


def test_trainer_token_sources_meet_the_protocol(tmp_path):
    # The three kinds of source the trainer is given, each checked against TokenSource; only
    # the ones that know their documents serve padded batches.
    from cllmd.tokensource import DocumentSource, ReplayMix, TokenSource

    rng = np.random.default_rng(0)
    arrays = TokenArraySource(rng.integers(0, 50, 400).astype(np.uint16), 0.1)
    with DataStore(tmp_path / "data", vocab_size=50) as store:
        for i in range(40):
            store.append(rng.integers(0, 50, 60), source=f"d{i}",
                         sha256=hashlib.sha256(str(i).encode()).hexdigest())
        mix = ReplayMix(store, 0.5)
        mix.since = 1
        for source in (arrays, store, mix):
            assert isinstance(source, TokenSource), type(source).__name__
            x, y = source.sample_batch(np.random.default_rng(1), 4, 8)
            assert x.shape == y.shape == (4, 8) and x.dtype == np.int64
            ex, _ = source.eval_windows(3, 8, "train")
            assert ex.shape == (3, 8) and source.has_window(8) and source.num_tokens() > 0
        assert isinstance(mix, DocumentSource) and isinstance(store, DocumentSource)
        assert not isinstance(arrays, DocumentSource)
        assert mix.padded_batch(np.random.default_rng(1), 2, 8)[2].shape == (2, 8)
    with pytest.raises(ValueError, match="padded batches need a source that knows its documents"):
        Trainer(Model(ModelConfig(vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=8)),
                arrays, TrainConfig(padded=True), threads=1)
