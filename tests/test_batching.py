"""Continuous batching through the real daemon: generations decoded together give each
request its own tokens; requests join, leave, cancel and meet the KV-cache bound mid-batch."""
from __future__ import annotations

import pytest

from cllm.client import RequestError

from tests.daemonproc import daemon, wait_for  # noqa: F401 (fixture)

# greedy, and sampled with fixed seeds (with the filters that use the random generator)
REQUESTS = [("The", dict(max_tokens=70, temperature=0)),
            ("a", dict(max_tokens=40, temperature=1.0, top_k=40, seed=5)),
            ("Hello", dict(max_tokens=55, temperature=0.9, top_p=0.9, seed=11)),
            ("xyz", dict(max_tokens=25, temperature=0.8, repeat_penalty=1.2, min_p=0.05, seed=3))]


def _batch(c):
    return c.request("status")["serving"]["batch"]


def _mkl():
    from cllmd.kernels import blas
    return blas.MKL_AVAILABLE


@pytest.mark.parametrize("weights", ["float32", "int8", pytest.param(
    "bf16", marks=pytest.mark.skipif("not _mkl()", reason="bf16 weights need MKL (the extra cllmd[mkl])"))])
def test_batching_gives_each_request_the_tokens_it_gets_alone(daemon, weights):
    d = daemon("--no-train-auto-train", "--server-generate-workers", "4", "--inference-weights", weights)
    c = d.client
    alone = [c.request("generate", prompt=p, stream=False, **o) for p, o in REQUESTS]
    assert all(r["stop_reason"] in ("max_tokens", "eot") for r in alone)
    assert _batch(c)["largest_batch"] == 1        # one at a time so far
    assert _batch(c)["step_seconds"] > 0          # the batch's own step time, for speed reports
    hold = c.generate("hold", max_tokens=60000, temperature=0)   # keeps the batch busy meanwhile
    first = iter(hold)
    next(first)
    streams = [c.generate(p, **o) for p, o in REQUESTS]   # they join the running batch
    texts = ["".join(s) for s in streams]
    batch = _batch(c)
    assert batch["sequences"] == 1 and batch["weights"] == weights   # the holder is left
    assert [p["kv_bytes"] for p in batch["per_sequence"]] == [batch["kv_bytes"]] and batch["kv_bytes"] > 0
    hold.cancel()
    list(first)
    assert texts == [r["text"] for r in alone]
    assert [s.stats["tokens_generated"] for s in streams] == [r["tokens_generated"] for r in alone]
    assert _batch(c)["largest_batch"] >= 3    # the holder and at least two others in one pass
    wait_for(lambda: _batch(c)["kv_bytes"] == 0, 10, "the holder's KV cache to be released")
    d.stop()


def test_batching_join_leave_cancel_and_kv_bound(daemon):
    # the tiny model: 1 layer, 32 wide, context 32: 8 KiB of KV cache for a whole context
    d = daemon("--no-train-auto-train", "--server-generate-workers", "4", "--inference-kv-cache-bytes", "20KiB")
    c = d.client
    long = c.generate("a", max_tokens=60000, temperature=0)   # greedy, never ends by itself here
    pieces = iter(long)
    next(pieces)
    assert _batch(c)["sequences"] == 1 and _batch(c)["kv_bytes"] == 8192
    other = c.generate("a", max_tokens=60000, temperature=0)   # joins the running one
    got = iter(other)
    next(got)
    assert _batch(c)["sequences"] == 2 and _batch(c)["kv_bytes"] == 16384
    # a third whole context does not fit: busy, with the bound named; the others go on
    with pytest.raises(RequestError) as e:
        c.request("generate", prompt="b", max_tokens=100, stream=False)
    assert e.value.code == "busy" and "inference.kv_cache_bytes" in e.value.message
    # a short one fits beside them (its cache holds only prompt + max_tokens): it joins and leaves
    short = c.request("generate", prompt="b", max_tokens=5, temperature=1.0, seed=2, stream=False)
    assert short["stop_reason"] == "max_tokens" and short["tokens_generated"] == 5
    # one cancelled mid-batch stops within a token or two; the other still streams
    other.cancel()
    rest = list(got)
    assert other.stats["stop_reason"] == "cancelled"
    assert next(pieces) and _batch(c)["sequences"] == 1
    long.cancel()
    list(pieces)
    assert long.stats["stop_reason"] == "cancelled"
    wait_for(lambda: _batch(c)["kv_bytes"] == 0, 10, "the KV caches to be released")
    assert _batch(c)["largest_batch"] >= 2
    d.stop()


def test_bf16_weights_without_mkl_refused_at_start(daemon):
    """Without MKL the daemon does not start on bf16 weights: exit 2 and one line saying why."""
    d = daemon("--no-train-auto-train", "--inference-weights", "bf16", env={"CLLMD_NO_MKL": "1"}, start=False)
    d.start(wait=False)
    assert d.proc.wait(300) == 2
    d.log.close()
    out = d.output()
    assert "inference.weights = 'bf16'" in out and "cllmd[mkl]" in out and "Traceback" not in out
