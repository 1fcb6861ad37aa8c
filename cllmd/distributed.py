"""The 12 spheres over MPI ranks (mpi4py): rank 0 is node zero and the daemon, the others run spheres.

The spheres are placed in contiguous blocks, workers first and rank 0 last (with 3 ranks:
spheres 1-4 on rank 1, 5-8 on rank 2, 9-12 on rank 0). Each micro-step the gradient sum
travels once along that chain, in chunks: every rank adds its spheres' rows, in sphere order,
into the partial sum it received from the rank before and passes it on; rank 0 adds its own
last. Every element thus receives sphere 1's gradient, then sphere 2's, ... exactly as in one
process, so the weights are bit-identical for any rank count and any thread count. Rank 0
then clips and applies AdamW alone (it holds the moments and writes the checkpoints) and the
new weights travel the chain the other way before the next step. Every wait is a polled,
non-blocking request with a deadline: a rank that stops answering its heartbeats is declared
lost, its spheres move to the survivors, and the micro-step is done again on the same batch.

Only imported under mpirun (cllmd.launch reads the launcher's environment without importing
mpi4py); docs/distributed.md is the operator's guide.
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import signal
import sys
import threading
import time
import numpy as np

from cllmd.kernels.adamw import REDUCE_BLOCK, add_row_into
from cllmd.launch import launched
from cllmd.reduction import OrderedGradientSum
from cllmd.spheres import NUM_SPHERES, Sphere, SpherePool, ThreadWorkspaces, split_rows
from cllmd.trainer import Trainer, usable_cores

log = logging.getLogger(__name__)

CHUNK = 1 << 20                 # elements per message of a gradient or weights transfer (4 MiB in float32)
HEARTBEAT_SECONDS = 0.5         # every rank tells its peers it is alive this often
TIMEOUT_ENV = "CLLMD_MPI_TIMEOUT"
DEFAULT_TIMEOUT = 10.0          # seconds without a heartbeat after which a rank is lost
FINALIZE_SECONDS = 10.0         # MPI_Finalize gets this long at exit (World.finalize)

# message tags; the per-attempt ones are offset by the epoch, which changes whenever a rank is
# lost, so a message of an abandoned attempt can never be matched by a later one
TAG_HEARTBEAT, TAG_BYE, TAG_CONTROL = 1, 2, 3
_EPOCH_TAGS = 4
TAG_WEIGHTS, TAG_PARTIAL, TAG_RESULT = 0, 1, 2
assert CHUNK % REDUCE_BLOCK == 0  # chunk boundaries are block boundaries: sumsq per chunk


def _tag(kind: int, epoch: int) -> int:
    return 16 + _EPOCH_TAGS * (epoch % 4000) + kind  # MPI guarantees tags up to 32767


def timeout_from_env() -> float:
    """The heartbeat timeout in seconds: CLLMD_MPI_TIMEOUT, or DEFAULT_TIMEOUT. An environment
    variable, not a setting: every rank needs it before any configuration has reached it."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds above 0, got {raw!r}")
    return value


class RankLost(Exception):
    """A rank stopped answering (or left); rank names it, reason says how it was noticed."""

    def __init__(self, rank: int, reason: str):
        super().__init__(f"rank {rank} lost: {reason}")
        self.rank, self.reason = rank, reason


class StepAborted(Exception):
    """Rank 0 abandoned the micro-step a worker was in (another rank was lost)."""


def _chunks(n: int) -> list[tuple[int, int]]:
    return [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]


def placement(workers: list[int]) -> list[int]:
    """The rank of each sphere (index 0 = sphere 1): contiguous blocks over the workers in
    rank order, rank 0's block last. Any placement gives the same bits; this one lets the
    partial sum travel each link once."""
    order = [*sorted(workers), 0]
    ranks = [0] * NUM_SPHERES
    for rank, (a, b) in zip(order, split_rows(NUM_SPHERES, len(order))):
        ranks[a:b] = [rank] * (b - a)
    return ranks


