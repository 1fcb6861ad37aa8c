"""The server's socket loop over real ipc (and CURVE tcp) sockets, driven by raw ZeroMQ sockets
that send good and bad frames, with real handlers registered by the tests."""
import logging
import os
import random
import shutil
import stat
import tempfile
import threading

import msgpack
import pytest
import zmq

from cllmd.generate import SamplingOptions
from cllmd.protocol import NOT_FOUND, ProtocolError, decode, encode, make_request
from cllmd.server import Server

LIMIT = 64 * 1024
WAIT_MS = 5000     # an upper bound on waiting for something that must come, never a measurement


class Harness:
    """A Server on a short temporary directory, serving on its own thread, with test handlers."""

    def __init__(self, **kw):
        self.dir = tempfile.mkdtemp(prefix="cllmd-t", dir="/tmp")  # unix socket paths are short
        self.sock_path = os.path.join(self.dir, "cllmd.sock")
        self.events_path = os.path.join(self.dir, "cllmd-events.sock")
        kw.setdefault("max_message_bytes", LIMIT)
        self.server = Server(f"ipc://{self.sock_path}", f"ipc://{self.events_path}", **kw)
        self.release = threading.Event()      # lets "slow" and "hold" handlers finish
        self.started = threading.Event()      # set when "slow" or a "hold" generation started
        self.observed_cancel = threading.Event()
        self.beats = 0
        self.server.register("echo", self.echo)
        self.server.register("boom", self.boom)
        self.server.register("lookup", self.lookup)
        self.server.register("huge", lambda req, ctx: b"x" * (LIMIT + 1))
        self.server.register("slow", self.slow, blocking=True)
        self.server.register("generate", self.generate, stream=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.server.serve, args=(self.stop, self.beat))
        self.thread.start()
        self.ctx = zmq.Context()

    # handlers ------------------------------------------------------------------------

    def beat(self):
        self.beats += 1

    def echo(self, req, ctx):
        return {"args": req.args, "client": ctx.client, "transport": ctx.transport}

    def boom(self, req, ctx):
        raise RuntimeError("boom")

    def lookup(self, req, ctx):
        raise ProtocolError(NOT_FOUND, "no such thing")

    def slow(self, req, ctx):
        self.started.set()
        self.release.wait(10)
        return {"slow": True}

    def generate(self, req, ctx):
        """Numbers as text until max_tokens or cancellation; prompts pick special behaviours."""
        prompt, n = req.args["prompt"], 0
        limit = SamplingOptions.from_args(req.args).max_tokens  # nil: the default, as the daemon does
        if prompt == "hold":
            self.started.set()
            self.release.wait(10)
        while n < limit and not ctx.cancelled.is_set():
            if prompt == "fail" and n == 1:
                raise ValueError("broken after one token")
            yield ("x" * 4096) if prompt == "flood" else {"text": str(n), "n": n}
            n += 1
            ctx.cancelled.wait(0.0002 if prompt == "flood" else 0.002)
        if ctx.cancelled.is_set():
            self.observed_cancel.set()
        return {"tokens_prompt": len(prompt), "tokens_generated": n,
                "stop_reason": "cancelled" if ctx.cancelled.is_set() else "max_tokens"}

    # raw client side -------------------------------------------------------------------

    def dealer(self, kind=zmq.DEALER, rcvhwm=None):
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        if rcvhwm is not None:
            s.setsockopt(zmq.RCVHWM, rcvhwm)
        s.connect(f"ipc://{self.sock_path}")
        return s

    def close(self):
        self.release.set()
        self.stop.set()
        self.server.close()          # wakes the loop, waits for it to drain and return
        self.thread.join(10)
        self.ctx.destroy(0)
        shutil.rmtree(self.dir, ignore_errors=True)


def recv(sock, timeout_ms=WAIT_MS):
    assert sock.poll(timeout_ms), "no reply"
    return decode(sock.recv())


def ask(sock, msg, timeout_ms=WAIT_MS):
    sock.send(msg if isinstance(msg, bytes) else encode(msg))
    return recv(sock, timeout_ms)


def read_stream(sock, rid):
    """Messages of request ``rid`` up to and including its done event or error reply."""
    out = []
    while True:
        msg = recv(sock)
        if msg.get("id") != rid:
            continue
        out.append(msg)
        if msg.get("event") == "done" or msg.get("ok") is False:
            return out


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


