"""The training queue on disk: four directories and the moves between them (a state machine).

incoming/ -claim (rename)-> processing/ -> done/, or failed/ with NAME.reason; failed/ -retry->
incoming/. Each move is a rename followed by an fsync of the directory; nothing is ever deleted.
The layout and the naming rules are the contract in cllm.layout, shared with the clients.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import threading
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

from cllm import layout
from cllm.durable import atomic_write, fsync_dir, sweep_temps

log = logging.getLogger(__name__)

STATES = layout.QUEUE_STATES
REASON_SUFFIX = layout.REASON_SUFFIX
DIR_MODE = 0o750   # the queue's group (clients that drop files) may enter it
SIDECAR_PREFIX = ".attempts-"
RECENT_MAX = 100_000  # names remembered per state (the protocol's largest queue.list limit)


class QueueError(Exception):
    """A queue operation was refused; the message says why."""


class FileTooLarge(QueueError, ValueError):
    pass


class NotInQueue(QueueError, LookupError):
    """The named file is not where the operation expects it."""


class BadInput(Exception):
    """The file itself is unusable (too large, not a regular file, a hard link...): fail at once."""


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise NotInQueue(f"invalid queue file name {name!r}")


def _read_reason(path: Path) -> dict[str, Any]:
    """A failed file's reason and attempts from its reason file (None for what is unreadable)."""
    try:
        info = json.loads(path.read_text())
        return {"reason": str(info.get("reason")), "attempts": info.get("attempts")}
    except (OSError, ValueError, AttributeError):
        return {"reason": None, "attempts": None}


