"""The queue watcher: one thread notices files arriving in incoming/ (inotify, plus rescans)
and takes each one through an attempt: claim, read, preprocess, ingest, then done/ or failed/.

The moves are cllmd.queuedir's, the retry decisions cllmd.retry's; the ingest function (tokenize
and append durably to the data store) is the daemon's.
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Any, BinaryIO, Callable, Iterable

import inotify_simple
from inotify_simple import flags as inflags

from .preprocess import DEFAULT_JSON_FIELDS, PreprocessError, Preprocessed, RepeatedLines, preprocess_file
from .queuedir import BadInput, QueueDir
from .retry import RetryPolicy, RetrySchedule

log = logging.getLogger(__name__)

# Never written ourselves: IN_CREATE would show a file that is still being written.
WATCH_MASK = inflags.CLOSE_WRITE | inflags.MOVED_TO
# After errors in a row the watcher waits 1, 2, 4 ... seconds, at most this long, and starts
# its watch afresh: a passing fault (a full disk, a vanished directory) never ends the daemon.
MAX_ERROR_BACKOFF = 60.0


class QueueWatcher:
    """Drives files of `queue` through `ingest(preprocessed, sha256_of_text)`, which stores them
    durably and returns info such as {"tokens": n, "duplicate": bool}, or raises.

    run() is the watcher thread; wake() and scan() may be called from any thread.
    """

    def __init__(self, queue: QueueDir, ingest: Callable[[Preprocessed, str], dict], *,
                 retry: RetryPolicy, rescan_seconds: float = 30,
                 json_fields: Iterable[str] = DEFAULT_JSON_FIELDS, settle_seconds: float = 2.0,
                 error_wait: tuple[float, float] = (1.0, MAX_ERROR_BACKOFF),
                 furniture_path: os.PathLike | str | None = None):
        if rescan_seconds <= 0:
            raise ValueError("rescan_seconds must be positive")
        self.queue = queue
        self.ingest = ingest
        self.policy = retry
        self.retries = RetrySchedule()
        self.rescan_seconds = rescan_seconds
        self.json_fields = tuple(json_fields)
        # lines repeated across a site's pages are furniture; remembered in furniture_path
        self.repeats = RepeatedLines(path=furniture_path)
        # A rescan leaves files younger than this alone: one written in place (not renamed in)
        # may still be open; its IN_CLOSE_WRITE will bring it.
        self.settle_seconds = settle_seconds
        self._poked: list[str] = []  # placed in incoming/ by the queue itself: look at once
        self._poked_lock = threading.Lock()
        self._recovered = False
        self._wake_fd: int | None = None  # an eventfd while run() is running; see wake()
        self._errors = 0  # watcher errors in a row
        self.error_wait = error_wait  # (after the first error, at most): doubling in between
        queue.on_placed.append(self._poke)
        # the file being ingested: {"name", "phase" (reading | storing), "chars", "of"}
        self.progress: dict | None = None
        self._beat: Callable[[], None] = lambda: None   # run()'s heartbeat, between pieces

    # ------------------------------------------------------------------ one file

    def _attempt(self, pname: str) -> None:
        """One ingestion attempt of processing/PNAME; never raises."""
        try:
            self._attempt_inner(pname)
        except Exception as e:
            log.exception("queue: %r: unexpected error; will retry", pname)
            self.retries.schedule(pname, self.policy.after_unexpected)
            self.queue.emit(name=pname, state="processing", reason=f"{type(e).__name__}: {e}")
        self._save_furniture()

    def _save_furniture(self, force: bool = False) -> None:
        try:
            self.repeats.save(force)
        except OSError as e:   # a full disk: the memory stays in memory, the queue goes on
            log.warning("queue: cannot save the furniture memory %s: %s", self.repeats.path, e)

    def _attempt_inner(self, pname: str) -> None:
        q = self.queue
        self.retries.cancel(pname)
        if not os.path.lexists(q.dirs["processing"] / pname):
            return
        previous, last_error = q.attempts(pname)
        if self.policy.exhausted(previous):
            # Every earlier attempt ended with the daemon gone (kill -9, crash): a file that
            # takes the process down must not do so forever.
            why = last_error or "the daemon stopped during each attempt"
            q.fail(pname, f"gave up after {previous} attempts: {why}", previous)
            return
        attempt = previous + 1
        q.record_attempt(pname, attempt, last_error)
        q.emit(name=pname, state="processing", attempt=attempt)

        try:
            with q.open(pname) as f:
                self._ingest_file(pname, f, attempt)
        except (BadInput, PreprocessError) as e:
            q.fail(pname, str(e), attempt)
        except OSError as e:
            self._retry_later(pname, attempt, f"cannot read: {e.strerror or e}")
        finally:
            self.progress = None

    def _ingest_file(self, pname: str, f: BinaryIO, attempt: int) -> None:
        """Preprocess and ingest the open processing/PNAME; done/ when the store has it. Large
        text streams through both in pieces, beating the heartbeat after each."""
        q = self.queue
        self.progress = {"name": pname, "phase": "reading", "chars": 0, "of": None}

        def reading(chars: int) -> None:
            self.progress = {"name": pname, "phase": "reading", "chars": chars, "of": None}
            self._beat()

        pre = preprocess_file(pname, f, json_fields=self.json_fields, max_bytes=q.max_file_bytes,
                              repeats=self.repeats, on_piece=reading)
        sha = pre.sha256

        def storing(chars: int) -> None:
            self.progress = {"name": pname, "phase": "storing", "chars": chars, "of": pre.chars}
            self._beat()

        pre.on_piece = storing
        storing(0)
        try:
            info = dict(self.ingest(pre, sha) or {})
        except PreprocessError:
            raise   # found on the second pass (the file changed): it fails like the first
        except Exception as e:
            log.warning("queue: %r: ingest attempt %d/%d failed", pname, attempt,
                        self.policy.max_attempts, exc_info=True)
            self._retry_later(pname, attempt, f"ingest failed: {type(e).__name__}: {e}")
            return

        event: dict[str, Any] = {"format": pre.format, "source": pre.source, "sha256": sha}
        event.update((k, v) for k, v in info.items()
                     if k not in event and k not in ("event", "name", "state"))
        self.progress = None
        final = q.finish(pname, **event)
        log.info("queue: %r done: %s tokens%s, %s from %r", final, info.get("tokens", "?"),
                 " (duplicate, not stored again)" if info.get("duplicate") else "",
                 pre.format, pre.source)

    def _retry_later(self, pname: str, attempt: int, reason: str) -> None:
        if self.policy.exhausted(attempt):
            self.queue.fail(pname, f"{reason} (after {attempt} attempts)", attempt)
            return
        delay = self.policy.delay(attempt)
        self.queue.record_attempt(pname, attempt, reason)
        self.retries.schedule(pname, delay)
        log.warning("queue: %r: attempt %d/%d failed (%s); next in %.3g s",
                    pname, attempt, self.policy.max_attempts, reason, delay)
        self.queue.emit(name=pname, state="processing", attempt=attempt, reason=reason,
                        retry_in=delay)

    def _process_incoming(self, name: str) -> bool:
        pname = self.queue.claim(name)
        if pname is None:
            return False
        self._attempt(pname)
        return True

    # ------------------------------------------------------------------ recovery and scans

    def recover(self) -> None:
        """At start: send every file left in processing/ through the pipeline again.

        A kill -9 mid-ingest leaves the file there; the data store dedups by sha256, so a file
        whose tokens were already stored is not stored twice.
        """
        self._recover(lambda: None, None)

    def _recover(self, beat: Callable[[], None], stop: threading.Event | None) -> None:
        names = self.queue.stranded()
        if names:
            log.info("queue: recovering %d file(s) left in processing/", len(names))
        for name in names:
            if stop is not None and stop.is_set():
                return
            beat()
            self._attempt(name)
        self._recovered = True

    def scan(self) -> int:
        """Process every file now in incoming/ (oldest first); returns how many were taken."""
        return self._scan(0.0, lambda: None, None)[0]

    def _scan(self, min_age: float, beat: Callable[[], None],
              stop: threading.Event | None) -> tuple[int, int]:
        q = self.queue
        cutoff = time.time() - min_age
        taken = skipped = 0
        for name in q.by_age("incoming", q.incoming()):
            if stop is not None and stop.is_set():
                break
            if min_age > 0:
                try:
                    if os.lstat(q.dirs["incoming"] / name).st_mtime > cutoff:
                        skipped += 1
                        continue
                except FileNotFoundError:
                    continue
            beat()
            taken += self._process_incoming(name)
        return taken, skipped

    # ------------------------------------------------------------------ the thread

    def _poke(self, name: str) -> None:
        with self._poked_lock:
            self._poked.append(name)
        self.wake()

    def wake(self) -> None:
        """Make the watcher look at once (at `stop`, or at files the queue placed itself)."""
        fd = self._wake_fd
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass  # closed by a run() that just ended: nothing to wake

    def run(self, stop: threading.Event, heartbeat: Callable[[], None] | None = None) -> None:
        """The watcher thread: inotify on incoming/, rescans, retries; returns once `stop` is set.

        Wakes at least once a second to look at `stop` and call `heartbeat` (at once after
        wake(): set `stop`, then call wake() for a prompt exit).
        """
        beat = heartbeat or (lambda: None)
        self._beat = beat
        if not self._recovered:
            self._recover(beat, stop)
        wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_fd = wake_fd
        try:
            while not stop.is_set():
                try:
                    self._watch(stop, beat, wake_fd)
                except Exception:
                    self._errors += 1
                    first, most = self.error_wait
                    wait = min(most, first * 2.0 ** (self._errors - 1))
                    log.exception("queue: watcher error (%d in a row); watching again in %.3g s",
                                  self._errors, wait)
                    _wait_beating(stop, beat, wait)
        finally:
            self._wake_fd = None
            os.close(wake_fd)
            self._save_furniture(force=True)
        log.info("queue: watcher stopped")

    def _watch(self, stop: threading.Event, beat: Callable[[], None], wake_fd: int) -> None:
        poller = select.poll()
        poller.register(wake_fd, select.POLLIN)
        with inotify_simple.INotify() as ino:
            poller.register(ino.fileno(), select.POLLIN)
            # Watch first, then scan: a file arriving in between is seen by one or the other.
            self.queue.dirs["incoming"].mkdir(mode=0o750, parents=True, exist_ok=True)
            wd = ino.add_watch(self.queue.dirs["incoming"], WATCH_MASK)
            _, skipped = self._scan(self.settle_seconds, beat, stop)
            next_scan = time.monotonic() + (self.settle_seconds if skipped else self.rescan_seconds)
            log.info("queue: watching %s", self.queue.dirs["incoming"])
            while not stop.is_set():
                beat()
                wd, next_scan = self._turn(ino, poller, wake_fd, wd, next_scan, stop, beat)
                if self._errors:
                    log.warning("queue: watcher recovered after %d error(s) in a row", self._errors)
                    self._errors = 0

    def _turn(self, ino: inotify_simple.INotify, poller: select.poll, wake_fd: int, wd: int,
              next_scan: float, stop: threading.Event,
              beat: Callable[[], None]) -> tuple[int, float]:
        """One turn of the watcher: wait (at most 1 s), then act on what arrived or is due."""
        now = time.monotonic()
        wake = min(now + 1.0, next_scan)
        deadline = self.retries.next_deadline()
        if self._poked:
            deadline = now
        if deadline is not None:
            wake = min(wake, deadline)
        poller.poll(max(0, int((wake - now) * 1000)))
        try:
            os.eventfd_read(wake_fd)  # reset; only the wake-up mattered
        except BlockingIOError:
            pass
        names: list[str] = []
        rescan = False
        for ev in ino.read(timeout=0):
            if ev.mask & inflags.Q_OVERFLOW:
                log.warning("queue: inotify queue overflowed; rescanning incoming/")
                rescan = True
            elif ev.mask & inflags.IGNORED:
                # incoming/ itself was removed: recreate it and watch again.
                log.warning("queue: %s disappeared; recreating it", self.queue.dirs["incoming"])
                self.queue.dirs["incoming"].mkdir(mode=0o750, parents=True, exist_ok=True)
                wd = ino.add_watch(self.queue.dirs["incoming"], WATCH_MASK)
                rescan = True
            elif ev.wd == wd and ev.name and not ev.name.startswith("."):
                names.append(ev.name)
        with self._poked_lock:
            names += self._poked
            self._poked.clear()
        for name in dict.fromkeys(names):  # each once, in arrival order
            if stop.is_set():
                return wd, next_scan
            beat()
            self._process_incoming(name)
        for pname in self.retries.due():
            if stop.is_set():
                return wd, next_scan
            beat()
            self._attempt(pname)
        if rescan or time.monotonic() >= next_scan:
            _, skipped = self._scan(self.settle_seconds, beat, stop)
            next_scan = time.monotonic() + (self.settle_seconds if skipped else self.rescan_seconds)
        return wd, next_scan


def _wait_beating(stop: threading.Event, beat: Callable[[], None], seconds: float) -> None:
    # The thread is alive and handling its fault: it keeps beating while it waits.
    end = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < end:
        beat()
        stop.wait(min(1.0, end - time.monotonic()))