@pytest.fixture
def make_harness():
    made = []

    def make(**kw):
        made.append(Harness(**kw))
        return made[-1]
    yield make
    for h in made:
        h.close()


# --------------------------------------------------------------------------- basics

def test_server_ipc_sockets_are_mode_0660(harness):
    for path in (harness.sock_path, harness.events_path):
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660


def test_server_ping_answers_pong_with_versions(harness):
    reply = ask(harness.dealer(), make_request(1, "ping"))
    assert reply["v"] == 1 and reply["id"] == 1 and reply["ok"] is True
    assert reply["result"]["pong"] is True and reply["result"]["version"] == 1
    assert reply["result"]["daemon"].startswith("cllmd ")


def test_server_echo_gets_args_identity_and_transport(harness):
    reply = ask(harness.dealer(), make_request("e", "echo", {"a": [1, b"\x00"]}))
    result = reply["result"]
    assert result["args"] == {"a": [1, b"\x00"]} and result["transport"] == "ipc"
    assert isinstance(result["client"], bytes) and result["client"]


def test_server_req_socket_gets_its_reply_through_the_envelope(harness):
    req = harness.dealer(zmq.REQ)
    assert ask(req, make_request(3, "ping"))["ok"] is True
    reply = ask(req, make_request(4, "generate", {"prompt": "p", "max_tokens": 3,
                                                  "stream": False}))
    assert reply["result"]["text"] == "012"


def test_server_heartbeat_beats_while_serving(harness):
    d = harness.dealer()
    for i in range(50):   # each ping is one loop turn at least; beats come at least that often
        ask(d, make_request(i, "ping"))
        if harness.beats >= 3:
            break
    assert harness.beats >= 3


def test_server_close_removes_socket_files(make_harness):
    h = make_harness()
    h.stop.set()
    h.thread.join(10)
    h.server.close()
    assert not os.path.exists(h.sock_path) and not os.path.exists(h.events_path)


# --------------------------------------------------------------------------- bad input

def test_server_malformed_msgpack_gets_bad_request_with_nil_id(harness):
    reply = ask(harness.dealer(), b"\xc1\x00")
    assert reply["ok"] is False and reply["id"] is None
    assert reply["error"]["code"] == "bad_request" and "msgpack" in reply["error"]["message"]


def test_server_hundreds_of_random_frames_each_get_an_error_and_serving_continues(harness):
    rng = random.Random(1)
    d = harness.dealer()
    junk = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))) for _ in range(300)]
    typed = [{"v": 1, "id": i, "op": rng.choice(["generate", "ping"]),
              "args": {"prompt": rng.choice([None, 1, "", [], {}]),
                       "max_tokens": rng.choice([-1, 0, "x", 1.5, 70000])}} for i in range(100)]
    for f in junk + [encode(m) for m in typed]:
        d.send(f)
    # every one is answered on the socket thread, so the replies come back in order
    for _ in junk:
        reply = recv(d)
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    for m in typed:
        reply = recv(d)
        assert reply["id"] == m["id"] and reply["ok"] is (m["op"] == "ping")
    assert ask(d, make_request("after", "ping"))["result"]["pong"] is True


@pytest.mark.parametrize("msg, code, rid, fragment", [
    ({"v": 2, "id": 9, "op": "ping"}, "version", 9, "unsupported protocol version 2"),
    ({"id": 9, "op": "ping"}, "bad_request", 9, "missing field 'v'"),
    ({"v": 1, "id": 9.5, "op": "ping"}, "bad_request", None, "'id' must be"),
    ({"v": 1, "id": 9, "op": 7}, "bad_request", 9, "'op' must be"),
    ({"v": 1, "id": 9, "op": "ping", "args": "x"}, "bad_request", 9, "'args' must be a map"),
    ({"v": 1, "id": 9, "op": "nope"}, "unknown_op", 9, "unknown op 'nope'"),
    ({"v": 1, "id": 9, "op": "generate", "args": {"prompt": 5}}, "bad_request", 9,
     "generate: argument 'prompt' must be a str, got an integer"),
    ({"v": 1, "id": 9, "op": "generate", "args": {}}, "bad_request", 9,
     "missing required argument 'prompt'"),
    ({"v": 1, "id": 9, "op": "generate", "args": {"prompt": "", "max_tokens": 0}},
     "bad_request", 9, "argument 'max_tokens' must be between 1 and 65536"),
])
def test_server_bad_requests_get_the_right_error(harness, msg, code, rid, fragment):
    reply = ask(harness.dealer(), encode(msg))
    assert (reply["ok"], reply["id"], reply["error"]["code"]) == (False, rid, code)
    assert fragment in reply["error"]["message"]