class World:
    """MPI_COMM_WORLD with heartbeats: who is alive, from a thread of its own.

    Every rank sends a heartbeat to its peers (workers to rank 0, rank 0 to every worker) each
    HEARTBEAT_SECONDS; a peer silent for `timeout` seconds, or that said goodbye, is lost.
    """

    def __init__(self, timeout: float | None = None):
        import mpi4py
        mpi4py.rc.finalize = False  # finalize() decides (at exit), not mpi4py
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)  # a dead peer is an error to handle, not an abort
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = timeout_from_env() if timeout is None else timeout
        self.bytes_sent = 0        # payload bytes this rank sent in steps (weights, sums, batches)
        self._lock = threading.Lock()
        now = time.monotonic()
        self._peers = [0] if self.rank else list(range(1, self.size))
        self._seen = {p: now for p in self._peers}
        self._lost: dict[int, str] = {}
        self._failed: set[int] = set()
        self.loss_seen = False     # some rank of the job failed (a worker learns it from an abort);
                                   # one that said goodbye left in order and does not count
        self._stop = threading.Event()
        self._beat = np.zeros(1, dtype=np.int64)
        self._thread = threading.Thread(target=self._heartbeats, name="mpi-heartbeat", daemon=True)
        self._thread.start()

    # ---- liveness --------------------------------------------------------------------------

    def lose(self, rank: int, reason: str, failed: bool = True) -> bool:
        """Marks rank lost; True if it was not already. failed: it died or went silent (False:
        it said goodbye)."""
        with self._lock:
            if rank in self._lost or rank not in self._seen:
                return False
            self._lost[rank] = reason
            if failed:
                self._failed.add(rank)
                self.loss_seen = True
            return True

    def failed(self, rank: int) -> bool:
        with self._lock:
            return rank in self._failed

    def lost(self, rank: int) -> str | None:
        with self._lock:
            return self._lost.get(rank)

    def alive_workers(self) -> list[int]:
        with self._lock:
            return [p for p in self._peers if p != 0 and p not in self._lost]

    def check(self, ranks) -> None:
        """Raises RankLost for the first of ranks that is lost."""
        for r in ranks:
            reason = self.lost(r)
            if reason is not None:
                raise RankLost(r, reason)

    def _heartbeats(self) -> None:
        # one receive per peer, never MPI_ANY_SOURCE: under ULFM an any-source receive fails
        # for as long as any rank is dead, which would silence the living ones too
        comm = self.comm
        pending = []
        beats = {p: (np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)) for p in self._peers}
        recvs = {p: (comm.Irecv(beats[p][0], source=p, tag=TAG_HEARTBEAT),
                     comm.Irecv(beats[p][1], source=p, tag=TAG_BYE)) for p in self._peers}
        last_sent = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_sent >= HEARTBEAT_SECONDS:
                last_sent = now
                for p in self._peers:
                    if self.lost(p) is None:
                        pending.append(comm.Isend(self._beat, dest=p, tag=TAG_HEARTBEAT))
            pending = [r for r in pending if not self._test(r)]
            for p, (beat, bye) in list(recvs.items()):
                try:
                    if bye.Test():
                        self.lose(p, "it left (said goodbye)", failed=False)
                        del recvs[p]
                        continue
                    while beat.Test():
                        with self._lock:
                            self._seen[p] = time.monotonic()
                        beat = comm.Irecv(beats[p][0], source=p, tag=TAG_HEARTBEAT)
                        recvs[p] = (beat, bye)
                except self.MPI.Exception as e:
                    if self.lose(p, f"MPI error ({e.Get_error_string().strip()})"):
                        log.error("rank %d lost: %s", p, self.lost(p))
                    del recvs[p]
            now = time.monotonic()
            with self._lock:
                silent = [(p, now - t) for p, t in self._seen.items() if p not in self._lost and now - t > self.timeout]
            for p, age in silent:
                if self.lose(p, f"no heartbeat for {age:.1f} s"):
                    log.error("rank %d lost: no heartbeat for %.1f s", p, age)
            time.sleep(0.02)

    def _test(self, req) -> bool:
        try:
            return bool(req.Test())
        except self.MPI.Exception:
            return True

    # ---- polled waits ----------------------------------------------------------------------

    def test(self, req, peer: int) -> tuple[bool, object]:
        """req.test(), with a failed request (MPI_ERR_PROC_FAILED under ULFM) as peer's loss."""
        try:
            return req.test()
        except self.MPI.Exception as e:
            reason = f"MPI error ({e.Get_error_string().strip()})"
            if self.lose(peer, reason):
                log.error("rank %d lost: %s", peer, reason)
            raise RankLost(peer, self.lost(peer) or reason) from None

    def poll_object(self, source: int, tag: int) -> tuple[bool, object]:
        """A pickled message from source with tag, if one has arrived (a matched probe, so any
        size: mpi4py's irecv() would be limited to its 32 KiB buffer)."""
        try:
            msg = self.comm.improbe(source=source, tag=tag)
            return (False, None) if msg is None else (True, msg.recv())
        except self.MPI.Exception as e:
            reason = f"MPI error ({e.Get_error_string().strip()})"
            if self.lose(source, reason):
                log.error("rank %d lost: %s", source, reason)
            raise RankLost(source, self.lost(source) or reason) from None

    def wait(self, req, peer: int, check=None) -> object:
        """Polls req to completion; raises RankLost if peer is lost (or the request fails, as
        MPI_ERR_PROC_FAILED under ULFM) and whatever check() raises. Returns a lowercase
        (pickled) request's object."""
        delay = 2e-5
        while True:
            done, obj = self.test(req, peer)
            if done:
                return obj
            self.check([peer])
            if check is not None:
                check()
            time.sleep(delay)
            delay = min(2 * delay, 1e-3)

    def isend(self, buf: np.ndarray, dest: int, tag: int):
        self.bytes_sent += buf.nbytes
        return self.comm.Isend(buf, dest=dest, tag=tag)

    def send_object(self, obj, dest: int, tag: int):
        return self.comm.isend(obj, dest=dest, tag=tag)

    def close(self, goodbye: bool = False) -> None:
        """Stops the heartbeats; goodbye (workers): tell rank 0 first, so it does not wait out the timeout."""
        if goodbye and self.rank and self.lost(0) is None:
            req = self.comm.Isend(np.zeros(1, dtype=np.int64), dest=0, tag=TAG_BYE)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and not self._test(req):
                time.sleep(0.005)
        self._stop.set()
        self._thread.join(timeout=2.0)

    def finalize(self, code: int) -> None:
        """MPI_Finalize, bounded. Open MPI's Finalize ends in a fence over every rank of the
        job: after a rank had failed it was caught (in gdb) never returning, about one run in
        six, leaving mpirun waiting on the survivors. So a rank that saw a failure exits
        without it, and any other gives it FINALIZE_SECONDS before exiting with code anyway
        (mpirun --with-ft ulfm then exits once rank 0 has)."""
        if self.MPI.Is_finalized():
            return
        self.close()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if self.loss_seen:
            log.warning("a rank failed: exiting without MPI_Finalize, which would wait for it")
            return
        returned = threading.Event()

        def guard():
            if not returned.wait(FINALIZE_SECONDS):
                log.error("MPI_Finalize did not return within %.0f s: exiting without it", FINALIZE_SECONDS)
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                os._exit(code)

        threading.Thread(target=guard, name="mpi-finalize-guard", daemon=True).start()
        self.MPI.Finalize()  # mpi4py releases the GIL here, so the guard can run
        returned.set()


