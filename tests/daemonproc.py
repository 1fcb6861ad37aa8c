"""A real cllmd daemon as a subprocess on temporary directories, for tests of any client."""
from __future__ import annotations

import bisect
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cllm.client import Client

TINY_MODEL = ["--model-tokenizer", "bytes", "--model-n-layer", "1", "--model-n-head", "2",
              "--model-n-embd", "32", "--model-block-size", "32"]
QUICK = ["--train-checkpoint-interval-seconds", "2", "--train-eval-interval", "0",
         "--server-events-interval", "0.2"]


# Waits are for progress (a file done, a step taken), never a measure of speed: on a loaded
# machine the daemon's first steps and compiles take several times longer, so every wait gets
# this factor of slack (a wait that succeeds returns at once; only a failure takes longer).
SLACK = float(os.environ.get("CLLMD_TEST_SLACK", "3"))


def wait_for(predicate, timeout=60.0, what="condition"):
    timeout *= SLACK
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class NotifyListener:
    """Stands in for systemd's notification socket: collects the datagrams cllmd sends."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.pings: list[float] = []  # when each WATCHDOG=1 arrived (monotonic seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            lines = data.decode().splitlines()
            if "WATCHDOG=1" in lines:
                self.pings.append(time.monotonic())
            self.messages.extend(lines)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time without a watchdog ping between `start` and `end` (monotonic seconds)."""
        inside = self.pings[bisect.bisect_left(self.pings, start):bisect.bisect_right(self.pings, end)]
        marks = [start, *inside, end]
        return max(b - a for a, b in zip(marks, marks[1:]))

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class Daemon:
    """A cllmd subprocess on its own temporary directories."""

    def __init__(self, root: Path, *extra, env=None, model: bool = True):
        self.root = root
        self.state, self.run, self.cache = root / "state", root / "run", root / "cache"
        self.log_path = root / "daemon.log"
        # the model goes where a state directory of before named models had it: every daemon
        # test starts by migrating it to models/default/ (tests/test_models.py checks that)
        if model and not (self.state / "model.cllm").exists() and not (self.state / "checkpoints").exists() \
                and not (self.state / "models").exists():
            self.make_model()
        self.args = [sys.executable, "-m", "cllmd.cli", "serve", "--state-dir", str(self.state),
                     "--runtime-dir", str(self.run), "--cache-dir", str(self.cache), *QUICK, *TINY_MODEL,
                     *extra]
        self.env = dict(os.environ, **(env or {}))
        self.proc = None

    def model_dir(self, name: str = "default") -> Path:
        """A named model's directory (its model.cllm, checkpoints/ and data/)."""
        return self.state / "models" / name

    def make_model(self):
        from cllmd.model import Model, ModelConfig
        from cllmd.tokenizer import BytesTokenizer
        self.state.mkdir(parents=True, exist_ok=True)
        cfg = ModelConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=32, block_size=32)
        Model(cfg, seed=0, tokenizer=BytesTokenizer()).save(self.state / "model.cllm")

    def start(self, wait=True):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        if wait:
            self.client = self.connect()
        return self

    def connect(self) -> Client:
        sock = self.run / "cllmd.sock"

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"cllmd exited with {self.proc.returncode}:\n{self.output()}")
            if not sock.exists():
                return None
            c = Client(socket=str(sock), timeout=5)
            try:
                if "starting" not in c.request("ping"):   # served, not only starting up
                    return c
                c.close()
                return None
            except Exception:
                c.close()  # an unclosed client's context would block in its finalizer later
                return None
        return wait_for(up, 300, "the daemon to start (ping without 'starting')")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def queue(self, state) -> list[str]:
        d = self.state / "queue" / state
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else []

    def close_client(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
            self.client = None

    def stop(self, sig=signal.SIGTERM, timeout=120) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        self.close_client()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def daemon(tmp_path):
    started = []

    def make(*extra, env=None, model=True, start=True):
        d = Daemon(tmp_path, *extra, env=env, model=model)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.close_client()
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def drop(daemon, name: str, data: bytes):
    """Writes a file into incoming/ the way users do: a temporary name, then rename."""
    incoming = daemon.state / "queue" / "incoming"
    tmp = incoming / f".{name}.part"
    tmp.write_bytes(data)
    os.rename(tmp, incoming / name)
