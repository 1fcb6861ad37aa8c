"""sd_notify against a real AF_UNIX datagram socket standing in for systemd's."""

import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from cllmd import sdnotify


@pytest.fixture
def listener(monkeypatch):
    # A short path: AF_UNIX addresses are limited to 108 bytes, pytest's tmp_path may be longer.
    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        path = os.path.join(d, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock
        sock.close()


def recv(sock):
    return sock.recv(4096).decode()


def test_sdnotify_does_nothing_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False


def test_sdnotify_sends_each_state_in_order(listener):
    assert sdnotify.ready()
    assert sdnotify.status("step 10\nloss 2.5")
    assert sdnotify.watchdog()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.stopping()
    assert recv(listener) == "READY=1"
    assert recv(listener) == "STATUS=step 10 loss 2.5"  # one line, always
    assert recv(listener) == "WATCHDOG=1"
    first, second = recv(listener).split("\n")
    assert first == "RELOADING=1"
    key, usec = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    assert recv(listener) == "STOPPING=1"


def test_sdnotify_abstract_namespace(monkeypatch):
    name = f"cllmd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert recv(sock) == "READY=1"


def test_sdnotify_from_a_child_process(listener):
    # The daemon is a separate process that only inherits NOTIFY_SOCKET, as under systemd.
    subprocess.run([sys.executable, "-c", "from cllmd import sdnotify; sdnotify.ready()"],
                   check=True, timeout=60)
    assert recv(listener) == "READY=1"


def test_sdnotify_gone_socket_is_not_fatal(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.watchdog() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # not supported: ignored
    assert sdnotify.ready() is False


def test_sdnotify_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    assert sdnotify.watchdog_interval() == 10.0  # ping at half the timeout
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None
