"""Node zero's gradient sum, committed sphere by sphere in sphere order from a few recycled rows.

A sphere writes its gradient into a row taken from a small pool; the row is added into the
sum as soon as every lower-numbered sphere's has been, then goes back to the pool. Each
element of the sum therefore receives the spheres' gradients in sphere order, whichever
thread ran which sphere and whenever it finished: the same additions, in the same order, as
summing all 12 rows at the end, while at most `rows` gradient rows exist (not 12).

The one place where a sphere's gradient row enters the sum is OrderedGradientSum.commit: it
is called once per sphere, in sphere order, never concurrently. A reduction across processes
(spheres on other ranks) extends it there: each rank's rows must still reach node zero's
sum in sphere order 0..11 for every element.

With direct matrices (bfloat16 products, one process), the blocks' weight gradients, nearly
all of a row, skip the row: each sphere's backward adds them into the sum itself, matrix by
matrix in sphere order (cllmd.kernels.ordered: a sphere waits for the lower ones' turn), with
the same additions as a commit of the row (fl(sum + g) per element; tested bit for bit), and
commit adds the rest of the row (biases, layer norms, embeddings). A sphere then writes no
340 MB row at the 85M shape and node zero does not read it back.
"""
from __future__ import annotations

import threading

import numpy as np

from cllmd.kernels.adamw import REDUCE_BLOCK, add_ranges_into, add_row_into
from cllmd.kernels.ordered import ADD, FIRST, INFO, ROW, flush_deferred


