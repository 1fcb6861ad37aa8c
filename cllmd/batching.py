"""Continuous batching: the daemon's generations decoded together, one pass per step.

One Batcher thread runs every active Sequence (cllmd.generate) of a model through one
Decoder.forward per step, so each weight is read once per step for all of them. Requests join
and leave between steps; each keeps its own sampling options, seed and random generator, so
its tokens are those it would get alone. A cancelled request ends at the next step (within
one token). Text reaches the readers at most every STREAM_INTERVAL_S. The number of sequences is bounded by the server's generation workers (each
request's handler waits on its sequence there; beyond them requests wait, then get "busy");
the KV caches together are bounded by bytes: a request that would pass the bound is busy.
Sequences started on different weight snapshots (training publishes new ones) run in one
pass per snapshot: a request decodes with the weights it started with.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time

from cllmd.generate import Decoder, KVCache, Sequence

log = logging.getLogger(__name__)


class KVCacheFull(Exception):
    """The running generations' KV caches leave no room for this one (protocol code: busy)."""


# A sequence's text goes to its reader at most this often (its first piece at once, its last
# with the end): each hand-over wakes the reader's thread, which then encodes and sends an
# event, all under the GIL the decoding thread needs back. Measured through the daemon at the
# default shape, 8 streams woke 8 threads per step and spent about as long handing tokens over
# as decoding them. 10 ms is 100 events per second per stream at most, below what a reader sees.
STREAM_INTERVAL_S = 0.01


class _Entry:
    __slots__ = ("seq", "out", "kv_bytes", "pending", "sent_at")

    def __init__(self, seq: Sequence):
        self.seq = seq
        self.out: queue.SimpleQueue = queue.SimpleQueue()  # lists of pieces, then None (or an exception)
        self.kv_bytes = seq.cache.nbytes
        self.pending: list[str] = []   # pieces decoded and not yet handed over
        self.sent_at = 0.0             # when pieces were last handed over (0: never)

    def hand_over(self, pieces: list[str], now: float) -> None:
        self.pending += pieces
        if self.pending and (now - self.sent_at >= STREAM_INTERVAL_S or self.seq.done):
            self.out.put(self.pending)
            self.pending, self.sent_at = [], now


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
        self._step_times: collections.deque = collections.deque(maxlen=32)

    def configure(self, weights: str | None = None, kv_cache_bytes: int | None = None) -> None:
        """New requests use these (running ones keep their weights: they keep their Decoder)."""
        with self._cond:
            if weights is not None:
                self.weights = weights
            if kv_cache_bytes is not None:
                self.kv_cache_bytes = kv_cache_bytes

    @property
    def step_seconds(self) -> float:
        """A step's decoding passes (sampling included), mean over the last 32 steps (0: none yet)."""
        times = list(self._step_times)
        return sum(times) / len(times) if times else 0.0

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
                    "step_seconds": round(self.step_seconds, 5),
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
            started = time.perf_counter()
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
                now = time.perf_counter()
                for e, pieces in zip(entries, results):
                    e.hand_over(pieces, now)
                    if e.seq.done:
                        self._release(e, None)
                    window_tokens += 1
            self.steps += 1
            now = time.perf_counter()
            self._step_times.append(now - started)
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
        out = self._entry.out
        try:
            while True:
                item = out.get()
                pieces = []
                while True:  # what has arrived since the last read goes out as one piece
                    if item is None or isinstance(item, BaseException):
                        break
                    pieces += item
                    try:
                        item = out.get_nowait()
                    except queue.Empty:
                        item = ()
                        break
                if pieces:
                    yield "".join(pieces)
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
        finally:
            self._entry.seq.abandoned = True  # a reader that stops early ends its sequence at the next step
