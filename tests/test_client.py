"""cllm.client against a real cllmd Server on ipc (and CURVE tcp) sockets, and against raw
ZeroMQ ROUTER peers that misbehave on purpose (silence, vanishing mid-stream)."""
import os
import shutil
import socket as pysocket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import zmq

from cllm.client import Client, ClientError, DaemonNotRunning, RequestError
from cllmd.protocol import decode, encode, reply_ok, stream_token
from cllmd.server import Server

LIMIT = 1024 * 1024
NOT_RUNNING_WITHIN_S = 2.0   # the contract of issue 5: the user learns it within 2 seconds


def short_dir():
    return tempfile.mkdtemp(prefix="cllm-c", dir="/tmp")   # unix socket paths are short


class Daemon:
    """A real Server with a counting ``generate``, an ``echo``, and a ``slow`` op held by a test."""

    def __init__(self, path=None, **kw):
        self.dir = short_dir() if path is None else os.path.dirname(path)
        self.path = path or os.path.join(self.dir, "cllmd.sock")
        self.release = threading.Event()
        self.started = threading.Event()
        self.observed_cancel = threading.Event()
        kw.setdefault("max_message_bytes", LIMIT)
        self.server = Server(f"ipc://{self.path}",
                             f"ipc://{os.path.join(self.dir, 'cllmd-events.sock')}", **kw)
        self.server.register("echo", lambda req, ctx: req.args)
        self.server.register("slow", self.slow, blocking=True)
        self.server.register("generate", self.generate, stream=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.server.serve, args=(self.stop,))
        self.thread.start()

    def slow(self, req, ctx):
        self.started.set()
        self.release.wait(10)
        return {"slow": True}

    def generate(self, req, ctx):
        n = 0
        while n < req.args["max_tokens"] and not ctx.cancelled.is_set():
            yield f"{n} "
            n += 1
            ctx.cancelled.wait(0.002)
        if ctx.cancelled.is_set():
            self.observed_cancel.set()
        return {"tokens_prompt": len(req.args["prompt"].split()), "tokens_generated": n,
                "seconds": 0.5, "tokens_per_second": n / 0.5,
                "stop_reason": "cancelled" if ctx.cancelled.is_set() else "max_tokens"}

    def shutdown(self):
        self.release.set()
        self.stop.set()
        self.server.close()          # wakes the loop, waits for it to drain and return
        self.thread.join(10)


@pytest.fixture
def daemon():
    d = Daemon()
    yield d
    d.shutdown()
    shutil.rmtree(d.dir, ignore_errors=True)


@pytest.fixture
def client(daemon):
    c = Client(daemon.path, timeout=5)
    yield c
    c.close()


@pytest.fixture
def rundir():
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- requests

def test_client_request_returns_the_result(client):
    assert client.request("echo", a=1, data=b"\x00\xff") == {"a": 1, "data": b"\x00\xff"}
    assert client.request("ping")["pong"] is True


def test_client_ping_returns_round_trip_seconds(client):
    rtt = client.ping()
    assert isinstance(rtt, float) and rtt > 0


def test_client_error_reply_raises_request_error_with_code(client):
    with pytest.raises(RequestError) as e:
        client.request("no.such.op")
    assert e.value.code == "unknown_op" and "no.such.op" in e.value.message
    with pytest.raises(RequestError) as e:
        client.request("generate", prompt="x", temperature="hot")
    assert e.value.code == "bad_request" and "temperature" in e.value.message


def test_client_request_gathers_a_streamed_op(client):
    result = client.request("generate", prompt="a b", max_tokens=3)
    assert result["text"] == "0 1 2 " and result["tokens_prompt"] == 2
    assert result["stop_reason"] == "max_tokens"


def test_client_finds_the_socket_through_cllm_socket(daemon, monkeypatch):
    monkeypatch.setenv("CLLM_SOCKET", daemon.path)
    with Client(timeout=5) as c:
        assert c.endpoint == f"ipc://{daemon.path}"
        assert c.request("ping")["version"] == 1


# --------------------------------------------------------------------------- generation

def test_client_generate_yields_pieces_then_sets_stats(client):
    gen = client.generate("hello world", max_tokens=4, temperature=0.0)
    assert gen.stats is None
    assert list(gen) == ["0 ", "1 ", "2 ", "3 "]
    assert gen.text == "0 1 2 3 " and gen.done
    assert gen.stats == {"tokens_prompt": 2, "tokens_generated": 4, "seconds": 0.5,
                         "tokens_per_second": 8.0, "stop_reason": "max_tokens"}


def test_client_generate_cancel_stops_the_daemons_generation(client, daemon):
    gen = client.generate("p", max_tokens=65536)
    pieces = [next(gen) for _ in range(3)]
    stats = gen.cancel()
    assert pieces == ["0 ", "1 ", "2 "]
    assert stats["stop_reason"] == "cancelled" and stats["tokens_generated"] < 65536
    assert daemon.observed_cancel.is_set()
    assert list(gen) == []