def test_server_version_error_lists_supported_versions(harness):
    reply = ask(harness.dealer(), encode({"v": 3, "id": "x", "op": "ping"}))
    assert reply["error"]["supported"] == [1]


def test_server_oversized_frame_gets_too_large_with_its_id(harness):
    d = harness.dealer()
    frame = encode(make_request("big", "echo", {"data": b"x" * LIMIT}))
    reply = ask(d, frame)
    assert (reply["id"], reply["error"]["code"]) == ("big", "too_large")
    assert ask(d, make_request(1, "ping"))["ok"] is True


def test_server_frame_beyond_hard_cap_is_dropped_and_serving_continues(harness):
    d = harness.dealer()
    d.send(encode(make_request("huge", "echo", {"data": b"x" * (3 * LIMIT)})))
    assert not d.poll(500)          # the transport cut the connection: nobody to answer
    assert ask(harness.dealer(), make_request(1, "ping"))["ok"] is True


def test_server_multi_frame_request_is_bad_request(harness):
    d = harness.dealer()
    d.send_multipart([encode(make_request(1, "ping")), b"extra"])
    reply = recv(d)
    assert reply["error"]["code"] == "bad_request" and "exactly one" in reply["error"]["message"]


def test_server_reply_over_the_limit_becomes_too_large(harness):
    reply = ask(harness.dealer(), make_request(5, "huge"))
    assert (reply["id"], reply["error"]["code"]) == (5, "too_large")


# --------------------------------------------------------------------------- handler failures

def test_server_handler_exception_is_internal_and_logged_with_traceback(harness, caplog):
    with caplog.at_level(logging.ERROR, logger="cllmd.server"):
        reply = ask(harness.dealer(), make_request(1, "boom"))
    assert reply["error"] == {"code": "internal", "message": "RuntimeError: boom"}
    record = next(r for r in caplog.records if "boom" in r.getMessage())
    assert record.exc_info and record.exc_info[0] is RuntimeError
    assert ask(harness.dealer(), make_request(2, "ping"))["ok"] is True


def test_server_handler_protocol_error_keeps_its_code(harness):
    reply = ask(harness.dealer(), make_request(1, "lookup"))
    assert reply["error"] == {"code": "not_found", "message": "no such thing"}


def test_server_stream_error_after_tokens_ends_with_error_reply(harness):
    d = harness.dealer()
    d.send(encode(make_request("f", "generate", {"prompt": "fail"})))
    msgs = read_stream(d, "f")
    assert msgs[0]["event"] == "token" and msgs[0]["text"] == "0"
    assert msgs[-1]["ok"] is False and msgs[-1]["error"]["code"] == "internal"
    assert "broken after one token" in msgs[-1]["error"]["message"]


# --------------------------------------------------------------------------- pools and busy

def test_server_busy_when_pool_full_and_ping_still_answers(make_harness):
    h = make_harness(workers=1, max_pending=0)
    first = h.dealer()
    first.send(encode(make_request(1, "slow")))
    assert h.started.wait(WAIT_MS / 1000)
    other = h.dealer()
    busy = ask(other, make_request(2, "slow"))
    assert busy["error"]["code"] == "busy"
    assert ask(other, make_request(3, "ping"))["result"]["pong"] is True   # while slow runs
    assert h.server.pool_stats()["default"] == {"running": 1, "waiting": 0, "workers": 1,
                                               "max_pending": 0}
    h.release.set()
    assert recv(first) == {"v": 1, "id": 1, "ok": True, "result": {"slow": True}}


