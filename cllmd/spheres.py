"""The 12 worker spheres, the persistent thread pool that runs them, and the threads' workspaces.

A sphere owns a micro-batch slot and its statistics. Any pool thread may run any sphere:
threads take whichever task is next from one shared queue (work stealing), and the submitter
waits until every task has finished, not merely been taken. The activation buffers belong to
the threads (ThreadWorkspaces), and the gradient rows to node zero's sum (cllmd.reduction),
so memory grows with the threads, not the spheres.
"""
from __future__ import annotations

import logging
import queue as stdlib_queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from cllmd.model import Model, Workspace, head_chunk_rows

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
    """One worker sphere: its micro-batch slot and statistics."""

    def __init__(self, sphere_id: int, model: Model):
        self.id = sphere_id
        self.model = model
        self.weights_t: np.ndarray | None = None  # node zero's transposed weights, fresh each step
        self.weights_h: np.ndarray | None = None  # or its bfloat16 weights (precision bf16)
        self.weights_p = None                     # and their block matrices packed (cllmd.model.PackedWeights)
        self.stats = SphereStats()
        self.rank = 0  # the MPI rank that runs this sphere (cllmd.distributed); 0 in one process
        self.lock = threading.Lock()
        # the slot, filled by node zero before each step
        self.idx = self.targets = self.mask = None
        self.result: tuple[float, float] = (0.0, 0.0)  # (mean loss, counted tokens)
        self.losses: np.ndarray | None = None  # per-position losses of the last forward-only pass

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

    def compute(self, forward_only: bool, ws: Workspace, grad: np.ndarray | None = None, sink=None) -> None:
        """Gradient of the *sum* of the slot's token losses into grad, a row of node zero's
        gradient sum (node zero normalizes after reducing), using the running thread's
        workspace ws (carved for the slot's rows); forward_only: the losses alone. sink: node
        zero's, for the weight gradients it adds in turn (OrderedGradientSum.sink), or None."""
        ws.use(self.idx.shape[0])
        self._set_state("working")
        try:
            if forward_only:
                self.result = self.model.forward_loss(ws, self.idx, self.targets, self.mask, self.weights_h,
                                                      self.weights_p)
                self.losses = ws.losses.copy()
            else:
                self.result = self.model.forward_backward(ws, self.idx, self.targets, self.mask, normalizer=1.0,
                                                          weights_t=self.weights_t, grad=grad,
                                                          weights_h=self.weights_h, sink=sink,
                                                          weights_p=self.weights_p)
        finally:
            self._set_state("waiting")
        if not forward_only:
            self.record(*self.result)

    def record(self, loss: float, count: float) -> None:
        """A micro-batch's figures into the statistics (node zero records a remote sphere's here)."""
        with self.lock:
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
            return {"id": self.id, "rank": self.rank, "state": s.state, "batches": s.batches, "tokens": s.tokens,
                    "mean_loss": s.mean_loss, "recent_loss": s.recent_loss,
                    "busy_s": round(busy, 3), "idle_s": round(idle, 3)}


class ThreadWorkspaces:
    """One Workspace per pool thread, for whichever spheres it runs (not one per sphere).

    A thread's workspace holds the largest micro-batch asked of it and is carved for smaller
    ones; it is replaced when the shape or the checkpointing setting changes, and let go when
    its thread leaves the pool. The head's logits are chunked (head_chunk_rows). bf16: with
    the bfloat16 scratch of the mixed-precision passes.
    """

    def __init__(self, model: Model, checkpointing: bool = False, bf16: bool = False):
        self.model = model
        self.checkpointing = checkpointing  # read at the next get(): a changed setting reallocates
        self.bf16 = bf16                    # likewise
        self._by_thread: dict[int, Workspace] = {}
        self._lock = threading.Lock()
        self.allocations = 0  # workspaces ever allocated

    def get(self, B: int, T: int, capacity: int = 0) -> Workspace:
        """The calling thread's workspace, holding at least max(B, capacity) rows of T."""
        key = threading.get_ident()
        ws = self._by_thread.get(key)
        if ws is None or ws.T != T or ws.checkpointing != self.checkpointing or ws.bf16 != self.bf16 \
                or ws.capacity < B:
            with self._lock:
                self._by_thread.pop(key, None)  # let the old buffers go before the new ones exist
            ws = None
            cfg, dtype = self.model.cfg, self.model.dtype
            ws = Workspace(cfg, max(B, capacity), T, dtype, checkpointing=self.checkpointing,
                           head_rows=head_chunk_rows(cfg.vocab_size, dtype), bf16=self.bf16)
            with self._lock:
                self._by_thread[key] = ws
                self.allocations += 1
        return ws

    def release(self, thread_ident: int) -> None:
        """A thread left the pool: its workspace goes."""
        with self._lock:
            self._by_thread.pop(thread_ident, None)

    def all(self) -> list[Workspace]:
        with self._lock:
            return list(self._by_thread.values())

    @property
    def nbytes(self) -> int:
        return sum(ws.nbytes for ws in self.all())


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

    def __init__(self, threads: int, on_exit=None):
        self._on_exit = on_exit  # called with a worker's thread ident as it leaves the pool
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
                if self._on_exit is not None:
                    self._on_exit(threading.get_ident())
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