def test_client_generate_closed_mid_stream_cancels_in_the_daemon(client, daemon):
    with client.generate("p", max_tokens=65536) as gen:
        next(gen)
    assert daemon.observed_cancel.wait(5)


def test_client_generate_cancelled_while_queued_reports_cancelled(rundir):
    d = Daemon(os.path.join(rundir, "cllmd.sock"), workers=1, max_pending=1)
    try:
        with Client(d.path, timeout=5) as c:
            holder = Client(d.path, timeout=5)
            t = threading.Thread(target=holder.request, args=("slow",))
            t.start()
            assert d.started.wait(5)
            gen = c.generate("p")
            assert gen.cancel() == {"tokens_generated": 0, "stop_reason": "cancelled"}
            d.release.set()
            t.join()
            holder.close()
    finally:
        d.shutdown()


def test_client_generate_bad_arguments_raise_on_first_piece(client):
    gen = client.generate("p", max_tokens=0)
    with pytest.raises(RequestError) as e:
        next(gen)
    assert e.value.code == "bad_request" and "max_tokens" in e.value.message


def test_client_requests_interleave_with_a_running_generation(client):
    gen = client.generate("p", max_tokens=65536)
    next(gen)
    assert client.request("echo", x=1) == {"x": 1}
    next(gen)
    assert gen.cancel()["stop_reason"] == "cancelled"


def test_client_busy_is_a_request_error(rundir):
    d = Daemon(os.path.join(rundir, "cllmd.sock"), workers=1, max_pending=0)
    try:
        with Client(d.path, timeout=5) as c:
            gen = c.generate("p", max_tokens=65536)
            next(gen)
            with pytest.raises(RequestError) as e:
                next(c.generate("q"))
            assert e.value.code == "busy"
            gen.cancel()
    finally:
        d.shutdown()


# --------------------------------------------------------------------------- events

def test_client_subscribe_receives_only_the_chosen_topics(client, daemon):
    done = threading.Event()

    def publisher():
        step = 0
        while not done.is_set():
            daemon.server.publish("trainer-x", {"never": True})   # a prefix match, not ours
            daemon.server.publish("log", {"level": "info", "message": "hi"})
            daemon.server.publish("train", {"step": step})
            step += 1
            done.wait(0.01)

    with client.subscribe(["train"], timeout=5) as sub:
        t = threading.Thread(target=publisher)
        t.start()
        try:
            events = [sub.recv(5) for _ in range(3)]
        finally:
            done.set()
            t.join()
    assert all(e is not None and e[0] == "train" for e in events)
    steps = [payload["step"] for _, payload in events]
    assert steps == sorted(steps) and all("seq" in p and "time" in p for _, p in events)


def test_client_subscription_iteration_ends_after_timeout(client):
    with client.subscribe(["checkpoint"], timeout=0.2) as sub:
        assert list(sub) == []
        assert sub.recv(0.05) is None


# --------------------------------------------------------------------------- daemon not running

def test_client_daemon_not_running_without_socket_file(rundir):
    path = os.path.join(rundir, "cllmd.sock")
    t0 = time.monotonic()
    with Client(path) as c, pytest.raises(DaemonNotRunning) as e:
        c.request("status")
    assert time.monotonic() - t0 < NOT_RUNNING_WITHIN_S
    assert str(e.value) == f"cllmd is not running (no socket at {path})"


def test_client_daemon_not_running_with_stale_socket_file(rundir):
    path = os.path.join(rundir, "cllmd.sock")
    s = pysocket.socket(pysocket.AF_UNIX)
    s.bind(path)
    s.close()                      # the file stays, nobody listens: a daemon killed with -9
    t0 = time.monotonic()
    with Client(path) as c:
        with pytest.raises(DaemonNotRunning, match="nothing listening at"):
            c.request("ping")
        with pytest.raises(DaemonNotRunning):
            c.generate("p")
    assert time.monotonic() - t0 < NOT_RUNNING_WITHIN_S


def test_client_daemon_not_running_when_path_is_not_a_socket(rundir):
    path = os.path.join(rundir, "cllmd.sock")
    open(path, "w").close()
    with Client(path) as c, pytest.raises(DaemonNotRunning):
        c.request("ping")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_client_permission_denied_says_so(daemon):
    os.chmod(daemon.path, 0)
    with Client(daemon.path) as c, pytest.raises(ClientError, match="permission denied"):
        c.request("ping")


def test_client_works_again_after_the_daemon_restarts(rundir):
    path = os.path.join(rundir, "cllmd.sock")
    c = Client(path, timeout=5)
    try:
        d = Daemon(path)
        assert c.request("ping")["pong"] is True
        d.shutdown()
        with pytest.raises(DaemonNotRunning):
            c.request("ping")
        d = Daemon(path)
        assert c.request("ping")["pong"] is True
        d.shutdown()
    finally:
        c.close()


def test_client_survives_a_daemon_restart_between_requests(rundir):
    path = os.path.join(rundir, "cllmd.sock")
    c = Client(path, timeout=5)
    try:
        d = Daemon(path)
        assert c.request("ping")["pong"] is True
        d.shutdown()
        d = Daemon(path)            # back before the client's next request
        assert c.request("echo", n=2) == {"n": 2}
        d.shutdown()
    finally:
        c.close()