def test_server_pool_holds_a_bounded_number_of_bytes_of_large_requests(make_harness):
    h = make_harness(workers=1, max_pending=4)
    h.server.add_pool("bulk", workers=1, max_pending=4, max_bytes=LIMIT)

    def bulk(req, ctx):
        h.started.set()
        h.release.wait(10)
        return {"n": len(req.args.get("data", b""))}
    h.server.register("bulk", bulk, blocking=True, pool="bulk")
    big = b"x" * (LIMIT // 2 + 1000)   # over INLINE_DECODE_BYTES: its frame is held whole
    d = h.dealer()
    d.send(encode(make_request(1, "bulk", {"data": big})))
    assert h.started.wait(WAIT_MS / 1000)
    busy = ask(d, make_request(2, "bulk", {"data": big}))   # both frames: over LIMIT bytes
    assert busy["error"]["code"] == "busy", busy
    assert f"at most {LIMIT} with this one's" in busy["error"]["message"], busy
    d.send(encode(make_request(3, "bulk", {"data": b"small"})))   # small frames count as jobs only
    assert ask(h.dealer(), make_request(4, "ping"))["result"]["pong"] is True
    h.release.set()
    assert {m["id"]: m["result"] for m in (recv(d), recv(d))} == {1: {"n": len(big)}, 3: {"n": 5}}
    assert ask(d, make_request(5, "bulk", {"data": big}))["result"] == {"n": len(big)}   # released
    assert ask(d, make_request(6, "bulk", {"data": big}))["result"] == {"n": len(big)}


def test_server_duplicate_in_flight_id_is_bad_request(make_harness):
    h = make_harness(workers=2)
    d = h.dealer()
    d.send(encode(make_request(1, "slow")))
    assert h.started.wait(WAIT_MS / 1000)
    dup = ask(d, make_request(1, "slow"))
    assert dup["error"]["code"] == "bad_request" and "already used" in dup["error"]["message"]
    h.release.set()
    assert recv(d)["result"] == {"slow": True}


def test_server_add_pool_separates_work(make_harness):
    h = make_harness(workers=1, max_pending=0)
    h.server.add_pool("control", workers=1, max_pending=0)
    h.server.register("quick", lambda req, ctx: "done", blocking=True, pool="control")
    d = h.dealer()
    d.send(encode(make_request(1, "slow")))
    assert h.started.wait(WAIT_MS / 1000)
    assert ask(h.dealer(), make_request(2, "quick"))["result"] == "done"
    with pytest.raises(ValueError, match="no pool named"):
        h.server.register("x", lambda req, ctx: None, blocking=True, pool="missing")


# --------------------------------------------------------------------------- streams and cancel

def test_server_stream_sends_tokens_then_done(harness):
    d = harness.dealer()
    d.send(encode(make_request("g", "generate", {"prompt": "abc", "max_tokens": 4})))
    msgs = read_stream(d, "g")
    assert [m["text"] for m in msgs[:-1]] == ["0", "1", "2", "3"]
    assert all(m["event"] == "token" and m["n"] == i for i, m in enumerate(msgs[:-1]))
    assert msgs[-1] == {"v": 1, "id": "g", "event": "done", "tokens_prompt": 3,
                        "tokens_generated": 4, "stop_reason": "max_tokens"}


def test_server_stream_false_gathers_the_text_in_one_reply(harness):
    reply = ask(harness.dealer(), make_request(1, "generate", {"prompt": "", "max_tokens": 5,
                                                               "stream": False}))
    assert reply["result"] == {"text": "01234", "tokens_prompt": 0, "tokens_generated": 5,
                               "stop_reason": "max_tokens"}


def test_server_cancel_mid_stream_ends_with_cancelled(harness):
    d = harness.dealer()
    d.send(encode(make_request("g", "generate", {"prompt": "p", "max_tokens": 65536})))
    for _ in range(3):
        assert recv(d)["event"] == "token"
    d.send(encode(make_request("c", "cancel", {"id": "g"})))
    msgs, cancel_reply = [], None
    while not msgs or msgs[-1].get("event") != "done":
        m = recv(d)
        if m["id"] == "c":
            cancel_reply = m
        else:
            msgs.append(m)
    assert msgs[-1]["stop_reason"] == "cancelled"
    assert msgs[-1]["tokens_generated"] < 65536
    if cancel_reply is None:
        cancel_reply = recv(d)
    assert cancel_reply["result"] == {"cancelled": True}


def test_server_cancel_of_unknown_or_foreign_id_is_not_found(harness):
    owner, stranger = harness.dealer(), harness.dealer()
    owner.send(encode(make_request("g", "generate", {"prompt": "p", "max_tokens": 65536})))
    assert recv(owner)["event"] == "token"
    for rid in ("g", "nope"):   # "g" belongs to another connection
        reply = ask(stranger, make_request(1, "cancel", {"id": rid}))
        assert reply["error"]["code"] == "not_found"
    owner.send(encode(make_request("c", "cancel", {"id": "g"})))
    assert read_stream(owner, "g")[-1]["stop_reason"] == "cancelled"


def test_server_cancel_of_queued_request_answers_at_once_and_frees_its_slot(make_harness):
    h = make_harness(workers=1, max_pending=1)
    d = h.dealer()
    d.send(encode(make_request("s", "slow")))
    assert h.started.wait(WAIT_MS / 1000)
    d.send(encode(make_request("g", "generate", {"prompt": "p"})))
    d.send(encode(make_request("c", "cancel", {"id": "g"})))
    replies = {m["id"]: m for m in (recv(d), recv(d))}   # while "slow" still holds the worker
    assert replies["c"]["result"] == {"cancelled": True}
    assert replies["g"]["error"] == {"code": "cancelled",
                                     "message": "generate was cancelled before it started"}
    assert h.server.pool_stats()["default"]["waiting"] == 0
    d.send(encode(make_request("g2", "generate", {"prompt": "p", "max_tokens": 1})))
    h.release.set()
    assert recv(d)["result"] == {"slow": True}
    assert read_stream(d, "g2")[-1]["stop_reason"] == "max_tokens"


def test_server_vanished_client_has_its_generation_cancelled(harness):
    d = harness.dealer()
    d.send(encode(make_request("g", "generate", {"prompt": "p", "max_tokens": 65536})))
    assert recv(d)["event"] == "token"
    d.close(0)
    assert harness.observed_cancel.wait(WAIT_MS / 1000)


def test_server_stalled_client_has_its_generation_cancelled(make_harness):
    h = make_harness(client_timeout=0.2)
    d = h.dealer(rcvhwm=1)
    d.send(encode(make_request("g", "generate", {"prompt": "flood", "max_tokens": 65536})))
    # the client never reads: the server's queue for it fills, then it is given up on
    assert h.observed_cancel.wait(30)
    assert ask(h.dealer(), make_request(1, "ping"))["ok"] is True


def test_server_slow_reader_over_its_backlog_bytes_is_cancelled_with_an_error(make_harness, caplog):
    h = make_harness(client_timeout=60, backlog_bytes=LIMIT)  # the byte cap, not the timeout
    d = h.dealer(rcvhwm=1)
    d.send(encode(make_request("g", "generate", {"prompt": "flood", "max_tokens": 65536})))
    assert h.observed_cancel.wait(30)
    assert ask(h.dealer(), make_request(1, "ping"))["ok"] is True
    # the slow reader, reading at last, finds its request cancelled and why
    errors = []
    while d.poll(2000):
        msg = decode(d.recv())
        if msg.get("ok") is False:
            errors.append(msg["error"])
    assert errors and errors[0]["code"] == "cancelled"
    assert f"over the limit of {LIMIT}" in errors[0]["message"]
    assert any("left" in r.message and "unread" in r.message for r in caplog.records)


def test_server_backlog_must_hold_one_message(tmp_path):
    with pytest.raises(ValueError, match="backlog_bytes"):
        Server(f"ipc://{tmp_path}/a.sock", f"ipc://{tmp_path}/b.sock", max_message_bytes=LIMIT,
               backlog_bytes=LIMIT - 1)


def test_server_stop_cancels_running_streams_and_drains(make_harness):
    h = make_harness()
    d = h.dealer()
    d.send(encode(make_request("g", "generate", {"prompt": "p", "max_tokens": 65536})))
    assert recv(d)["event"] == "token"
    h.stop.set()
    assert read_stream(d, "g")[-1]["stop_reason"] == "cancelled"
    h.thread.join(10)
    assert not h.thread.is_alive()


# --------------------------------------------------------------------------- events

def test_server_publish_from_another_thread_reaches_subscriber(harness):
    sub = harness.ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"train")
    sub.connect(f"ipc://{harness.events_path}")
    done = threading.Event()

    def trainer():   # keeps publishing: a new subscriber misses what came before it joined
        step = 0
        while not done.is_set():
            harness.server.publish("train", {"step": step, "loss": 2.5})
            harness.server.publish("log", {"level": "info", "message": "not subscribed"})
            step += 1
            done.wait(0.01)

    t = threading.Thread(target=trainer)
    t.start()
    try:
        assert sub.poll(WAIT_MS)
        topic, frame = sub.recv_multipart()
    finally:
        done.set()
        t.join()
    msg = decode(frame)
    assert topic == b"train" and msg["v"] == 1 and msg["topic"] == "train"
    assert msg["loss"] == 2.5 and msg["seq"] == msg["step"] + 1 and msg["time"] > 0


