"""The 12 worker spheres and the persistent thread pool that runs them.

A sphere owns a micro-batch slot, its own activation and gradient buffers and its statistics.
Any pool thread may run any sphere: threads take whichever task is next from one shared queue
(work stealing), and the submitter waits until every task has finished, not merely been taken.
"""
from __future__ import annotations

import logging
import queue as stdlib_queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from cllmd.model import Model, Workspace

log = logging.getLogger(__name__)

NUM_SPHERES = 12
MAX_THREADS = 12


@dataclass
class SphereStats:
    state: str = "idle"          # idle | working | waiting (done, node zero reducing) | sitting_out | stopped
    batches: int = 0
    tokens: int = 0
    loss_sum: float = 0.0        # token-weighted, for the running mean
    recent_loss: float | None = None  # exponential moving average (0.9) of micro-batch losses
    busy_s: float = 0.0
    idle_s: float = 0.0
    last_change: float = field(default_factory=time.monotonic)

    @property
    def mean_loss(self) -> float | None:
        return self.loss_sum / self.tokens if self.tokens else None


class Sphere:
    """One worker sphere: its micro-batch slot, workspace, gradients and statistics."""

    def __init__(self, sphere_id: int, model: Model):
        self.id = sphere_id
        self.model = model
        self.workspace: Workspace | None = None
        self.checkpointing = False  # recompute block activations in the backward (less memory)
        self.weights_t: np.ndarray | None = None  # node zero's transposed weights, fresh each step
        self.stats = SphereStats()
        self.lock = threading.Lock()
        # the slot, filled by node zero before each step
        self.idx = self.targets = self.mask = None
        self.result: tuple[float, float] = (0.0, 0.0)  # (mean loss, counted tokens)

    def _set_state(self, state: str) -> None:
        now = time.monotonic()
        with self.lock:
            elapsed = now - self.stats.last_change
            if self.stats.state == "working":
                self.stats.busy_s += elapsed
            elif self.stats.state != "stopped":
                self.stats.idle_s += elapsed
            self.stats.state = state
            self.stats.last_change = now

    def ensure_workspace(self, B: int, T: int) -> Workspace:
        ws = self.workspace
        if ws is None or (ws.B, ws.T, ws.checkpointing) != (B, T, self.checkpointing):
            self.workspace = None  # let the old buffers go before the new ones are allocated
            ws = self.workspace = Workspace(self.model.cfg, B, T, self.model.dtype, checkpointing=self.checkpointing)
        return ws

    def compute(self, forward_only: bool, grad: np.ndarray | None = None) -> None:
        """Gradient of the *sum* of the slot's token losses into grad, a row of node zero's
        gradient sum (node zero normalizes after reducing); forward_only: the losses alone."""
        B, T = self.idx.shape
        ws = self.ensure_workspace(B, T)
        self._set_state("working")
        try:
            if forward_only:
                self.result = self.model.forward_loss(ws, self.idx, self.targets, self.mask)
            else:
                self.result = self.model.forward_backward(ws, self.idx, self.targets, self.mask, normalizer=1.0,
                                                          weights_t=self.weights_t, grad=grad)
        finally:
            self._set_state("waiting")
        loss, count = self.result
        with self.lock:
            if not forward_only:
                self.stats.batches += 1
                self.stats.tokens += int(count)
                self.stats.loss_sum += loss * count
                r = self.stats.recent_loss
                self.stats.recent_loss = loss if r is None else 0.9 * r + 0.1 * loss

    def snapshot(self) -> dict:
        with self.lock:
            s = self.stats
            busy, idle = s.busy_s, s.idle_s
            elapsed = time.monotonic() - s.last_change
            if s.state == "working":
                busy += elapsed
            elif s.state != "stopped":
                idle += elapsed
            return {"id": self.id, "state": s.state, "batches": s.batches, "tokens": s.tokens,
                    "mean_loss": s.mean_loss, "recent_loss": s.recent_loss,
                    "busy_s": round(busy, 3), "idle_s": round(idle, 3)}


class _Latch:
    """Counts finished tasks; wait() returns when all have finished (and raises the first error)."""

    def __init__(self, count: int):
        self.remaining = count
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def done(self, error: BaseException | None = None) -> None:
        with self.cond:
            if error is not None and self.error is None:
                self.error = error
            self.remaining -= 1
            if self.remaining == 0:
                self.cond.notify_all()

    def wait(self) -> None:
        with self.cond:
            while self.remaining:
                self.cond.wait()
        if self.error is not None:
            raise self.error


class SpherePool:
    """A persistent pool of OS threads taking tasks from one shared queue.

    The thread count can change between steps (dynamic sphere allocation): extra threads get a
    stop token, new ones start. BLAS must run one thread per worker (the trainer sets that).
    """

    def __init__(self, threads: int):
        self._tasks: stdlib_queue.SimpleQueue = stdlib_queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._serial = 0
        self.resize(threads)

    @property
    def size(self) -> int:
        return len(self._threads)

    def resize(self, threads: int) -> None:
        if not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"threads must be between 1 and {MAX_THREADS}, got {threads}")
        with self._lock:
            while len(self._threads) > threads:
                self._tasks.put(None)  # the first thread to take it exits
                self._threads.pop()    # (which thread exits does not matter: all are alike)
            while len(self._threads) < threads:
                self._serial += 1
                t = threading.Thread(target=self._worker, name=f"sphere-worker-{self._serial}", daemon=True)
                t.start()
                self._threads.append(t)

    def _worker(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            fn, latch = task
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting node zero
                latch.done(e)
            else:
                latch.done()

    def run(self, fns) -> None:
        """Runs every callable on the pool and returns when all have finished."""
        fns = list(fns)
        if not fns:
            return
        latch = _Latch(len(fns))
        for fn in fns:
            self._tasks.put((fn, latch))
        latch.wait()

    def close(self) -> None:
        with self._lock:
            for _ in self._threads:
                self._tasks.put(None)
            self._threads.clear()


def split_rows(B: int, parts: int = NUM_SPHERES) -> list[tuple[int, int]]:
    """Row ranges of a batch of B rows over the spheres, in sphere order (some may be empty)."""
    bounds = np.linspace(0, B, parts + 1).round().astype(int) if B >= parts else np.minimum(np.arange(parts + 1), B)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(parts)]