# --------------------------------------------------------------------------- raw peers

@pytest.fixture
def fake(rundir):
    """A bare ROUTER where the daemon's socket would be; the test plays the daemon."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    path = os.path.join(rundir, "cllmd.sock")
    router.bind(f"ipc://{path}")
    yield path, router
    ctx.destroy(0)


def in_thread(fn):
    """Run fn on a thread; returns (thread, outcome dict with 'result' or 'error')."""
    outcome = {}

    def run():
        try:
            outcome["result"] = fn()
        except Exception as e:   # handed to the test thread, which asserts on it
            outcome["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, outcome


def test_client_retries_idempotent_op_on_a_fresh_socket(fake):
    path, router = fake
    c = Client(path, timeout=0.3, retries=2)
    t, outcome = in_thread(lambda: c.request("status"))
    assert router.poll(5000)
    first_identity, first = router.recv_multipart()      # ignored: the "daemon" is slow
    assert router.poll(5000)
    second_identity, second = router.recv_multipart()
    req = decode(second)
    router.send_multipart([second_identity, encode(reply_ok(req["id"], {"state": "idle"}))])
    t.join(10)
    c.close()
    assert outcome == {"result": {"state": "idle"}}
    assert decode(first)["op"] == req["op"] == "status"
    assert first_identity != second_identity               # closed and reopened (Lazy Pirate)


def test_client_never_resends_a_non_idempotent_op(fake):
    path, router = fake
    c = Client(path, timeout=0.3, retries=2)
    t, outcome = in_thread(lambda: c.request("model.save"))
    t.join(10)
    c.close()
    err = outcome["error"]
    assert isinstance(err, RequestError) and err.code == "timeout"
    seen = []
    while router.poll(100):
        seen.append(decode(router.recv_multipart()[1])["op"])
    assert seen == ["model.save"]


def test_client_gives_up_after_the_retries_with_a_timeout(fake):
    path, router = fake
    with Client(path, timeout=0.1, retries=1) as c, pytest.raises(RequestError) as e:
        c.request("ping")
    assert e.value.code == "timeout" and "2 attempts" in e.value.message


def test_client_daemon_going_away_mid_stream_raises_daemon_not_running(fake):
    path, router = fake
    c = Client(path, timeout=5)
    got_piece = threading.Event()

    def consume():
        pieces = []
        for piece in c.generate("p"):
            pieces.append(piece)
            got_piece.set()
        return pieces

    t, outcome = in_thread(consume)
    assert router.poll(5000)
    identity, frame = router.recv_multipart()
    router.send_multipart([identity, encode(stream_token(decode(frame)["id"], "first"))])
    assert got_piece.wait(5)
    router.close(0)                 # the daemon dies without a word
    t.join(10)
    c.close()
    assert isinstance(outcome.get("error"), DaemonNotRunning)
    assert "went away" in str(outcome["error"])


def test_client_ignores_replies_to_earlier_attempts(fake):
    path, router = fake
    c = Client(path, timeout=5)
    t, outcome = in_thread(lambda: c.request("status"))
    assert router.poll(5000)
    identity, frame = router.recv_multipart()
    rid = decode(frame)["id"]
    router.send_multipart([identity, encode(reply_ok(rid + 1000, "stale"))])
    router.send_multipart([identity, encode({"v": 1, "id": rid, "event": "queued"})])
    router.send_multipart([identity, encode(reply_ok(rid, "fresh"))])
    t.join(10)
    c.close()
    assert outcome == {"result": "fresh"}


# --------------------------------------------------------------------------- TCP with CURVE

def test_client_curve_over_tcp_authorized_works_unauthorized_is_told(curve_server):
    server, (friend_pub, friend_sec) = curve_server.server, curve_server.friend
    stranger_pub, stranger_sec = curve_server.stranger
    with Client(server.tcp_endpoint, timeout=5, events=server.events_tcp_endpoint,
                curve=(friend_sec, friend_pub, curve_server.server_pub)) as friend:
        assert friend.request("ping")["pong"] is True
        with friend.subscribe(["train"]) as sub:
            event = None
            while event is None:   # a new subscriber misses what came before it joined
                server.publish("train", {"step": 1})
                event = sub.recv(0.05)
        assert event[0] == "train" and event[1]["step"] == 1
    with Client(server.tcp_endpoint, timeout=5, retries=0,
                curve=(stranger_sec, stranger_pub, curve_server.server_pub)) as stranger:
        with pytest.raises(ClientError, match="refused our CURVE key"):
            stranger.request("ping")


# --------------------------------------------------------------------------- weight

def test_client_imports_only_pyzmq_msgpack_and_the_standard_library():
    code = ("import sys, cllm.client, cllm.wire\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('numpy', 'numba', 'cllmd', 'psutil', 'tokenizers'))\n"
            "print(bad)\n"
            "sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