def test_server_publish_refuses_bad_topics_and_is_quiet_after_close(make_harness):
    h = make_harness()
    with pytest.raises(ValueError):
        h.server.publish("", {})
    h.stop.set()
    h.thread.join(10)
    h.server.close()
    h.server.publish("train", {"step": 1})   # a trainer finishing late must not crash


# --------------------------------------------------------------------------- construction

def test_server_refuses_a_second_server_on_a_live_socket(harness):
    with pytest.raises(RuntimeError, match="already serving"):
        Server(f"ipc://{harness.sock_path}", f"ipc://{harness.dir}/other.sock",
               max_message_bytes=LIMIT)
    assert ask(harness.dealer(), make_request(1, "ping"))["ok"] is True


def test_server_takes_over_a_stale_socket_file():
    import socket as pysocket
    d = tempfile.mkdtemp(prefix="cllmd-t", dir="/tmp")
    try:
        path = os.path.join(d, "cllmd.sock")
        s = pysocket.socket(pysocket.AF_UNIX)
        s.bind(path)
        s.close()                  # left behind, as after a kill -9
        server = Server(f"ipc://{path}", f"ipc://{d}/ev.sock", max_message_bytes=LIMIT)
        server.close()
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("kw, exc, fragment", [
    ({"tcp": "tcp://127.0.0.1:*"}, ValueError, "TCP needs CURVE keys"),
    ({"max_message_bytes": 10}, ValueError, "max_message_bytes"),
])
def test_server_refuses_bad_configuration(tmp_path, kw, exc, fragment):
    kw.setdefault("max_message_bytes", LIMIT)
    with pytest.raises(exc, match=fragment):
        Server(f"ipc://{tmp_path}/a.sock", f"ipc://{tmp_path}/b.sock", **kw)