class OrderedGradientSum:
    """grad: the sum, [P]; sumsq: float64 sums of squares of its fixed REDUCE_BLOCK blocks.

    Per micro-step: begin(spheres, overwrite, norm); then, on any threads, for each sphere
    row = take(sphere) (granted in sphere order), its gradient into row, give(sphere, row);
    a sphere that fails calls give_back(row) and abort(), after which take() returns None.
    When every give has returned, the sum is complete; after the last micro-step, finish(run)
    completes sumsq where direct matrices left it to the end. With overwrite, the first sphere's
    gradient is written straight into grad (no row). Spheres are named by any distinct ids.

    direct: [n, 2] (start, stop) ranges of grad, sink matrices 0..n-1, that a micro-step begun
    with direct=True has each sphere add itself, in turn, through sink(sphere) (see the
    module); turns [n + 1] are theirs (cllmd.kernels.ordered). waited_s: the seconds spheres
    spent waiting for their turn, summed since construction; deferred: the matrices they
    wrote into their rows instead, the turn being late.
    """

    def __init__(self, size: int, dtype, rows: int, direct: np.ndarray | None = None):
        if rows < 1:
            raise ValueError(f"the gradient sum needs at least one row, got {rows}")
        self.grad = np.zeros(size, dtype=dtype)
        self.direct = np.zeros((0, 2), np.int64) if direct is None else np.asarray(direct, np.int64).reshape(-1, 2)
        self.turns = np.zeros(self.direct.shape[0] + 1, np.int64)
        cuts = [0, *self.direct.reshape(-1).tolist(), size]  # the rest: between the direct ranges
        self._rest = np.array([(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if b > a], np.int64).reshape(-1, 2)
        self._direct = self._norm_pending = False
        self._infos: dict[int, np.ndarray] = {}
        self.waited_s = 0.0
        self.deferred = 0  # matrices spheres deferred to their rows (a late turn), since construction
        self.sumsq = np.zeros(-(-size // REDUCE_BLOCK), dtype=np.float64)
        self.capacity = rows
        self._free: list[np.ndarray] = []
        self.rows_allocated = 0   # gradient rows ever allocated (the sum not counted)
        self._cond = threading.Condition()
        self._order: list[int] = []
        self._overwrite = self._norm = False
        self._granted = self._committed = 0
        self._done: dict[int, np.ndarray] = {}
        self._committing = False
        self._aborted = False

    def begin(self, spheres: list[int], overwrite: bool, norm: bool, direct: bool = False) -> None:
        """A micro-step of these spheres (in sphere order). overwrite: the sum starts from the
        first sphere's gradient (else it adds to what is there); norm: fill sumsq at the end;
        direct: the spheres add the direct matrices themselves (ignored without any)."""
        with self._cond:
            self._order = list(spheres)
            self._overwrite, self._norm = overwrite, norm
            self._direct = direct and self.direct.shape[0] > 0
            self.turns[:] = 0  # no sphere runs between micro-steps
            self._infos.clear()
            self._granted = self._committed = 0
            self._done.clear()
            self._committing = self._aborted = self._norm_pending = False

    def resize(self, rows: int) -> None:
        """At most rows gradient rows from now on (between micro-steps: every row is free)."""
        if rows < 1:
            raise ValueError(f"the gradient sum needs at least one row, got {rows}")
        with self._cond:
            self.capacity = rows
            while self.rows_allocated > rows and self._free:
                self._free.pop()
                self.rows_allocated -= 1

    @property
    def rows_alive(self) -> int:
        """Gradient rows that exist now (the sum not counted)."""
        return self.rows_allocated

    def _position(self, sphere: int) -> int:
        return self._order.index(sphere)

    def take(self, sphere: int) -> np.ndarray | None:
        """The buffer for sphere's gradient, granted in sphere order: blocks until the lower
        spheres have theirs and a row is free (in-order grants cannot deadlock: the lowest
        uncommitted sphere always holds a row or is next in line for one). None once aborted."""
        with self._cond:
            pos = self._position(sphere)
            while True:
                if self._aborted:
                    return None
                if self._granted == pos:
                    if pos == 0 and self._overwrite:
                        break
                    if self._free or self.rows_allocated < self.capacity:
                        break
                self._cond.wait()
            self._granted += 1
            self._cond.notify_all()
            if pos == 0 and self._overwrite:
                return self.grad
            if self._free:
                return self._free.pop()
            self.rows_allocated += 1
        return np.empty_like(self.grad)

    def sink(self, sphere: int):
        """(grad, turns, info, ranges) for sphere's pass (Model.forward_backward's sink): its
        position and mode: FIRST where its row is the sum, ADD for the others, ROW without
        direct (cllmd.kernels.ordered)."""
        with self._cond:
            pos = self._position(sphere)
            mode = ROW if not self._direct else FIRST if pos == 0 and self._overwrite else ADD
            info = self._infos[pos] = np.zeros(INFO + self.direct.shape[0], np.int64)
            info[:2] = pos, mode
        return self.grad, self.turns, info, self.direct

    def give(self, sphere: int, row: np.ndarray) -> None:
        """sphere's gradient is in row: commits it, and every later one already given, in order."""
        with self._cond:
            if self._aborted:
                if row is not self.grad:
                    self._free.append(row)
                self._cond.notify_all()
                return
            self._done[self._position(sphere)] = row
            if self._committing:
                return  # the committing thread will reach it
            self._committing = True
        while True:
            with self._cond:
                pos = self._committed
                row = None if self._aborted else self._done.pop(pos, None)
                if row is None:
                    self._committing = False
                    return
            last = pos == len(self._order) - 1
            self.commit(pos, self._order[pos], row, first=pos == 0 and self._overwrite, last=last)
            with self._cond:
                self._committed += 1
                if row is not self.grad:
                    self._free.append(row)
                self._cond.notify_all()

    def abort(self) -> None:
        """A sphere failed: the micro-step stops; waiting takers get None, rows go back to the pool."""
        with self._cond:
            self._aborted = True
            self.turns[-1] = 1  # spheres waiting for a turn give up (cllmd.kernels.ordered)
            for row in self._done.values():
                if row is not self.grad:
                    self._free.append(row)
            self._done.clear()
            self._cond.notify_all()

    def give_back(self, row: np.ndarray) -> None:
        """Returns a row that was taken but will not be given (its sphere failed)."""
        if row is not self.grad:
            with self._cond:
                self._free.append(row)
                self._cond.notify_all()

    def commit(self, position: int, sphere: int, row: np.ndarray, first: bool, last: bool) -> None:
        """THE ordered addition: grad (= if first, else +=) row, once per sphere, in sphere
        order (position 0, 1, ... of this micro-step), never concurrently. With last and norm,
        the same pass fills sumsq. row is grad itself when first (the sphere wrote into it).
        With direct matrices the sphere has added those itself: only the rest of row is
        added, and sumsq is left to finish()."""
        info = self._infos.get(position)
        if info is not None:
            self.waited_s += info[2] * 1e-9
            self.deferred += int(info[3])
        sumsq = self.sumsq if (last and self._norm) else self.sumsq[:0]
        if not self._direct:
            add_row_into(self.grad, row, not first, sumsq)
            return
        if not first:
            # the matrices the sphere deferred to its row: every lower sphere is committed,
            # so their turn has come
            if info is not None and flush_deferred(row, self.grad, self.turns, info, self.direct):
                raise RuntimeError("a deferred weight gradient's turn had not come at its commit")
            add_ranges_into(self.grad, row, self._rest)
        self._norm_pending = bool(sumsq.size)  # finish() fills it, on every thread

    NORM_PARTS = 16  # finish()'s parts of sumsq (each block's sum is its own: any split, same bits)

    def finish(self, run) -> None:
        """After the last micro-step: the sums of squares a direct micro-step left to the end,
        in NORM_PARTS parts of whole blocks on run (SpherePool.run): one pass over the sum
        (~50 ms at the 85M shape on one thread), while the other threads would be idle."""
        if not self._norm_pending:
            return
        self._norm_pending = False
        blocks = self.sumsq.size
        cuts = [blocks * i // self.NORM_PARTS for i in range(self.NORM_PARTS + 1)]

        def part(a, b):
            add_row_into(self.grad[a * REDUCE_BLOCK:b * REDUCE_BLOCK], self.grad[:0], False, self.sumsq[a:b])

        run([lambda a=a, b=b: part(a, b) for a, b in zip(cuts, cuts[1:]) if b > a])
