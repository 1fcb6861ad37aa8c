"""sd_notify(3) in plain Python: tell systemd we are ready, alive, reloading or stopping.

Every call does nothing (and returns False) when $NOTIFY_SOCKET is unset, i.e. outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send one notification ("READY=1", "STATUS=...", ...); True if it was sent."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # Linux abstract namespace
    elif not addr.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r is not a unix socket address; not notifying", addr)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError as e:
        # systemd going away must never take the daemon down with it.
        log.warning("sd_notify %r to %s failed: %s", state.split("\n", 1)[0], addr.lstrip("\0"), e)
        return False
    return True


def ready() -> bool:
    return notify("READY=1")


def status(text: str) -> bool:
    # STATUS= is one line: a newline would start a new (bogus) assignment.
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def stopping() -> bool:
    return notify("STOPPING=1")


def reloading() -> bool:
    # Type=notify-reload wants the CLOCK_MONOTONIC time of the reload along with RELOADING=1.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when not watched.

    $WATCHDOG_PID, when set, must be our pid: the variable is otherwise meant for a parent.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None