class QueueDir:
    """The queue in `root` (incoming/, processing/, done/, failed/). Safe from any thread.

    Every move it makes is reported to `on_event` ({"event": "queue", "name", "state", ...});
    `on_placed` callbacks hear of each file it puts into incoming/ itself (add, retry).
    """

    def __init__(self, root: Path, *, max_file_bytes: int,
                 on_event: Callable[[dict], None] | None = None):
        if max_file_bytes < 1:
            raise ValueError("max_file_bytes must be positive")
        self.root = Path(root)
        self.max_file_bytes = max_file_bytes
        self.on_event = on_event
        self.on_placed: list[Callable[[str], None]] = []
        self.dirs = {s: self.root / s for s in STATES}
        for d in self.dirs.values():
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        # Guards the choice of a free name together with the move into it, and _recent.
        self._lock = threading.Lock()
        # The names this process moved into each state, oldest first: list() picks the newest
        # without looking at (stat-ing) every file of a large done/.
        self._recent: dict[str, OrderedDict[str, None]] = {s: OrderedDict() for s in STATES}

    def emit(self, **event: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event({"event": "queue", **event})
        except Exception:
            log.exception("queue event handler failed for %r", event)

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
        max_bytes = layout.NAME_MAX - len(REASON_SUFFIX) if state == "failed" else layout.NAME_MAX
        for cand in layout.candidates(name, max_bytes):
            if not self._taken(state, cand):
                return cand
        raise AssertionError("unreachable")

    def _move(self, src: Path, state: str, name: str) -> str:
        """Rename src into `state` under a free name (caller holds the lock); returns the name.
        Both directories are fsynced: the move survives a power cut before anyone hears of it."""
        final = self._free_name(state, name)
        os.rename(src, self.dirs[state] / final)
        fsync_dir(self.dirs[state])
        fsync_dir(src.parent)
        self._arrived(state, final, src.parent.name, src.name)
        return final

    def _arrived(self, state: str, name: str, from_state: str | None = None,
                 from_name: str | None = None) -> None:
        if from_state in self._recent:
            self._recent[from_state].pop(from_name, None)
        recent = self._recent[state]
        recent[name] = None
        recent.move_to_end(name)
        if len(recent) > RECENT_MAX:
            recent.popitem(last=False)

    # ------------------------------------------------------------------ attempt records

    def _sidecar(self, pname: str) -> Path:
        # A hash keeps the sidecar's name short whatever the data file's name; dot = invisible.
        digest = hashlib.sha256(pname.encode("utf-8", "surrogateescape")).hexdigest()[:24]
        return self.dirs["processing"] / f"{SIDECAR_PREFIX}{digest}"

    def attempts(self, pname: str) -> tuple[int, str | None]:
        """(attempts begun, the last error) of processing/PNAME."""
        try:
            info = json.loads(self._sidecar(pname).read_text())
            return int(info["attempts"]), info.get("last_error")
        except (OSError, ValueError, KeyError, TypeError):
            return 0, None

    def record_attempt(self, pname: str, attempts: int, last_error: str | None) -> None:
        atomic_write(self._sidecar(pname),
                     json.dumps({"name": pname, "attempts": attempts, "last_error": last_error}))

    # ------------------------------------------------------------------ the moves

    def claim(self, name: str) -> str | None:
        """incoming/NAME -> processing/ (atomic rename); None if someone else took it first.

        A name that is not valid UTF-8, or holds control characters, is given a portable form
        here (layout.portable_name): every later step, event and listing can carry it."""
        if name.startswith("."):
            return None
        with self._lock:
            if not os.path.lexists(self.dirs["incoming"] / name):
                return None
            try:
                pname = self._move(self.dirs["incoming"] / name, "processing",
                                   layout.portable_name(name))
            except FileNotFoundError:
                return None
        if pname != name:
            log.info("queue: claimed %r as processing/%r", name, pname)
        return pname

    def open(self, pname: str) -> BinaryIO:
        """processing/PNAME opened for reading, refusing what is not a plain regular file of
        ours or is over the size limit (a reader stops at the limit: the file may still grow)."""
        path = self.dirs["processing"] / pname
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
            if st.st_nlink > 1:
                # Whoever made the link may not be able to read the file it names (mode 0600
                # elsewhere): the daemon must not read it for them.
                raise BadInput(f"a hard link ({st.st_nlink} names for one file): refused; "
                               "copy the file into the queue instead")
            if st.st_size > self.max_file_bytes:
                raise BadInput(f"too large: {st.st_size} bytes, the limit is {self.max_file_bytes}")
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "rb")

    def read(self, pname: str) -> bytes:
        """The bytes of processing/PNAME (see open())."""
        with self.open(pname) as f:
            data = f.read(self.max_file_bytes + 1)
        if len(data) > self.max_file_bytes:  # grew after the fstat
            raise BadInput(f"too large: over the limit of {self.max_file_bytes} bytes")
        return data

    def finish(self, pname: str, **event: Any) -> str:
        """processing/PNAME -> done/; returns the name in done/. `event` joins the done event."""
        with self._lock:
            final = self._move(self.dirs["processing"] / pname, "done", pname)
        self._sidecar(pname).unlink(missing_ok=True)
        if final != pname:
            event["renamed_from"] = pname
        self.emit(name=final, state="done", **event)
        return final

    def fail(self, pname: str, reason: str, attempts: int) -> str:
        """processing/PNAME -> failed/, with failed/NAME.reason saying why."""
        with self._lock:
            final = self._move(self.dirs["processing"] / pname, "failed", pname)
            atomic_write(self.dirs["failed"] / (final + REASON_SUFFIX),
                         json.dumps({"reason": reason, "attempts": attempts, "time": _now_iso()},
                                    ensure_ascii=False) + "\n", mode=0o640)
        self._sidecar(pname).unlink(missing_ok=True)
        log.warning("queue: %r failed: %s", final, reason)
        extra = {"renamed_from": pname} if final != pname else {}
        self.emit(name=final, state="failed", reason=reason, attempts=attempts, **extra)
        return final

    def add(self, name: str, data: bytes) -> str:
        """Write `data` into incoming/ under a safe, unused form of `name` (the queue contract)."""
        if len(data) > self.max_file_bytes:
            raise FileTooLarge(f"{name!r}: {len(data)} bytes is over the queue's limit of "
                               f"{self.max_file_bytes} bytes")
        final = layout.write_incoming(self.dirs["incoming"], layout.sanitize_name(name), data)
        with self._lock:
            self._arrived("incoming", final)
        log.info("queue: added incoming/%r (%d bytes)", final, len(data))
        self.emit(name=final, state="incoming", size=len(data))   # before the watcher is woken
        self._placed(final)
        return final

    def retry(self, name: str) -> str:
        """failed/NAME back to incoming/ (its reason file removed); returns the incoming name."""
        _check_name(name)
        failed = self.dirs["failed"]
        with self._lock:
            if not os.path.lexists(failed / name) or self._is_reason_file(name):
                raise NotInQueue(f"no file {name!r} in {failed}")
            final = layout.place(failed / name, self.dirs["incoming"], name)
            (failed / (name + REASON_SUFFIX)).unlink(missing_ok=True)
            self._arrived("incoming", final, "failed", name)
        fsync_dir(self.dirs["incoming"])
        fsync_dir(failed)
        log.info("queue: retrying failed/%r as incoming/%r", name, final)
        self.emit(name=final, state="incoming", retried_from=name)
        self._placed(final)
        return final

    def _placed(self, name: str) -> None:
        for callback in self.on_placed:
            callback(name)

    # ------------------------------------------------------------------ after a crash

    def stranded(self) -> list[str]:
        """At start: remove what a crash left (orphaned attempt records, temporary files of
        our own writes) and return the files left in processing/, oldest first."""
        pdir = self.dirs["processing"]
        sweep_temps(pdir)
        sweep_temps(self.dirs["failed"])
        names = []
        for entry in os.scandir(pdir):
            if entry.name.startswith(SIDECAR_PREFIX):
                try:
                    owner = json.loads(Path(entry.path).read_text())["name"]
                except (OSError, ValueError, KeyError, TypeError):
                    owner = None
                if owner is None or not os.path.lexists(pdir / owner):
                    os.unlink(entry.path)  # ours, orphaned by a crash after the file moved on
            elif not entry.name.startswith("."):
                names.append(entry.name)
        for entry in os.scandir(self.dirs["failed"]):
            # the temporary reason file of versions before cllm.durable
            if entry.name.startswith(".") and entry.name.endswith(".reason.part"):
                os.unlink(entry.path)
        return self.by_age("processing", names)

    # ------------------------------------------------------------------ looking

    def by_age(self, state: str, names: Iterable[str]) -> list[str]:
        keyed = []
        for name in names:
            try:
                keyed.append((os.lstat(self.dirs[state] / name).st_mtime, name))
            except FileNotFoundError:
                continue
        return [name for _, name in sorted(keyed)]

    def incoming(self) -> list[str]:
        """The names waiting in incoming/ (not the hidden ones being written)."""
        return [n for n in os.listdir(self.dirs["incoming"]) if not n.startswith(".")]

    def _is_reason_file(self, name: str) -> bool:
        return name.endswith(REASON_SUFFIX) and os.path.lexists(
            self.dirs["failed"] / name[: -len(REASON_SUFFIX)])

    def names(self, state: str) -> list[str]:
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
        return {state: len(self.names(state)) for state in STATES}

    def list(self, limit: int | None = None,
             states: Iterable[str] = STATES) -> dict[str, list[dict]]:
        """Each state's files, oldest first ({"name", "size", "mtime"}, failed: "reason",
        "attempts"). With `limit`, the newest `limit` of each state, chosen before any file is
        looked at: those this process moved there, the latest first, then the others by name
        (the last first). Names that are not UTF-8 are shown in their portable form."""
        out: dict[str, list[dict]] = {}
        for state in states:
            d = self.dirs[state]
            names = self.names(state)
            if limit is not None and len(names) > limit:
                present = set(names)
                with self._lock:
                    chosen = [n for n in reversed(self._recent[state]) if n in present][:limit]
                if len(chosen) < limit:
                    taken = set(chosen)
                    chosen += sorted((n for n in names if n not in taken),
                                     reverse=True)[:limit - len(chosen)]
                names = chosen
            entries = []
            for name in names:
                try:
                    st = os.lstat(d / name)
                except FileNotFoundError:
                    continue  # moved on while we looked
                entries.append({"name": name, "size": st.st_size, "mtime": st.st_mtime})
            entries.sort(key=lambda e: (e["mtime"], e["name"]))
            for e in entries:
                if state == "failed":
                    e.update(self._reason(e["name"]))
                elif state == "processing":
                    e["attempts"] = self.attempts(e["name"])[0]
                e["name"] = layout.portable_name(e["name"])
            out[state] = entries
        return out

    def _reason(self, name: str) -> dict[str, Any]:
        path = self.dirs["failed"] / (name + REASON_SUFFIX)
        if os.path.lexists(path):
            return _read_reason(path)
        with self._lock:   # fail() may be between the file's rename and its reason's write
            return _read_reason(path)


__all__ = ["STATES", "REASON_SUFFIX", "BadInput", "FileTooLarge", "NotInQueue", "QueueDir",
           "QueueError"]