def test_server_refuses_bad_endpoints(tmp_path):
    with pytest.raises(ValueError, match="longer than 107"):
        Server(f"ipc:///tmp/{'x' * 120}.sock", f"ipc://{tmp_path}/b.sock", max_message_bytes=LIMIT)
    with pytest.raises(ValueError, match="expected an ipc:// endpoint"):
        Server("tcp://127.0.0.1:5555", f"ipc://{tmp_path}/b.sock", max_message_bytes=LIMIT)
    with pytest.raises(FileNotFoundError, match="runtime directory"):
        Server(f"ipc://{tmp_path}/missing/a.sock", f"ipc://{tmp_path}/b.sock",
               max_message_bytes=LIMIT)


# --------------------------------------------------------------------------- TCP with CURVE

def test_server_curve_authorized_client_works_unauthorized_gets_nothing(curve_server):
    server = curve_server.server
    ctx = zmq.Context()
    try:
        assert server.tcp_endpoint.startswith("tcp://127.0.0.1:")

        def dealer(pub, sec):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = pub, sec, curve_server.server_pub
            s.connect(server.tcp_endpoint)
            return s

        friend = dealer(*curve_server.friend)
        reply = ask(friend, make_request(1, "ping"))
        assert reply["result"]["pong"] is True
        stranger = dealer(*curve_server.stranger)
        stranger.send(encode(make_request(1, "ping")))
        assert not stranger.poll(1000)
        plain = ctx.socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(server.tcp_endpoint)
        plain.send(encode(make_request(1, "ping")))
        assert not plain.poll(500)
        ipc = ctx.socket(zmq.DEALER)   # the local socket keeps working beside the authenticator
        ipc.setsockopt(zmq.LINGER, 0)
        ipc.connect(f"ipc://{curve_server.dir}/cllmd.sock")
        assert ask(ipc, make_request(2, "ping"))["ok"] is True
    finally:
        ctx.destroy(0)