_world: World | None = None
_finished = False


def world() -> World:
    """The process's World, started on first use (MPI_Init and the heartbeat thread)."""
    global _world
    if _world is None:
        _world = World()
    return _world


def started() -> bool:
    return _world is not None


# ---- the chained gradient sum ----------------------------------------------------------------


class ChainedGradientSum(OrderedGradientSum):
    """OrderedGradientSum whose sum arrives from the rank before (the partial sum over every
    lower sphere) and leaves for the rank after, chunk by chunk, at the commit hook.

    link(prev, nxt, tag): prev sends the partial sum this rank's first commit adds to (None:
    this rank starts the sum, overwrite as usual); the last commit sends each finished chunk
    to nxt (None: the sum stays here). check() is polled while waiting and may raise."""

    def __init__(self, world_: World, size: int, dtype, rows: int):
        super().__init__(size, dtype, rows)
        self.world = world_
        self.prev = self.next = None
        self.tag = 0
        self.check = None
        self.sends: list = []

    def link(self, prev: int | None, nxt: int | None, tag: int, check=None) -> None:
        self.prev, self.next, self.tag, self.check = prev, nxt, tag, check
        self.sends = []

    def receive_all(self) -> None:
        """The sum is whatever prev sends (this rank has no sphere of its own this micro-step)."""
        for a, b in _chunks(self.grad.size):
            self._receive(a, b)
            if self._norm:
                add_row_into(self.grad[a:b], self.grad[a:b], False, self.sumsq[a // REDUCE_BLOCK:-(-b // REDUCE_BLOCK)])

    def _receive(self, a: int, b: int) -> None:
        req = self.world.comm.Irecv(self.grad[a:b], source=self.prev, tag=self.tag)
        self.world.wait(req, self.prev, self.check)

    def commit(self, position: int, sphere: int, row: np.ndarray, first: bool, last: bool) -> None:
        receive = position == 0 and self.prev is not None
        send = last and self.next is not None
        if not (receive or send):
            return super().commit(position, sphere, row, first, last)
        try:
            for a, b in _chunks(self.grad.size):
                if receive:
                    self._receive(a, b)
                sumsq = self.sumsq[a // REDUCE_BLOCK:-(-b // REDUCE_BLOCK)] if (last and self._norm) else self.sumsq[:0]
                add_row_into(self.grad[a:b], row[a:b], not first, sumsq)
                if send:
                    self.sends.append((self.world.isend(self.grad[a:b], self.next, self.tag), self.next))
        except BaseException:
            self.give_back(row)
            self.abort()  # waiting takers give up; the error is the micro-step's
            raise

    def wait_sends(self) -> None:
        for req, peer in self.sends:
            self.world.wait(req, peer, self.check)
        self.sends = []


def _run_spheres(pool: SpherePool, gradsum: OrderedGradientSum, spheres: list[Sphere], workspaces, most: int) -> None:
    """Each sphere's gradient into a row granted in order, committed as it finishes (as
    Trainer._dispatch), on the running thread's workspace sized for the batch's largest slot."""
    def task(sphere):
        row = gradsum.take(sphere.id)
        if row is None:
            return
        try:
            sphere.compute(False, workspaces.get(sphere.idx.shape[0], sphere.idx.shape[1], capacity=most), grad=row)
        except BaseException:
            gradsum.give_back(row)
            gradsum.abort()
            raise
        gradsum.give(sphere.id, row)

    pool.run([lambda s=s: task(s) for s in spheres])


class _Background:
    """Runs fn on a thread of its own while the caller polls MPI (which only progresses in calls)."""

    def __init__(self, fn):
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="mpi-spheres", daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the polling thread
            self.error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()


# ---- rank 0: node zero over ranks --------------------------------------------------------------


class DistributedTrainer(Trainer):
    """The Trainer with its spheres spread over the MPI ranks; rank 0 runs it.

    Evaluation (forward only) stays on rank 0's threads. A lost rank's spheres move to the
    survivors (rank 0 alone in the end) and the micro-step is redone on the same batch."""

    def __init__(self, model, source, config, threads: int | None = None, world_: World | None = None):
        super().__init__(model, source, config, threads)
        self.world = world_ or world()
        if self.world.rank != 0:
            raise RuntimeError("the DistributedTrainer runs on rank 0; other ranks run run_worker()")
        self.gradsum = ChainedGradientSum(self.world, model.flat.size, model.dtype, rows=self.pool.size)
        self.grad = self.gradsum.grad
        self.epoch = 0
        self._weights_version = 0    # changes whenever model.flat does
        self._workers_version = -1   # the version every alive worker holds
        self._accum = None           # rank 0's sum so far, kept while a later micro-step may be redone
        self._setup_sent: set[int] = set()
        self._abandoned: list = []   # requests of given-up attempts, kept so their buffers live
        self.placement = placement(self.world.alive_workers())
        self._place()
        self.step_bytes = 0          # payload bytes all ranks sent in the last step (measured)
        self._worker_bytes: dict[int, int] = {}  # each worker's bytes sent, as it last reported

    def _place(self) -> None:
        for s in self.spheres:
            s.rank = self.placement[s.id - 1]

    def _setup(self, workers: list[int]) -> None:
        msg = {"op": "setup", "config": self.model.cfg.to_dict(), "dtype": self.model.dtype.str,
               "bf16": self.precision == "bf16"}
        for w in workers:
            if w not in self._setup_sent:
                self.world.wait(self.world.send_object(msg, w, TAG_CONTROL), w)
                self._setup_sent.add(w)

    def step(self) -> dict:
        before = self.world.bytes_sent + sum(self._worker_bytes.values())
        result = super().step()
        self._weights_version += 1  # AdamW ran (or the step was skipped: a harmless resend)
        self.step_bytes = self.world.bytes_sent + sum(self._worker_bytes.values()) - before
        result["bytes_exchanged"] = self.step_bytes
        return result

    def snapshot(self) -> dict:
        snap = super().snapshot()
        w = self.world
        snap["ranks"] = {"size": w.size, "alive": [0, *w.alive_workers()],
                         "lost": {str(r): w.lost(r) for r in range(1, w.size) if w.lost(r)},
                         "step_bytes": self.step_bytes}
        return snap

    def _lose(self, e: RankLost) -> None:
        """After a lost rank: a new epoch, the survivors told to drop the attempt, a new placement."""
        self.world.lose(e.rank, e.reason)
        self.epoch += 1
        survivors = self.world.alive_workers()
        failed = self.world.failed(e.rank)  # or it said goodbye
        for w in survivors:
            self._abandoned.append(self.world.send_object({"op": "abort", "epoch": self.epoch, "failed": failed},
                                                          w, TAG_CONTROL))
        self.placement = placement(survivors)
        self._place()
        self._workers_version = -1  # a worker may have missed the last weights
        log.error("rank %d lost (%s): its spheres move; spheres now on ranks %s; the micro-step is redone",
                  e.rank, e.reason, self.placement)

    def _dispatch(self, x, y, mask, forward_only: bool, overwrite: bool = True, norm: bool = False):
        workers = self.world.alive_workers()
        if forward_only or (not workers and self.placement == placement([])):
            return super()._dispatch(x, y, mask, forward_only, overwrite, norm)
        if not overwrite:  # a later micro-step: keep the sum so far, a retry starts from it again
            if self._accum is None:
                self._accum = np.empty_like(self.grad)
            self._accum[...] = self.grad
        while True:
            try:
                return self._dispatch_ranks(x, y, mask, overwrite, norm)
            except RankLost as e:
                self._lose(e)
                if not overwrite:
                    self.grad[...] = self._accum

    def _dispatch_ranks(self, x, y, mask, overwrite: bool, norm: bool) -> list[Sphere]:
        w = self.world
        workers = w.alive_workers()
        if self.placement != placement(workers):  # a worker left between steps
            self.placement = placement(workers)
            self._place()
            self._workers_version = -1
        self._setup(workers)
        rows = split_rows(x.shape[0])
        most = max(b - a for a, b in rows)  # every rank's workspaces hold the largest slot, as in one process
        used = [s for s, (a, b) in zip(self.spheres, rows) if a != b]
        for s, (a, b) in zip(self.spheres, rows):
            if a == b:
                s._set_state("sitting_out")
            elif s.rank == 0:
                s.idx, s.targets = np.ascontiguousarray(x[a:b]), np.ascontiguousarray(y[a:b])
                s.mask = None if mask is None else np.ascontiguousarray(mask[a:b])
        by_rank = {r: [s for s in used if s.rank == r] for r in [*workers, 0]}
        chain = [r for r in workers if by_rank[r]] + [0]
        epoch = self.epoch
        t_weights, t_part, t_result = (_tag(k, epoch) for k in (TAG_WEIGHTS, TAG_PARTIAL, TAG_RESULT))
        send_weights = self._workers_version != self._weights_version
        ring = sorted(workers)
        sends = []
        for i, r in enumerate(ring):
            pos = chain.index(r) if r in chain else None
            slots = [(s.id, x[a:b], y[a:b], None if mask is None else mask[a:b])
                     for s, (a, b) in zip(self.spheres, rows) if s in by_rank[r]]
            msg = {"op": "step", "epoch": epoch, "spheres": slots, "checkpointing": self.config.grad_checkpointing,
                   "most": most, "transposed": self.weights_t is not None,
                   "weights_from": (ring[i - 1] if i else 0) if send_weights else None,
                   "weights_to": (ring[i + 1] if i + 1 < len(ring) else None) if send_weights else None,
                   "prev": None if pos is None else (chain[pos - 1] if pos else (0 if not overwrite else None)),
                   "next": None if pos is None else chain[pos + 1]}
            w.bytes_sent += sum(a.nbytes for _, xa, ya, ma in slots for a in (xa, ya) + ((ma,) if ma is not None else ()))
            sends.append((w.send_object(msg, r, TAG_CONTROL), r))
        if send_weights and ring:
            sends += [(w.isend(self.model.flat[a:b], ring[0], t_weights), ring[0]) for a, b in _chunks(self.model.flat.size)]
        if not overwrite and chain[0] != 0:  # the sum so far goes to the head of the chain
            sends += [(w.isend(self._accum[a:b], chain[0], t_part), chain[0]) for a, b in _chunks(self.grad.size)]
        results = [r for r in chain if r != 0]  # who owes this attempt its losses
        for s in used:
            if s.rank != 0:
                s._set_state("working")
        local = by_rank[0]
        gs = self.gradsum
        prev = chain[-2] if len(chain) > 1 else None
        gs.link(prev, None, t_part, check=lambda: w.check(chain))
        gs.resize(max(self.pool.size, len(local)))  # rows wait for the partial sum: never stall the spheres
        if local:
            gs.begin([s.id for s in local], overwrite and prev is None, norm)
            job = _Background(lambda: _run_spheres(self.pool, gs, local, self.workspaces, most))
        else:
            gs.begin([], False, norm)
            job = _Background(gs.receive_all)
        pending = list(results)
        try:
            while pending or not job.done():
                if job.error is not None:
                    break
                for r in list(pending):
                    done, reply = w.poll_object(r, t_result)
                    if done:
                        pending.remove(r)
                        self._record_remote(r, reply)
                w.check(chain)
                time.sleep(2e-4)
            job.join()
            if job.error is not None:
                raise job.error
            for req, peer in sends:
                w.wait(req, peer, lambda: w.check(chain))
        except RankLost:
            gs.abort()
            job.join()
            self._abandoned += [req for req, _ in sends]
            raise
        if send_weights:
            self._workers_version = self._weights_version
        return used

    def _record_remote(self, rank: int, reply: dict) -> None:
        self._worker_bytes[rank] = reply["bytes_sent"]
        for sid, loss, count in reply["spheres"]:
            s = self.spheres[sid - 1]
            s.result = (loss, count)
            s.record(loss, count)
            s._set_state("waiting")

# ---- ranks 1..R-1: sphere workers --------------------------------------------------------------


class Worker:
    """A rank that runs the spheres rank 0 places on it, until rank 0 says stop or is lost."""

    def __init__(self, world_: World, threads: int | None = None):
        from threadpoolctl import threadpool_limits
        self.world = world_
        self.workspaces: ThreadWorkspaces | None = None
        self.pool = SpherePool(threads or usable_cores(),
                               on_exit=lambda ident: self.workspaces is not None and self.workspaces.release(ident))
        self._blas_limit = threadpool_limits(limits=1, user_api="blas")
        self.model = None
        self.spheres: dict[int, Sphere] = {}
        self.gradsum: ChainedGradientSum | None = None
        self.weights_t = None
        self.epoch = 0
        self.stopping = False
        self._relay: list = []
        self.abandoned: list = []  # requests of given-up attempts

    def _setup(self, msg: dict) -> None:
        from cllmd.model import Model, ModelConfig
        cfg = ModelConfig.from_dict(msg["config"])
        self.model = Model(cfg, seed=0, dtype=np.dtype(msg["dtype"]))
        self.weights_t = None      # transposed weights, when rank 0's spheres use them (the same choice)
        self._transposed_fresh = False
        # precision bf16: the weights in bfloat16, made here from the weights received, as
        # node zero makes its own (Model.bf16_weights: the same rounding, so the same bits)
        self.bf16 = bool(msg.get("bf16"))
        if self.bf16:
            from cllmd.kernels.blas import bf16_unavailable
            problem = bf16_unavailable()
            if problem:
                raise RuntimeError(f"rank 0 trains in bf16, but on this rank {problem}")
        self.weights_h = np.zeros(2 * self.model.flat.size, dtype=np.uint16) if self.bf16 else None
        self.workspaces = ThreadWorkspaces(self.model, bf16=self.bf16)
        self.spheres = {}
        self.gradsum = ChainedGradientSum(self.world, self.model.flat.size, self.model.dtype, rows=self.pool.size)
        log.info("pid %d: sphere worker for a model of %d parameters, %d thread(s)", os.getpid(),
                 self.model.num_params, self.pool.size)

    def _take_control(self) -> dict | None:
        """The next message from rank 0, if one has arrived."""
        return self.world.poll_object(0, TAG_CONTROL)[1]

    def run(self) -> int:
        w = self.world
        delay = 1e-4
        while True:
            try:
                if self.stopping:
                    return 0
                w.check([0])
                msg = self._take_control()
                if msg is None:
                    time.sleep(delay)
                    delay = min(2 * delay, 5e-3)
                    continue
                delay = 1e-4
                op = msg.get("op")
                if op == "setup":
                    try:
                        self._setup(msg)
                    except RuntimeError as e:
                        log.error("%s: leaving the job (rank 0 moves this rank's spheres)", e)
                        return 1
                elif op == "abort":
                    w.loss_seen = w.loss_seen or msg.get("failed", True)
                    self.epoch = msg["epoch"]
                    self._abandon()
                elif op == "stop":
                    return 0
                elif op == "step":
                    try:
                        self._step(msg)
                    except StepAborted:
                        pass  # rank 0 gave the attempt up: its next message says what comes next
                    except RankLost as e:
                        if e.rank == 0:
                            raise
                        # another rank: rank 0 notices it too, and its abort is the next message
            except RankLost as e:
                log.error("rank 0 (node zero) lost (%s): exiting", e.reason)
                return 1
            except _Stopping:
                return 0

    def _abandon(self) -> None:
        """An attempt was given up: its requests (some to a dead rank) are never waited for
        again, but stay referenced, so their buffers outlive them."""
        self.abandoned += [req for req, _ in self._relay]
        self._relay = []
        if self.gradsum is not None:
            self.abandoned += [req for req, _ in self.gradsum.sends]
            self.gradsum.sends = []

    def _check(self) -> None:
        """Polled during a step: rank 0's abort or stop ends it (rank 0's death: wait() raises)."""
        if self.stopping:
            raise _Stopping()
        msg = self._take_control()
        if msg is None:
            return
        if msg.get("op") == "abort":
            self.world.loss_seen = self.world.loss_seen or msg.get("failed", True)
            self.epoch = msg["epoch"]
            self._abandon()
            raise StepAborted()
        if msg.get("op") == "stop":
            raise _Stopping()
        log.error("unexpected %r message from rank 0 during a step: ignored", msg.get("op"))

    def _step(self, msg: dict) -> None:
        w = self.world
        check = self._check
        epoch = msg["epoch"]
        t_weights, t_part, t_result = (_tag(k, epoch) for k in (TAG_WEIGHTS, TAG_PARTIAL, TAG_RESULT))
        for req, peer in self._relay:  # the last step's weights must have left before they change
            w.wait(req, peer, check)
        self._relay = []
        if msg["weights_from"] is not None:
            flat = self.model.flat
            for a, b in _chunks(flat.size):
                w.wait(w.comm.Irecv(flat[a:b], source=msg["weights_from"], tag=t_weights), msg["weights_from"], check)
                if msg["weights_to"] is not None:
                    self._relay.append((w.isend(flat[a:b], msg["weights_to"], t_weights), msg["weights_to"]))
            self._transposed_fresh = False
            if self.bf16:
                self.pool.run([lambda part=part: self.model.bf16_weights(self.weights_h, (part,))
                               for part in range(self.model.cfg.n_layer + 1)])
        if not msg["transposed"]:
            self.weights_t = None
        elif self.weights_t is None or not self._transposed_fresh:
            if self.weights_t is None:
                self.weights_t = np.zeros_like(self.model.flat)
            self.pool.run([lambda part=part: self.model.transposed_weights(self.weights_t, (part,))
                           for part in range(self.model.cfg.n_layer + 1)])
            self._transposed_fresh = True
        slots = msg["spheres"]
        if not slots:
            return
        spheres = []
        for sid, xs, ys, ms in slots:
            s = self.spheres.get(sid)
            if s is None:
                s = self.spheres[sid] = Sphere(sid, self.model)
                s.rank = w.rank
            s.weights_t, s.weights_h = self.weights_t, self.weights_h
            s.idx, s.targets = np.ascontiguousarray(xs), np.ascontiguousarray(ys)
            s.mask = None if ms is None else np.ascontiguousarray(ms)
            spheres.append(s)
        gs = self.gradsum
        # with a partial sum to wait for, every sphere may finish first: one row each
        gs.resize(max(self.pool.size, len(spheres)) if msg["prev"] is not None else self.pool.size)
        gs.link(msg["prev"], msg["next"], t_part, check=check)
        gs.begin([s.id for s in spheres], msg["prev"] is None, False)
        self.workspaces.checkpointing = msg["checkpointing"]
        job = _Background(lambda: _run_spheres(self.pool, gs, spheres, self.workspaces, msg["most"]))
        try:
            while not job.done():
                check()
                w.check([0])
                time.sleep(2e-4)
        except BaseException:
            gs.abort()
            job.join()
            raise
        if job.error is not None:
            raise job.error
        gs.wait_sends()
        reply = {"spheres": [(s.id, float(s.result[0]), float(s.result[1])) for s in spheres],
                 "bytes_sent": w.bytes_sent}
        w.wait(w.send_object(reply, 0, t_result), 0, check)

    def close(self) -> None:
        self.pool.close()
        self._blas_limit.restore_original_limits()


class _Stopping(Exception):
    """SIGTERM/SIGINT on a worker, or rank 0's stop: leave at once."""


def run_worker(threads: int | None = None) -> int:
    """The whole life of a rank > 0: runs spheres until rank 0 stops it; returns an exit code."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {launched().rank}: %(message)s")
    w = world()
    worker = Worker(w, threads)

    def on_signal(signum, frame):
        worker.stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        code = worker.run()
    finally:
        worker.close()
        w.close(goodbye=True)
    return code


def stop_workers() -> None:
    """Rank 0 on the way out: tells every alive worker to end, and keeps its heartbeats going
    until each has said goodbye (or is lost), so that no worker, slow to read the stop on a
    loaded machine, takes rank 0's silence for a failure."""
    w = _world
    if w is None or w.rank != 0:
        return
    for r in w.alive_workers():
        w.send_object({"op": "stop"}, r, TAG_CONTROL)
    deadline = time.monotonic() + w.timeout + 1.0
    while w.alive_workers() and time.monotonic() < deadline:
        time.sleep(0.01)
    if w.alive_workers():
        log.warning("ranks %s did not say goodbye within %.0f s", w.alive_workers(), w.timeout + 1.0)


def finish(code: int) -> None:
    """The end of a rank's life under mpirun: rank 0 stops the workers, then MPI_Finalize
    (bounded). Called by the command line with its exit code, and at exit (idempotent)."""
    global _finished
    if _world is None or _finished:
        return
    _finished = True
    stop_workers()
    _world.finalize(code)


def start() -> None:
    """Called first thing under mpirun on every rank: MPI up and heartbeats going, so the
    workers see rank 0 alive while it prepares (tokenizing a corpus can take a while)."""
    world()
    atexit.register(finish, 1)  # a path that never reached the command line's own finish()
