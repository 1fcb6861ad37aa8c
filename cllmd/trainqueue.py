"""The training queue: files dropped into <state>/queue/incoming/ become tokens in the data store.

incoming/ -claim (rename)-> processing/ -> preprocess -> ingest (tokenize + durable append)
-> done/, or failed/ with NAME.reason. Watched with inotify; nothing is ever deleted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import select
import stat
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import inotify_simple
from inotify_simple import flags as inflags

from .preprocess import DEFAULT_JSON_FIELDS, PreprocessError, Preprocessed, RepeatedLines, preprocess

log = logging.getLogger(__name__)

STATES = ("incoming", "processing", "done", "failed")
REASON_SUFFIX = ".reason"
NAME_MAX = 255  # bytes, Linux
# Never written ourselves: IN_CREATE would show a file that is still being written.
WATCH_MASK = inflags.CLOSE_WRITE | inflags.MOVED_TO
MAX_BACKOFF = 300.0
MAX_WATCHER_FAILURES = 10


class QueueError(Exception):
    """A queue operation was refused; the message says why."""


class FileTooLarge(QueueError, ValueError):
    pass


class NotInQueue(QueueError, LookupError):
    """The named file is not where the operation expects it."""


class BadInput(Exception):
    """The file itself is unusable (too large, not a regular file, undecodable...): fail at once."""


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _split_ext(name: str) -> tuple[str, str]:
    dot = name.rfind(".")
    return (name[:dot], name[dot:]) if dot > 0 and len(name) - dot <= 16 else (name, "")


def _fit(stem: str, tail: str, max_bytes: int) -> str:
    # Shorten the stem (never the extension or suffix) until the name fits in max_bytes.
    while len((stem + tail).encode("utf-8", "surrogateescape")) > max_bytes and stem:
        stem = stem[:-1]
    return stem + tail


def candidates(name: str, max_bytes: int = NAME_MAX) -> Iterator[str]:
    """NAME, then NAME-1.ext, NAME-2.ext, ... each short enough for the file system."""
    stem, ext = _split_ext(name)
    yield _fit(stem, ext, max_bytes)
    i = 1
    while True:
        yield _fit(stem, f"-{i}{ext}", max_bytes)
        i += 1


def sanitize_name(name: str) -> str:
    """A safe single file name for add(): no '/', no control characters, no leading '.'."""
    clean = "".join("_" if c == "/" or ord(c) < 32 or c == "\x7f" else c for c in name)
    clean = clean.lstrip(". ").rstrip()
    if not clean:
        clean = "unnamed"
    stem, ext = _split_ext(clean)
    # Room for ".reason", a "-N" suffix and the ".<token>.part" of the temporary name.
    return _fit(stem, ext, 200)


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise NotInQueue(f"invalid queue file name {name!r}")


class TrainingQueue:
    """The queue in `root` (incoming/, processing/, done/, failed/) and its watcher thread.

    `ingest(preprocessed, sha256_of_text)` tokenizes and appends durably to the data store and
    returns info such as {"tokens": n, "duplicate": bool}; it raises on failure. The watcher
    (run, recover, scan) is one thread; add, retry, list and counts are safe from any thread.
    """

    def __init__(self, root: Path, ingest: Callable[[Preprocessed, str], dict], *,
                 max_file_bytes: int, max_attempts: int, rescan_seconds: float = 30,
                 on_event: Callable[[dict], None] | None = None,
                 json_fields: Iterable[str] = DEFAULT_JSON_FIELDS,
                 retry_backoff: float = 1.0, settle_seconds: float = 2.0):
        if max_file_bytes < 1 or max_attempts < 1 or rescan_seconds <= 0:
            raise ValueError("max_file_bytes, max_attempts and rescan_seconds must be positive")
        self.root = Path(root)
        self.ingest = ingest
        self.max_file_bytes = max_file_bytes
        self.max_attempts = max_attempts
        self.rescan_seconds = rescan_seconds
        self.on_event = on_event
        self.json_fields = tuple(json_fields)
        self.repeats = RepeatedLines()   # lines repeated across a site's pages are furniture
        self.retry_backoff = retry_backoff  # seconds before the 2nd attempt, doubling after
        # A rescan leaves files younger than this alone: one written in place (not renamed in)
        # may still be open; its IN_CLOSE_WRITE will bring it.
        self.settle_seconds = settle_seconds
        self.dirs = {s: self.root / s for s in STATES}
        for d in self.dirs.values():
            d.mkdir(mode=0o750, parents=True, exist_ok=True)
        # Guards the choice of a free name together with the move into it, and the two lists.
        self._lock = threading.Lock()
        self._retry_at: dict[str, float] = {}  # processing name -> monotonic time of next attempt
        self._poked: list[str] = []  # placed in incoming by add()/retry(): link() fires no event
        self._recovered = False
        self._wake_fd: int | None = None  # an eventfd while run() is running; see wake()

    # ------------------------------------------------------------------ names and moves

    def _taken(self, state: str, name: str) -> bool:
        d = self.dirs[state]
        if os.path.lexists(d / name):
            return True
        if state == "failed":
            # NAME.reason belongs to NAME: neither may shadow the other.
            if os.path.lexists(d / (name + REASON_SUFFIX)):
                return True
            if name.endswith(REASON_SUFFIX) and os.path.lexists(d / name[: -len(REASON_SUFFIX)]):
                return True
        if state == "processing" and os.path.lexists(self._sidecar(name)):
            return True
        return False

    def _free_name(self, state: str, name: str) -> str:
        max_bytes = NAME_MAX - len(REASON_SUFFIX) if state == "failed" else NAME_MAX
        for cand in candidates(name, max_bytes):
            if not self._taken(state, cand):
                return cand
        raise AssertionError("unreachable")

    def _move(self, src: Path, state: str, name: str) -> str:
        """Rename src into `state` under a free name (caller holds the lock); returns the name."""
        final = self._free_name(state, name)
        os.rename(src, self.dirs[state] / final)
        return final

    def _place_incoming(self, src: Path, name: str) -> str:
        # incoming/ is shared with outside writers: link() never replaces an existing name, so
        # nobody's file is overwritten. Directories cannot be linked: checked rename then.
        incoming = self.dirs["incoming"]
        for cand in candidates(name):
            if os.path.lexists(incoming / cand):
                continue
            try:
                os.link(src, incoming / cand, follow_symlinks=False)
            except FileExistsError:
                continue
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
                    raise
                os.rename(src, incoming / cand)
                return cand
            os.unlink(src)
            return cand
        raise AssertionError("unreachable")

    def _sidecar(self, pname: str) -> Path:
        # A hash keeps the sidecar's name short whatever the data file's name; dot = invisible.
        digest = hashlib.sha256(pname.encode("utf-8", "surrogateescape")).hexdigest()[:24]
        return self.dirs["processing"] / f".attempts-{digest}"

    def _read_sidecar(self, pname: str) -> tuple[int, str | None]:
        try:
            info = json.loads(self._sidecar(pname).read_text())
            return int(info["attempts"]), info.get("last_error")
        except (OSError, ValueError, KeyError, TypeError):
            return 0, None

    def _write_sidecar(self, pname: str, attempts: int, last_error: str | None) -> None:
        # Not fsynced: losing it in a power cut only restarts the attempt count.
        path = self._sidecar(pname)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"name": pname, "attempts": attempts, "last_error": last_error}))
        os.rename(tmp, path)

    def _emit(self, **event: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event({"event": "queue", **event})
        except Exception:
            log.exception("queue event handler failed for %r", event)

    # ------------------------------------------------------------------ processing one file

    def _claim(self, name: str) -> str | None:
        """incoming/NAME -> processing/ (atomic rename); None if someone else took it first."""
        if name.startswith("."):
            return None
        with self._lock:
            if not os.path.lexists(self.dirs["incoming"] / name):
                return None
            pname = self._free_name("processing", name)
            try:
                os.rename(self.dirs["incoming"] / name, self.dirs["processing"] / pname)
            except FileNotFoundError:
                return None
        log.debug("claimed %s as processing/%s", name, pname)
        return pname

    def _read(self, path: Path) -> bytes:
        try:
            # O_NOFOLLOW: a symlink dropped into the queue must not make us read what it points
            # to; O_NONBLOCK: opening a FIFO must not hang the watcher.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise BadInput("not a regular file") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BadInput("not a regular file")
            if st.st_size > self.max_file_bytes:
                raise BadInput(f"too large: {st.st_size} bytes, the limit is {self.max_file_bytes}")
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "rb") as f:
            data = f.read(self.max_file_bytes + 1)
        if len(data) > self.max_file_bytes:  # grew after the fstat
            raise BadInput(f"too large: over the limit of {self.max_file_bytes} bytes")
        return data

    def _attempt(self, pname: str) -> None:
        """One ingestion attempt of processing/PNAME; never raises."""
        try:
            self._attempt_inner(pname)
        except Exception as e:
            # Moving or bookkeeping failed (disk full, ...): leave it in processing/ and come
            # back later rather than spin on it.
            log.exception("queue: %s: unexpected error; will retry", pname)
            with self._lock:
                self._retry_at[pname] = time.monotonic() + MAX_BACKOFF / 5
            self._emit(name=pname, state="processing", reason=f"{type(e).__name__}: {e}")

    def _attempt_inner(self, pname: str) -> None:
        path = self.dirs["processing"] / pname
        with self._lock:
            self._retry_at.pop(pname, None)
        if not os.path.lexists(path):
            return
        previous, last_error = self._read_sidecar(pname)
        if previous >= self.max_attempts:
            # Every earlier attempt ended with the daemon gone (kill -9, crash): a file that
            # takes the process down must not do so forever.
            why = last_error or "the daemon stopped during each attempt"
            self._fail(pname, f"gave up after {previous} attempts: {why}", previous)
            return
        attempt = previous + 1
        self._write_sidecar(pname, attempt, last_error)
        self._emit(name=pname, state="processing", attempt=attempt)

        try:
            pre = preprocess(pname, self._read(path), json_fields=self.json_fields,
                             max_bytes=self.max_file_bytes, repeats=self.repeats)
        except (BadInput, PreprocessError) as e:
            self._fail(pname, str(e), attempt)
            return
        except OSError as e:
            self._retry_later(pname, attempt, f"cannot read: {e.strerror or e}")
            return
        sha = hashlib.sha256(pre.text.encode("utf-8", "surrogatepass")).hexdigest()

        try:
            info = dict(self.ingest(pre, sha) or {})
        except Exception as e:
            log.warning("queue: %s: ingest attempt %d/%d failed", pname, attempt,
                        self.max_attempts, exc_info=True)
            self._retry_later(pname, attempt, f"ingest failed: {type(e).__name__}: {e}")
            return

        with self._lock:
            final = self._move(path, "done", pname)
        self._sidecar(pname).unlink(missing_ok=True)
        log.info("queue: %s done: %s tokens%s, %s from %s", final, info.get("tokens", "?"),
                 " (duplicate, not stored again)" if info.get("duplicate") else "",
                 pre.format, pre.source)
        event: dict[str, Any] = {"name": final, "state": "done", "format": pre.format,
                                 "source": pre.source, "sha256": sha}
        if final != pname:
            event["renamed_from"] = pname
        event.update((k, v) for k, v in info.items() if k not in event and k != "event")
        self._emit(**event)

    def _retry_later(self, pname: str, attempt: int, reason: str) -> None:
        if attempt >= self.max_attempts:
            self._fail(pname, f"{reason} (after {attempt} attempts)", attempt)
            return
        delay = min(MAX_BACKOFF, self.retry_backoff * 2 ** (attempt - 1))
        self._write_sidecar(pname, attempt, reason)
        with self._lock:
            self._retry_at[pname] = time.monotonic() + delay
        log.warning("queue: %s: attempt %d/%d failed (%s); next in %.3g s",
                    pname, attempt, self.max_attempts, reason, delay)
        self._emit(name=pname, state="processing", attempt=attempt, reason=reason, retry_in=delay)

    def _fail(self, pname: str, reason: str, attempts: int) -> None:
        with self._lock:
            final = self._move(self.dirs["processing"] / pname, "failed", pname)
            self._retry_at.pop(pname, None)
            rpath = self.dirs["failed"] / (final + REASON_SUFFIX)
            tmp = self.dirs["failed"] / f".{final}.reason.part"
            tmp.write_text(json.dumps({"reason": reason, "attempts": attempts, "time": _now_iso()},
                                      ensure_ascii=False) + "\n")
            os.rename(tmp, rpath)
        self._sidecar(pname).unlink(missing_ok=True)
        log.warning("queue: %s failed: %s", final, reason)
        extra = {"renamed_from": pname} if final != pname else {}
        self._emit(name=final, state="failed", reason=reason, attempts=attempts, **extra)

    def _process_incoming(self, name: str) -> bool:
        pname = self._claim(name)
        if pname is None:
            return False
        self._attempt(pname)
        return True

    # ------------------------------------------------------------------ the watcher side

    def recover(self) -> None:
        """At start: send every file left in processing/ through the pipeline again.

        A kill -9 mid-ingest leaves the file here; the data store dedups by sha256, so a file
        whose tokens were already stored is not stored twice.
        """
        self._recover(lambda: None, None)

    def _recover(self, beat: Callable[[], None], stop: threading.Event | None) -> None:
        pdir = self.dirs["processing"]
        names = []
        for entry in os.scandir(pdir):
            if entry.name.startswith(".attempts-"):
                if entry.name.endswith(".tmp"):
                    os.unlink(entry.path)
                    continue
                try:
                    owner = json.loads(Path(entry.path).read_text())["name"]
                except (OSError, ValueError, KeyError, TypeError):
                    owner = None
                if owner is None or not os.path.lexists(pdir / owner):
                    os.unlink(entry.path)  # ours, orphaned by a crash after the file moved on
            elif not entry.name.startswith("."):
                names.append(entry.name)
        for entry in os.scandir(self.dirs["failed"]):
            if entry.name.startswith(".") and entry.name.endswith(".reason.part"):
                os.unlink(entry.path)
        if names:
            log.info("queue: recovering %d file(s) left in processing/", len(names))
        for name in self._by_age(pdir, names):
            if stop is not None and stop.is_set():
                return
            beat()
            self._attempt(name)
        self._recovered = True

    @staticmethod
    def _by_age(directory: Path, names: Iterable[str]) -> list[str]:
        keyed = []
        for name in names:
            try:
                keyed.append((os.lstat(directory / name).st_mtime, name))
            except FileNotFoundError:
                continue
        return [name for _, name in sorted(keyed)]

    def scan(self) -> int:
        """Process every file now in incoming/ (oldest first); returns how many were taken."""
        return self._scan(0.0, lambda: None, None)[0]

    def _scan(self, min_age: float, beat: Callable[[], None],
              stop: threading.Event | None) -> tuple[int, int]:
        incoming = self.dirs["incoming"]
        names = [n for n in os.listdir(incoming) if not n.startswith(".")]
        cutoff = time.time() - min_age
        taken = skipped = 0
        for name in self._by_age(incoming, names):
            if stop is not None and stop.is_set():
                break
            if min_age > 0:
                try:
                    if os.lstat(incoming / name).st_mtime > cutoff:
                        skipped += 1
                        continue
                except FileNotFoundError:
                    continue
            beat()
            taken += self._process_incoming(name)
        return taken, skipped

    def _due_retries(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            due = sorted((t, n) for n, t in self._retry_at.items() if t <= now)
        return [n for _, n in due]

    def _next_deadline(self) -> float | None:
        with self._lock:
            if self._poked:
                return time.monotonic()
            return min(self._retry_at.values(), default=None)

    def run(self, stop: threading.Event, heartbeat: Callable[[], None] | None = None) -> None:
        """The watcher thread: inotify on incoming/, rescans, retries; returns once `stop` is set.

        Wakes at least once a second to look at `stop` and call `heartbeat` (at once after
        wake(): set `stop`, then call wake() for a prompt exit).
        """
        beat = heartbeat or (lambda: None)
        if not self._recovered:
            self._recover(beat, stop)
        wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_fd = wake_fd
        try:
            self._watch(stop, beat, wake_fd)
        finally:
            self._wake_fd = None
            os.close(wake_fd)
        log.info("queue: watcher stopped")

    def wake(self) -> None:
        """Make the watcher look at once (at `stop`, or files placed by add/retry)."""
        fd = self._wake_fd
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass  # closed by a run() that just ended: nothing to wake

    def _watch(self, stop: threading.Event, beat: Callable[[], None], wake_fd: int) -> None:
        poller = select.poll()
        poller.register(wake_fd, select.POLLIN)
        with inotify_simple.INotify() as ino:
            poller.register(ino.fileno(), select.POLLIN)
            # Watch first, then scan: a file arriving in between is seen by one or the other.
            wd = ino.add_watch(self.dirs["incoming"], WATCH_MASK)
            _, skipped = self._scan(self.settle_seconds, beat, stop)
            next_scan = time.monotonic() + (self.settle_seconds if skipped else self.rescan_seconds)
            log.info("queue: watching %s", self.dirs["incoming"])
            failures = 0
            while not stop.is_set():
                beat()
                try:
                    wd, next_scan = self._turn(ino, poller, wake_fd, wd, next_scan, stop, beat)
                    failures = 0
                except Exception:
                    # A passing fault (a full disk, a vanished directory) should not end the
                    # watcher; a lasting one should, so that its silent heartbeat is noticed.
                    failures += 1
                    log.exception("queue: watcher error (%d in a row)", failures)
                    if failures >= MAX_WATCHER_FAILURES:
                        raise
                    stop.wait(1.0)

    def _turn(self, ino: inotify_simple.INotify, poller: select.poll, wake_fd: int, wd: int,
              next_scan: float, stop: threading.Event,
              beat: Callable[[], None]) -> tuple[int, float]:
        """One turn of the watcher: wait (at most 1 s), then act on what arrived or is due."""
        now = time.monotonic()
        wake = min(now + 1.0, next_scan)
        deadline = self._next_deadline()
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
                log.warning("queue: %s disappeared; recreating it", self.dirs["incoming"])
                self.dirs["incoming"].mkdir(mode=0o750, parents=True, exist_ok=True)
                wd = ino.add_watch(self.dirs["incoming"], WATCH_MASK)
                rescan = True
            elif ev.wd == wd and ev.name and not ev.name.startswith("."):
                names.append(ev.name)
        with self._lock:
            names += self._poked
            self._poked.clear()
        for name in dict.fromkeys(names):  # each once, in arrival order
            if stop.is_set():
                return wd, next_scan
            beat()
            self._process_incoming(name)
        for pname in self._due_retries():
            if stop.is_set():
                return wd, next_scan
            beat()
            self._attempt(pname)
        if rescan or time.monotonic() >= next_scan:
            _, skipped = self._scan(self.settle_seconds, beat, stop)
            next_scan = time.monotonic() + (self.settle_seconds if skipped else self.rescan_seconds)
        return wd, next_scan

    # ------------------------------------------------------------------ any thread

    def add(self, name: str, data: bytes) -> str:
        """Write `data` atomically into incoming/ under a safe, unused form of `name`."""
        if len(data) > self.max_file_bytes:
            raise FileTooLarge(f"{name!r}: {len(data)} bytes is over the queue's limit of "
                               f"{self.max_file_bytes} bytes")
        safe = sanitize_name(name)
        incoming = self.dirs["incoming"]
        part = incoming / f".{safe}.{secrets.token_hex(4)}.part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with self._lock:
                final = self._place_incoming(part, safe)
                self._poked.append(final)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        _fsync_dir(incoming)
        self.wake()
        log.info("queue: added incoming/%s (%d bytes)", final, len(data))
        self._emit(name=final, state="incoming", size=len(data))
        return final

    def retry(self, name: str) -> str:
        """failed/NAME back to incoming/ (its reason file removed); returns the incoming name."""
        _check_name(name)
        failed = self.dirs["failed"]
        with self._lock:
            if not os.path.lexists(failed / name) or self._is_reason_file(name):
                raise NotInQueue(f"no file {name!r} in {failed}")
            final = self._place_incoming(failed / name, name)
            (failed / (name + REASON_SUFFIX)).unlink(missing_ok=True)
            self._poked.append(final)
        self.wake()
        log.info("queue: retrying failed/%s as incoming/%s", name, final)
        self._emit(name=final, state="incoming", retried_from=name)
        return final

    def _is_reason_file(self, name: str) -> bool:
        return name.endswith(REASON_SUFFIX) and os.path.lexists(
            self.dirs["failed"] / name[: -len(REASON_SUFFIX)])

    def _names(self, state: str) -> list[str]:
        try:
            names = [n for n in os.listdir(self.dirs[state]) if not n.startswith(".")]
        except FileNotFoundError:
            return []
        if state == "failed":
            present = set(names)
            names = [n for n in names
                     if not (n.endswith(REASON_SUFFIX) and n[: -len(REASON_SUFFIX)] in present)]
        return names

    def counts(self) -> dict[str, int]:
        return {state: len(self._names(state)) for state in STATES}

    def list(self, limit: int | None = None) -> dict[str, list[dict]]:
        """Every state's files, oldest first ({"name", "size", "mtime"}, failed: "reason",
        "attempts"); with `limit`, only the newest `limit` of each state."""
        out: dict[str, list[dict]] = {}
        for state in STATES:
            d = self.dirs[state]
            entries = []
            for name in self._names(state):
                try:
                    st = os.lstat(d / name)
                except FileNotFoundError:
                    continue  # moved on while we looked
                entries.append({"name": name, "size": st.st_size, "mtime": st.st_mtime})
            entries.sort(key=lambda e: (e["mtime"], e["name"]))
            if limit is not None:
                entries = entries[-limit:] if limit > 0 else []
            for e in entries:
                if state == "failed":
                    e.update(self._reason(e["name"]))
                elif state == "processing":
                    e["attempts"] = self._read_sidecar(e["name"])[0]
            out[state] = entries
        return out

    def _reason(self, name: str) -> dict[str, Any]:
        try:
            info = json.loads((self.dirs["failed"] / (name + REASON_SUFFIX)).read_text())
            return {"reason": str(info.get("reason")), "attempts": info.get("attempts")}
        except (OSError, ValueError, AttributeError):
            return {"reason": None, "attempts": None}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
