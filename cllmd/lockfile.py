"""One daemon per state directory: an exclusive flock on <state>/cllmd.lock holding our pid.

The kernel drops the lock when the process dies (even by kill -9), so a stale file never blocks.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "cllmd.lock"


class AlreadyRunning(RuntimeError):
    """Another process holds the state directory's lock."""

    def __init__(self, state_dir: Path, pid: int | None):
        who = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"another cllmd ({who}) is already using {state_dir}")
        self.state_dir = state_dir
        self.pid = pid


class StateLock:
    """Exclusive lock of a state directory; use as a context manager or acquire()/release()."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunning; writes our pid into the lock file."""
        if self._fd is not None:
            return
        # O_CLOEXEC: a child we exec must not inherit (and so keep alive) our lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AlreadyRunning(self.state_dir, pid) from None
            raise
        # The file is never unlinked: removing it would let a newcomer lock a fresh inode while
        # another process still holds the old one.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        log.debug("locked %s", self.path)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        log.debug("unlocked %s", self.path)

    def __enter__(self) -> "StateLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    # The holder may be between flock() and writing its pid: then the file is empty.
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
