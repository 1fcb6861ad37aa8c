"""A real pseudo-terminal for tests of interactive commands: the child gets the pty as its
controlling terminal (so Ctrl-C typed into it is a real SIGINT from the tty driver)."""
from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
import threading
import time

ANSI = re.compile(rb"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78DEHM])")


def strip_ansi(data: bytes) -> str:
    """The text a program wrote, escape sequences (cursor moves, colours, modes) removed."""
    return ANSI.sub(b"", data).replace(b"\r", b"").decode("utf-8", "replace")


class Pty:
    """Runs `argv` on a new pty of `rows` x `cols`; collects everything it writes."""

    def __init__(self, argv: list[str], env: dict | None = None, rows: int = 24, cols: int = 80):
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.initial_attrs = termios.tcgetattr(self.slave)
        self.data = bytearray()
        self._cond = threading.Condition()
        self._closed = False

        def controlling_tty():
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(argv, stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                     env=dict(os.environ, TERM="xterm", **(env or {})),
                                     start_new_session=True, preexec_fn=controlling_tty, close_fds=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:   # EIO once every slave fd is closed
                chunk = b""
            with self._cond:
                if not chunk:
                    self._closed = True
                    self._cond.notify_all()
                    return
                self.data += chunk
                self._cond.notify_all()

    def write(self, text: str | bytes) -> None:
        os.write(self.master, text.encode() if isinstance(text, str) else text)

    def text(self, start: int = 0) -> str:
        with self._cond:
            return strip_ansi(bytes(self.data[start:]))

    def mark(self) -> int:
        """A position in the output, to wait for what comes after it."""
        with self._cond:
            return len(self.data)

    def expect(self, pattern: str, start: int = 0, timeout: float = 30.0) -> re.Match:
        """Waits until the (escape-stripped) output after `start` matches `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(strip_ansi(bytes(self.data[start:])))
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (self._closed and self.proc.poll() is not None):
                    tail = strip_ansi(bytes(self.data[start:]))[-3000:]
                    raise AssertionError(f"no {pattern!r} in the output (exit {self.proc.poll()}); "
                                         f"it ends with:\n{tail}")
                self._cond.wait(min(left, 0.2))

    def wait_reading(self, timeout: float = 30.0) -> None:
        """Waits until the child sleeps waiting for input (select/poll/read on the terminal).

        A key typed before that may be missed: CPython's readline installs its prompt and only
        then enters select(), so a SIGINT landing in between is noticed only at the next key.
        """
        path = f"/proc/{self.proc.pid}/wchan"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(path) as f:
                    wchan = f.read()
            except OSError:
                time.sleep(0.5)   # no /proc: give it a moment instead
                return
            if any(w in wchan for w in ("poll", "select", "n_tty_read", "wait_woken")):
                return
            time.sleep(0.02)
        raise AssertionError(f"the child never waited for input (wchan {wchan!r})")

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.slave)   # the child is gone: the reader now gets EIO and ends
        self._reader.join(5)
        os.close(self.master)


def cllm(*args: str) -> list[str]:
    """argv of the `cllm` command as this interpreter runs it."""
    return [sys.executable, "-m", "cllm.cli", *args]


def cllm_status(*args: str) -> list[str]:
    return [sys.executable, "-m", "cllm.status", *args]