def test_server_curve_refuses_missing_authorized_dir(tmp_path):
    pub, sec = zmq.curve_keypair()
    with pytest.raises(FileNotFoundError, match="authorized keys directory"):
        Server(f"ipc://{tmp_path}/a.sock", f"ipc://{tmp_path}/b.sock", max_message_bytes=LIMIT,
               tcp="tcp://127.0.0.1:*", curve=(sec, pub, str(tmp_path / "nope")))


def test_server_msgpack_of_request_is_plain_msgpack(harness):
    # A client in another language builds the map with its own msgpack library.
    frame = msgpack.packb({"op": "ping", "args": {}, "id": "x", "v": 1}, use_bin_type=True)
    assert ask(harness.dealer(), frame)["id"] == "x"


# --------------------------------------------------------------------------- large frames

def test_server_large_frames_are_decoded_off_the_socket_thread_while_pings_go_on(make_harness):
    # Frames over INLINE_DECODE_BYTES: the socket thread reads their id and op only; a worker
    # decodes the rest. Meanwhile another client's pings are all answered (latency printed:
    # timing is for benchmarks/bench_reliability.py, not asserted here).
    import time
    from cllmd.server import INLINE_DECODE_BYTES
    h = make_harness(max_message_bytes=16 * 2**20)
    h.server.register("sum", lambda req, ctx: {"n": len(req.args["ids"]), "sum": sum(req.args["ids"])},
                      blocking=True)
    ids = list(range(50_000)) * 20            # 1M ids, 3 MB of msgpack
    big = encode(make_request("big", "sum", {"ids": ids}))
    assert len(big) > 2**20
    sender, pinger = h.dealer(), h.dealer()
    for i in range(6):
        sender.send(encode(make_request(f"big{i}", "sum", {"ids": ids})))
    rtts = []
    for i in range(100):
        t0 = time.perf_counter()
        assert ask(pinger, make_request(i, "ping"))["result"]["pong"] is True
        rtts.append(time.perf_counter() - t0)
    replies = {}
    while len(replies) < 6:
        msg = recv(sender, 60_000)
        replies[msg["id"]] = msg
    assert all(r["ok"] and r["result"] == {"n": len(ids), "sum": sum(ids)} for r in replies.values())
    rtts.sort()
    print(f"ping while 6 x {len(big) / 2**20:.1f} MiB requests are decoded: "
          f"p50 {1e3 * rtts[50]:.2f} ms, max {1e3 * rtts[-1]:.2f} ms")

    # what cannot be routed without decoding everything is refused at once, with its id
    pad = "x" * (INLINE_DECODE_BYTES + 1)
    d = h.dealer()
    r = ask(d, encode(make_request(7, "echo", {"pad": pad})))
    assert (r["id"], r["error"]["code"]) == (7, "too_large") and "echo request is at most" in r["error"]["message"]
    r = ask(d, encode(make_request(8, "nope", {"pad": pad})))
    assert (r["id"], r["error"]["code"]) == (8, "unknown_op")
    r = ask(d, encode({"v": 1, "op": "sum", "args": {"ids": [1], "pad": pad}}))
    assert (r["id"], r["error"]["code"]) == (None, "bad_request") and "'id'" in r["error"]["message"]
    r = ask(d, msgpack.packb([pad]))
    assert r["error"]["code"] == "bad_request" and "malformed msgpack" in r["error"]["message"]
    # the worker checks the rest as the socket thread checks small frames
    r = ask(d, encode({"v": 99, "id": 9, "op": "sum", "args": {"pad": pad}}))
    assert (r["id"], r["error"]["code"]) == (9, "version")
    r = ask(d, encode({"v": 1, "id": 10, "op": "sum", "args": {"ids": [1]}, "pad": pad}))
    assert r["ok"] and r["result"] == {"n": 1, "sum": 1}
    r = ask(d, encode({"id": 11, "op": "sum", "v": 1, "args": {"ids": [2, 3]}, "op ": pad}))
    assert r["ok"] and r["result"]["sum"] == 5
    r = ask(d, msgpack.packb({"v": 1, "id": 12, "op": "sum", "args": pad}))
    assert (r["id"], r["error"]["code"]) == (12, "bad_request")


