"""Continuous batching: the daemon's generations decoded together, one pass per step.

One Batcher thread runs every active Sequence (cllmd.generate) of a model through one
Decoder.forward per step, so each weight is read once per step for all of them. Requests join
and leave between steps; each keeps its own sampling options, seed and random generator, so
its tokens are those it would get alone. A cancelled request ends at the next step (within
one token). The number of sequences is bounded by the server's generation workers (each
request's handler waits on its sequence there; beyond them requests wait, then get "busy");
the KV caches together are bounded by bytes: a request that would pass the bound is busy.
Sequences started on different weight snapshots (training publishes new ones) run in one
pass per snapshot: a request decodes with the weights it started with.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

from cllmd.generate import Decoder, KVCache, Sequence

log = logging.getLogger(__name__)


class KVCacheFull(Exception):
    """The running generations' KV caches leave no room for this one (protocol code: busy)."""


class _Entry:
    __slots__ = ("seq", "out", "kv_bytes")

    def __init__(self, seq: Sequence):
        self.seq = seq
        self.out: queue.SimpleQueue = queue.SimpleQueue()  # lists of pieces, then None (or an exception)
        self.kv_bytes = seq.cache.nbytes


class Batcher:
    """Runs the daemon's generations together; run(stop_event, beat) is its thread."""

    def __init__(self, weights: str = "float32", kv_cache_bytes: int = 1 << 30):
        self.weights = weights
        self.kv_cache_bytes = kv_cache_bytes
        self._cond = threading.Condition()
        self._joining: list[_Entry] = []
        self._active: list[_Entry] = []
        self._kv_in_use = 0
        self.steps = 0
        self.largest_batch = 0   # the most sequences decoded in one step since the start
        self._decoders: dict[tuple, Decoder] = {}  # per (weights snapshot, kind) in use
        self.tokens_per_second = 0.0   # all sequences together, over the last few steps

    def configure(self, weights: str | None = None, kv_cache_bytes: int | None = None) -> None:
        """New requests use these (running ones keep their weights: they keep their Decoder)."""
        with self._cond:
            if weights is not None:
                self.weights = weights
            if kv_cache_bytes is not None:
                self.kv_cache_bytes = kv_cache_bytes

    def capacity_needed(self, seq: Sequence) -> int:
        return KVCache.bytes_for(seq.model, seq.cache.capacity)

    def submit(self, seq: Sequence) -> "Stream":
        """Queues seq to join at the next step; raises KVCacheFull or ValueError (never fits)."""
        entry = _Entry(seq)
        with self._cond:
            if entry.kv_bytes > self.kv_cache_bytes:
                raise ValueError(f"this generation needs {entry.kv_bytes:,} bytes of KV cache, more than "
                                 f"inference.kv_cache_bytes ({self.kv_cache_bytes:,}): ask for fewer tokens")
            if self._kv_in_use + entry.kv_bytes > self.kv_cache_bytes:
                raise KVCacheFull(f"the running generations' KV caches hold {self._kv_in_use:,} of "
                                  f"{self.kv_cache_bytes:,} bytes (inference.kv_cache_bytes); this one "
                                  f"needs {entry.kv_bytes:,}: try again later")
            self._kv_in_use += entry.kv_bytes
            seq.weights = self.weights
            self._joining.append(entry)
            self._cond.notify_all()
        return Stream(self, entry)

    def status(self) -> dict:
        with self._cond:
            entries = [e for e in self._active + self._joining if not e.seq.done]  # done: released
            return {"sequences": len(entries), "weights": self.weights, "steps": self.steps,
                    "largest_batch": self.largest_batch,
                    "tokens_per_second": round(self.tokens_per_second, 1),
                    "kv_bytes": self._kv_in_use, "kv_bytes_max": self.kv_cache_bytes,
                    "per_sequence": [{"tokens_prompt": e.seq.stats.tokens_prompt,
                                      "tokens_generated": e.seq.stats.tokens_generated,
                                      "kv_bytes": e.kv_bytes} for e in entries]}

    def _release(self, entry: _Entry, item) -> None:
        with self._cond:
            self._kv_in_use -= entry.kv_bytes
        entry.out.put(item)

    def run(self, stop_event: threading.Event, beat=lambda: None) -> None:
        window_tokens, window_start = 0, time.perf_counter()
        while True:
            beat()
            with self._cond:
                if not self._active and not self._joining and not stop_event.is_set():
                    self._cond.wait(timeout=1.0)
                self._active += self._joining
                self._joining = []
                active = list(self._active)
            if stop_event.is_set():
                break
            if not active:
                continue
            self.largest_batch = max(self.largest_batch, len(active))
            groups: dict[tuple, list[_Entry]] = {}
            for e in active:
                groups.setdefault((id(e.seq.model), e.seq.weights), []).append(e)
            self._decoders = {k: d for k, d in self._decoders.items() if k in groups}
            for key, entries in groups.items():
                try:
                    decoder = self._decoders.get(key)
                    if decoder is None:
                        decoder = self._decoders[key] = Decoder(entries[0].seq.model, key[1])
                    results = decoder.advance([e.seq for e in entries])
                except Exception as exc:  # noqa: BLE001 - each request gets the error, the daemon goes on
                    log.exception("a decoding step of %d sequence(s) failed", len(entries))
                    for e in entries:
                        e.seq.done = True
                        self._release(e, exc)
                    continue
                for e, pieces in zip(entries, results):
                    if pieces:
                        e.out.put(pieces)
                    if e.seq.done:
                        self._release(e, None)
                    window_tokens += 1
            self.steps += 1
            now = time.perf_counter()
            if now - window_start >= 0.5:
                self.tokens_per_second = window_tokens / (now - window_start)
                window_tokens, window_start = 0, now
            with self._cond:
                self._active = [e for e in self._active if not e.seq.done]
                if not self._active and not self._joining:
                    self.tokens_per_second = 0.0
        with self._cond:  # shutting down: every request still here ends now
            left, self._active, self._joining = self._active + self._joining, [], []
        for e in left:
            e.seq.finish("cancelled")
            self._release(e, None)


class Stream:
    """A submitted sequence's text pieces, as its handler reads them (a blocking iterator)."""

    def __init__(self, batcher: Batcher, entry: _Entry):
        self._batcher, self._entry = batcher, entry
        self.stats = entry.seq.stats

    def __iter__(self):
        try:
            while True:
                item = self._entry.out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            self._entry.seq.abandoned = True  # a reader that stops early ends its sequence at the next step
