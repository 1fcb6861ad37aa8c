"""Compile every kernel before the daemon serves, and say so while it happens.

numba compiles a kernel on its first call (then keeps it in the on-disk cache). Left to first
use, a cold cache cost a minute or two of "step 0" with nothing said, and the first streamed
generation after start sent one token, then nothing for 44 s: its prefill and its decoding step
each compiled their kernels in turn, sharing the GIL with the trainer compiling its own. Here
one tiny model of the same dtype (numba specialises on dtypes and layouts, not sizes) runs a
training step and every path of decoding (short and long prompts, a batch, a window sliding
past the context), so every kernel the daemon uses is compiled (or loaded from the cache)
once, up front, with progress reported. tests/test_warmup.py checks that nothing is left.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

REPORT_EVERY_S = 1.0


def kernel_dispatchers() -> list:
    """Every numba dispatcher of cllmd.kernels (imported by then)."""
    from numba.core.registry import CPUDispatcher
    found = {}
    for name, mod in list(sys.modules.items()):
        if name.startswith("cllmd.kernels") and mod is not None:
            for v in vars(mod).values():
                if isinstance(v, CPUDispatcher):
                    found[id(v)] = v
    return list(found.values())


def cache_is_warm() -> bool:
    """Whether numba's cache directory holds the kernels of an earlier start: an index file
    (.nbi) for at least half of them (a few are compiled when their module is imported)."""
    import cllmd.generate  # noqa: F401  (every kernel module imported, so all are counted)
    import cllmd.trainer  # noqa: F401
    d = os.environ.get("NUMBA_CACHE_DIR")
    if not d or not os.path.isdir(d):
        return False
    indexes = sum(1 for _, _, files in os.walk(d) for f in files if f.endswith(".nbi"))
    return indexes >= len(kernel_dispatchers()) // 2


def _exercise(train_cfg, model_options: dict, weights: str) -> None:
    from cllmd.generate import Decoder, SamplingOptions, Sequence
    from cllmd.kernels.kvattention import GEMM_ROWS
    from cllmd.model import Model, ModelConfig
    from cllmd.tokensource import TokenArraySource
    from cllmd.trainer import Trainer

    # n_embd 32: int8 weights come in groups of 32; a context of 2 x GEMM_ROWS, so that a
    # window sliding past it refeeds GEMM_ROWS positions (the prompt path below)
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, block_size=2 * GEMM_ROWS,
                      **model_options)
    model = Model(cfg, seed=0)
    tokens = np.random.default_rng(0).integers(0, 64, 4096)
    train = dataclasses.replace(train_cfg, batch_size=12, eval_interval=0, warmup=0)
    trainer = Trainer(model, TokenArraySource(tokens, val_fraction=0.1), train, threads=1)
    try:
        trainer.step()
        trainer.evaluate()
    finally:
        trainer.close()
    # decoding as the daemon's batcher does it, each path once: a short prompt alone (rows one
    # at a time), then a prompt of GEMM_ROWS positions (gemms: its own kernels, 11 s of
    # compiling on a cold cache, which a first long prompt or the first generation to pass
    # the context paid in the batcher, silent past the heartbeat limit) joining a sequence
    # that decodes, in one pass, and decoding past the context, whose slide refeeds GEMM_ROWS
    def opts(n: int) -> SamplingOptions:
        return SamplingOptions(max_tokens=n, temperature=1.0, seed=0)

    for kind in dict.fromkeys(("float32", weights)):
        decoder = Decoder(model, kind)
        short = Sequence(model, [1, 2, 3], opts(3))
        decoder.advance([short])
        prompt = Sequence(model, list(range(1, GEMM_ROWS + 1)), opts(cfg.block_size))
        seqs = [short, prompt]
        while not all(s.done for s in seqs):
            decoder.advance([s for s in seqs if not s.done])


def warm_up(model_cfg, train_cfg, report: Callable[[str], None], weights: str = "float32") -> dict:
    """Run the kernels once (on a thread; this one reports every second); returns figures.

    ``model_cfg``: the daemon's ModelConfig (its options choose kernels: clock positions, init);
    ``train_cfg``: its TrainConfig (gradient checkpointing and the precision choose kernels
    too; an auto precision is resolved for model_cfg's width, as its trainer resolves it, not
    for the tiny model's); ``weights``: the inference weights ("float32" or "int8"), whose
    decoding kernels differ.
    """
    from cllmd.trainer import choose_precision
    train_cfg = dataclasses.replace(train_cfg, precision=choose_precision(train_cfg.precision,
                                                                          model_cfg.n_embd)[0])
    warm = cache_is_warm()
    what = "loading compiled kernels" if warm else "compiling kernels (first start only, a minute or two)"
    options = {k: getattr(model_cfg, k) for k in ("init", "clock_positions") if hasattr(model_cfg, k)}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            _exercise(train_cfg, options, weights)
        except BaseException as e:  # reported by the caller, on its own thread
            failure.append(e)

    t0 = time.monotonic()
    worker = threading.Thread(target=run, name="warmup", daemon=True)
    worker.start()
    report(what)
    while worker.is_alive():
        worker.join(REPORT_EVERY_S)
        if worker.is_alive():
            done = sum(1 for d in kernel_dispatchers() if d.signatures)
            report(f"{what}: {done} ready, {time.monotonic() - t0:.0f} s")
    if failure:
        raise failure[0]
    dispatchers = kernel_dispatchers()
    hits = sum(sum(d.stats.cache_hits.values()) for d in dispatchers)
    misses = sum(sum(d.stats.cache_misses.values()) for d in dispatchers)
    figures = {"seconds": round(time.monotonic() - t0, 1), "compiled": misses, "cached": hits,
               "kernels": sum(1 for d in dispatchers if d.signatures)}
    log.info("kernels ready in %.1f s: %d compiled, %d loaded from the cache", figures["seconds"],
             misses, hits)
    return figures