def test_server_reads_a_bounded_number_of_requests_ahead_of_the_socket_thread(tmp_path):
    # While the socket thread does not read, libzmq takes at most RECV_HWM requests from a
    # connection; the rest wait in the client's own queue until the client cannot send more
    # (EAGAIN). libzmq's default would have taken 1,000 frames (here 300 MiB) into the daemon.
    # Then every request sent is answered: bounded, nothing lost.
    import time
    from cllmd.server import RECV_HWM
    d = tempfile.mkdtemp(prefix="cllmd-t", dir="/tmp")
    server = Server(f"ipc://{d}/s.sock", f"ipc://{d}/e.sock", max_message_bytes=2**20)
    ctx = zmq.Context()
    try:
        sender = ctx.socket(zmq.DEALER)
        sender.setsockopt(zmq.LINGER, 0)
        sender.setsockopt(zmq.SNDHWM, 1)
        sender.connect(f"ipc://{d}/s.sock")
        pad = "x" * (300 * 1024)   # over the unix socket's buffers: the kernel holds ~1 of them
        sent, deadline = 0, time.monotonic() + 2.0   # let the I/O threads take what they will
        while sent < 1000 and time.monotonic() < deadline:
            try:
                sender.send(encode(make_request(sent, "ping", {"pad": pad})), zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                time.sleep(0.01)
        # RECV_HWM in the server's pipe, one being decoded, ~1 in the kernel, SNDHWM (1) and one
        # being encoded on the client's side
        assert 1 <= sent <= RECV_HWM + 5, sent
        stop = threading.Event()
        loop = threading.Thread(target=server.serve, args=(stop,))
        loop.start()
        try:
            answered = set()
            while len(answered) < sent:
                assert sender.poll(WAIT_MS), f"{len(answered)} of {sent} answered"
                msg = decode(sender.recv())
                assert msg["error"]["code"] == "too_large"   # a ping over 8 KiB, refused with its id
                answered.add(msg["id"])
            assert answered == set(range(sent))
        finally:
            stop.set()
            loop.join(10)
    finally:
        server.close()
        ctx.destroy(0)
        shutil.rmtree(d, ignore_errors=True)


def test_server_takes_a_large_frame_from_libzmq_without_copying_it(make_harness):
    # A frame over INLINE_DECODE_BYTES is read in libzmq's buffer (received with copy=False)
    # and decoded from there: the Python heap holds its decoded value only, not the frame too.
    import tracemalloc
    h = make_harness(max_message_bytes=16 * 2**20)
    h.server.register("size", lambda req, ctx: {"n": len(req.args["data"])}, blocking=True)
    data = 8 * 2**20
    frame = encode(make_request(1, "size", {"data": b"x" * data}))
    d = h.dealer()
    tracemalloc.start()
    try:
        d.send(frame)
        reply = recv(d)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reply["ok"] and reply["result"] == {"n": data}, reply
    assert peak < 1.5 * data, peak   # a copy of the frame beside its decoded bin: 2 x data
    # a frame over the limit is answered too_large with its id, read without a copy either
    r = ask(d, encode(make_request(2, "size", {"data": b"x" * (16 * 2**20)})))
    assert (r["id"], r["error"]["code"]) == (2, "too_large")


def test_server_a_request_sent_right_after_a_reply_finds_its_pool_free(make_harness):
    # A pool's slot (and its bytes of large frames) is released as the final reply is sent, in
    # the same step of the socket thread: a client that sends its next request the moment it
    # has the reply of the last one never finds a pool of one worker, none waiting, busy.
    h = make_harness(workers=1, max_pending=0)
    h.server.add_pool("one", workers=1, max_pending=0, max_bytes=LIMIT)
    h.server.register("one", lambda req, ctx: {"n": len(req.args["data"])}, blocking=True, pool="one")
    d = h.dealer()
    big = b"x" * (LIMIT // 2 + 1000)   # over INLINE_DECODE_BYTES: held against max_bytes
    for i in range(300):
        r = ask(d, make_request(i, "one", {"data": big if i % 2 else b"small"}))
        assert r.get("ok"), (i, r)
