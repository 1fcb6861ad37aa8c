"""The start-up warm-up leaves no kernel to compile later (cllmd.warmup)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from cllmd.batching import Batcher
from cllmd.generate import SamplingOptions, Sequence
from cllmd.kernels.kvattention import GEMM_ROWS
from cllmd.model import Model, ModelConfig
from cllmd.tokenizer import BytesTokenizer
from cllmd.tokensource import TokenArraySource
from cllmd.trainer import TrainConfig, Trainer
from cllmd.warmup import kernel_dispatchers, warm_up


def _compiled() -> set:
    return {(d.py_func.__qualname__, sig) for d in kernel_dispatchers() for sig in d.signatures}


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_warm_up_leaves_nothing_for_training_or_the_batcher_to_compile(weights):
    # a model of other sizes than the warm-up's: numba specialises on dtypes and layouts only
    cfg = ModelConfig(vocab_size=257, n_layer=2, n_head=2, n_embd=64, block_size=3 * GEMM_ROWS)
    train = TrainConfig(batch_size=12, warmup=0)
    warm_up(cfg, train, lambda what: None, weights=weights)
    before = _compiled()

    model = Model(cfg, seed=1, tokenizer=BytesTokenizer())
    trainer = Trainer(model, TokenArraySource(np.random.default_rng(1).integers(0, 257, 8192),
                                              val_fraction=0.1), train, threads=2)
    try:
        trainer.step()
        trainer.evaluate()
    finally:
        trainer.close()
    # every path of the batcher: a short prompt, a long one (gemms) joining it in one pass,
    # and a generation long enough for its window to slide past the context
    batcher, stop = Batcher(weights), threading.Event()
    thread = threading.Thread(target=batcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        def opts(n):
            return SamplingOptions(max_tokens=n, temperature=1.0, seed=0, stop_at_eot=False)
        streams = [batcher.submit(Sequence(model, "ab", opts(4 * cfg.block_size)))]
        streams.append(batcher.submit(Sequence(model, "x" * (2 * GEMM_ROWS), opts(8))))
        for s in streams:
            "".join(s)
        assert [s.stats.stop_reason for s in streams] == ["max_tokens", "max_tokens"]
    finally:
        stop.set()
        thread.join(30)
    assert _compiled() - before == set()
