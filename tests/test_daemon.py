"""The real daemon as a subprocess: real ZeroMQ sockets, a real inotify queue, real signals."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from cllm.client import RequestError

from tests.daemonproc import Daemon, NotifyListener, daemon, drop, wait_for  # noqa: F401 (fixture)


# ---- the protocol ---------------------------------------------------------------------------------


def test_daemon_ops_round_trip(daemon):
    d = daemon("--no-train-auto-train")
    c = d.client
    assert c.request("ping")["pong"] is True
    st = c.request("status")
    assert st["model"]["context"] == 32 and st["queue"]["failed"] == 0 and st["daemon"]["rss_bytes"] > 0
    assert st["train"]["state"] == "idle" and st["serving"]["running"] == 0
    assert len(c.request("stats")["train"]["spheres"]) == 12
    ids = c.request("tokenize", text="héllo")["ids"]
    assert ids == list("héllo".encode()) and c.request("detokenize", ids=ids)["text"] == "héllo"

    # streamed and whole generation, same seed, same text
    g = c.generate("ab", max_tokens=20, temperature=1.0, seed=7)
    streamed = "".join(g)
    assert g.stats["tokens_generated"] == 20 and g.stats["stop_reason"] == "max_tokens"
    whole = c.request("generate", prompt="ab", max_tokens=20, temperature=1.0, seed=7, stream=False)
    assert whole["text"] == streamed

    # cancel mid-stream
    g = c.generate("x", max_tokens=60000, temperature=0)
    next(iter(g))
    g.cancel()
    rest = list(g)
    assert g.stats["stop_reason"] == "cancelled" and g.stats["tokens_generated"] < 60000
    del rest

    # queue: add over the socket, list, a failure and its retry
    name = c.request("queue.add", name="notes.txt", data=b"some notes to learn from\n" * 20)["name"]
    wait_for(lambda: name in d.queue("done"), 30, "queue.add file to be done")
    bad = c.request("queue.add", name="blob.bin", data=b"\x00\x01binary")["name"]
    wait_for(lambda: bad in d.queue("failed"), 30, "binary file to fail")
    listing = c.request("queue.list")
    failed = {f["name"]: f for f in listing["files"] if f["state"] == "failed"}
    assert "binary" in failed[bad]["reason"]["reason"] and listing["counts"]["done"] == 1
    with pytest.raises(RequestError) as e:
        c.request("queue.retry", name="no-such-file.txt")
    assert e.value.code == "not_found"
    c.request("queue.retry", name=bad)
    wait_for(lambda: bad in d.queue("failed") and not d.queue("incoming"), 30, "retried file to fail again")

    # training control and configuration
    cfg = c.request("train.config.get")
    assert cfg["lr"] == pytest.approx(1e-3)
    new = c.request("train.config.set", lr=3e-4, batch_size=8, threads=1)
    assert new["config"]["lr"] == pytest.approx(3e-4) and new["config"]["batch_size"] == 8
    for bad_args in ({"lr": -1.0}, {"batch_size": "big"}, {"min_lr": 1.0}, {"nonsense": 1}):
        with pytest.raises(RequestError) as e:
            c.request("train.config.set", **bad_args)
        assert e.value.code == "bad_request"
    c.request("train.start", steps=15)
    wait_for(lambda: c.request("train.status")["step"] >= 15 and c.request("train.status")["state"] == "idle",
             60, "15 manual steps")
    status = c.request("train.status")
    assert status["batch_size"] == 8 and status["threads"] == 1 and status["loss"] > 0
    c.request("train.start", steps=100000)
    c.request("train.pause")
    wait_for(lambda: c.request("train.status")["state"] == "paused", 30, "pause")
    step = c.request("train.status")["step"]
    time.sleep(0.5)
    assert c.request("train.status")["step"] == step
    c.request("train.resume")
    wait_for(lambda: c.request("train.status")["step"] > step, 30, "resume")
    c.request("train.stop")
    wait_for(lambda: c.request("train.status")["state"] == "idle", 30, "stop")

    # model and checkpoints
    info = c.request("model.info")
    assert info["parameters"] > 0 and info["tokenizer"]["kind"] == "bytes" and info["config"]["context"] == 32
    ck = c.request("checkpoint")
    assert Path(ck["path"]).exists() and ck["bytes"] > 0
    saved = c.request("model.save")
    from cllmd.model import Model
    assert Model.load(saved["path"]).cfg.n_embd == 32

    # unknown op, bad arguments
    with pytest.raises(RequestError) as e:
        c.request("frobnicate")
    assert e.value.code == "unknown_op"
    with pytest.raises(RequestError) as e:
        c.request("generate", prompt=5)
    assert e.value.code == "bad_request"

    assert c.request("shutdown")["stopping"] is True
    assert d.proc.wait(60) == 0


def test_daemon_busy_beyond_the_generation_queue(daemon):
    d = daemon("--no-train-auto-train", "--server-generate-workers", "1",
               "--server-max-pending-generations", "1")
    c = d.client
    running = c.generate("a", max_tokens=60000, temperature=0)  # greedy: never picks end-of-text here
    next(iter(running))  # running on the only worker
    waiting = c.generate("b", max_tokens=5, temperature=1.0, seed=2)  # fills the bounded queue
    time.sleep(0.3)
    with pytest.raises(RequestError) as e:
        c.request("generate", prompt="c", max_tokens=5, stream=False)
    assert e.value.code == "busy"
    assert c.request("ping")["pong"]  # the socket loop still answers at once
    running.cancel()
    list(running)
    assert len("".join(waiting)) > 0 and waiting.stats["stop_reason"] == "max_tokens"
    d.stop()


def test_daemon_survives_malformed_messages(daemon):
    d = daemon("--no-train-auto-train", "--server-max-message-bytes", "65536")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{d.run / 'cllmd.sock'}")
    rng = random.Random(0)
    junk = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200))) for _ in range(150)]
    junk += [msgpack.packb(x) for x in (
        [], 5, "ping", {"v": 1}, {"v": 1, "id": 1}, {"v": 1, "id": 1, "op": 7}, {"v": 99, "id": 1, "op": "ping"},
        {"v": 1, "id": [1], "op": "ping"}, {"v": 1, "id": 2, "op": "ping", "args": []},
        {"v": 1, "id": 3, "op": "generate", "args": {"prompt": "x", "max_tokens": -5}},
        {"v": 1, "id": 4, "op": "generate", "args": {"prompt": "x", "temperature": "hot"}},
        {"v": 1, "id": 5, "op": "tokenize", "args": {"text": "x" * 70000}},
        {"v": 1, "id": 6, "op": "queue.add", "args": {"name": "../../etc/passwd", "data": b"x"}},
        {"v": 1, "id": 7, "op": "train.config.set", "args": {"lr": float("nan")}},
    )]
    junk += [b"\xff" * 100000]  # oversized
    for frame in junk:
        sock.send(frame)
    replies = []
    while sock.poll(1000):
        replies.append(msgpack.unpackb(sock.recv(), raw=False))
    answered = {r.get("id"): r for r in replies}
    for rid in (3, 4, 6, 7):
        assert answered[rid]["ok"] is False and answered[rid]["error"]["code"] == "bad_request", answered.get(rid)
    assert answered[5]["error"]["code"] in ("too_large", "bad_request")
    assert d.client.request("ping")["pong"]
    sock.close()
    assert d.stop() == 0


# ---- the queue ------------------------------------------------------------------------------------


def test_daemon_queue_formats_and_bad_files(daemon):
    d = daemon("--no-train-auto-train")
    good = {
        "a.txt": b"plain text about queues\n",
        "b.md": b"# Title\n\nmarkdown body text\n",
        "c.html": b"<html><head><style>x{}</style><script>var a;</script></head><body><p>Hello &amp; bye</p></body></html>",
        "d.json": json.dumps({"text": "json text field", "n": 3}).encode(),
        "e.jsonl": b'{"text": "line one"}\n{"content": "line two"}\n',
        "f.csv": b"name,comment\nann,likes tea\nbob,likes coffee\n",
        "g.xml": b"<doc><p>xml text node</p></doc>",
        "h.txt": "#cllm-source https://example.org/x 2026-11-26T07:00:00Z\nwith provenance\n".encode(),
    }
    bad = {
        "bin.dat": (b"\x00\x01\x02\x03" * 10, "binary"),
        "latin.txt": ("caf\xe9".encode("latin-1"), "UTF-8"),
        "empty.txt": (b"   \n\n", "empty"),
        "broken.json": (b'{"text": ', "JSON"),
        "evil.xml": (b'<!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>', "declares entities"),
        "big.txt": (b"x" * 70000, "large"),
    }
    d.stop()
    d = daemon("--no-train-auto-train", "--queue-max-file-bytes", "65536")
    for name, data in good.items():
        drop(d, name, data)
    for name, (data, _) in bad.items():
        drop(d, name, data)
    wait_for(lambda: len(d.queue("done")) == len(good) and len(d.queue("failed")) == 2 * len(bad),
             60, "every file to be done or failed")
    assert set(d.queue("done")) == set(good)
    for name, (_, why) in bad.items():
        reason = json.loads((d.state / "queue" / "failed" / f"{name}.reason").read_text())
        assert why.lower() in reason["reason"].lower(), (name, reason)
    from cllmd.datastore import DataStore
    d.stop()
    store = DataStore(d.model_dir() / "data", vocab_size=257)
    sources = {doc.source for doc in store.documents()}
    texts = b"".join(bytes(store.read(doc).astype(np.uint8)[:-1]) for doc in store.documents())
    store.close()
    assert "https://example.org/x" in sources
    assert b"Hello & bye" in texts and b"var a" not in texts and b"likes tea" in texts
    assert b"xml text node" in texts and b"line two" in texts


def test_daemon_takes_a_burst_of_1000_files(daemon):
    d = daemon("--no-train-auto-train")
    incoming = d.state / "queue" / "incoming"
    for i in range(1000):
        tmp = incoming / f".f{i}.part"
        tmp.write_bytes(f"document number {i} of the burst\n".encode())
        os.rename(tmp, incoming / f"f{i:04d}.txt")
    wait_for(lambda: len(d.queue("done")) == 1000, 180, "1000 files in done/")
    assert d.queue("failed") == [] and d.queue("incoming") == []
    assert d.client.request("status")["store"]["documents"] == 1000
    d.stop()


def test_daemon_auto_trains_on_new_files_and_learns(daemon):
    d = daemon("--train-batch-size", "8", "--train-auto-epochs", "3")
    text = "".join(f"the cat sat on the mat number {i % 7}.\n" for i in range(600)).encode()
    drop(d, "cats.txt", text)
    wait_for(lambda: d.client.request("train.status")["budget_total"] > 0, 30, "a training budget")
    first = wait_for(lambda: d.client.request("train.status")["loss"], 30, "a first step")
    wait_for(lambda: d.client.request("train.status")["state"] == "idle"
             and d.client.request("train.status")["step"] > 0, 120, "the budget to finish")
    st = d.client.request("train.status")
    assert st["loss"] < first - 0.5
    assert (d.model_dir() / "checkpoints" / "latest.cllm").exists()
    d.stop()


# ---- systemd, signals, crash safety ---------------------------------------------------------------


def test_daemon_systemd_notifications_in_order(daemon, tmp_path):
    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        d = daemon("--no-train-auto-train",
                   env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000",
                        "WATCHDOG_PID": ""})
        wait_for(lambda: any(m == "WATCHDOG=1" for m in listener.messages), 30, "a watchdog ping")
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(m == "RELOADING=1" for m in listener.messages), 30, "RELOADING")
        assert d.stop() == 0
        wait_for(lambda: "STOPPING=1" in listener.messages, 10, "STOPPING")
    finally:
        listener.close()
    kinds = [m.split("=")[0] for m in listener.messages]
    assert kinds.index("READY") < kinds.index("WATCHDOG") < kinds.index("STOPPING")
    # start-up says what it does in STATUS before READY, then the running status line
    assert listener.messages[kinds.index("STATUS")].startswith("STATUS=starting: ")
    assert any(m.startswith("STATUS=starting: ") and "kernels" in m
               for m in listener.messages[:kinds.index("READY")])
    assert any(m.startswith("STATUS=step") for m in listener.messages[kinds.index("READY"):])
    assert kinds[-1] == "STOPPING" or "STOPPING" in kinds[-3:]
    status = [m for m in listener.messages if m.startswith("STATUS=")]
    assert any("step" in m and "queue" in m for m in status)


def test_daemon_refuses_a_second_instance_and_bad_config(daemon, tmp_path):
    d = daemon("--no-train-auto-train")
    second = subprocess.run(d.args, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "already using" in second.stderr
    d.stop()
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train]\nlr = \"fast\"\n")
    r = subprocess.run(d.args + ["--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "train.lr" in r.stderr
    cfg.write_text("[train]\nspeed = 3\n")
    r = subprocess.run(d.args + ["--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "train.speed" in r.stderr


def test_daemon_kill9_loses_nothing_and_trains_nothing_twice(daemon):
    from cllmd.datastore import DataStore
    from cllmd.model import Model
    d = daemon("--train-checkpoint-interval-steps", "5")
    files = {f"doc{i:03d}.txt": ("".join(f"doc {i} line {j} about things\n" for j in range(200))).encode()
             for i in range(60)}
    names = sorted(files)
    for name in names[:20]:
        drop(d, name, files[name])
    wait_for(lambda: d.client.request("train.status")["step"] >= 3, 60, "training to run")
    d.stop(signal.SIGKILL)                                       # kill -9 during training
    d = daemon()
    assert d.client.request("status")["train"]["step"] >= 0      # recovered and serving
    for name in names[20:]:
        drop(d, name, files[name])
    time.sleep(0.05)
    d.stop(signal.SIGKILL)                                       # kill -9 during ingestion
    d = daemon()
    wait_for(lambda: len(d.queue("done")) == len(files), 60, "every file in done/")
    for _ in range(3):                                           # kill -9 around checkpoint writes
        d.client.request("train.start", steps=1000)
        threading.Thread(target=lambda c=d.client: c.request("checkpoint", timeout=30), daemon=True).start()
        time.sleep(0.3)
        d.stop(signal.SIGKILL)
        d = daemon()
    d.stop()
    assert set(d.queue("done")) == set(files) and d.queue("failed") == []
    store = DataStore(d.model_dir() / "data", vocab_size=257)
    docs = store.documents()
    store.close()
    assert len(docs) == len(files) and len({doc.sha256 for doc in docs}) == len(files)
    Model.load(d.model_dir() / "model.cllm")
    Model.load(d.model_dir() / "checkpoints" / "latest.cllm")


def test_daemon_first_start_creates_the_default_model(daemon):
    d = daemon("--model-tokenizer", "bpe", "--model-vocab-size", "512", model=False, start=False)
    d.start(wait=False)
    # while it builds the corpus and compiles, clients hear "starting" and what it does
    sock = d.run / "cllmd.sock"
    wait_for(lambda: sock.exists(), 60, "the socket (bound first thing)")
    from cllm.client import Client
    with Client(socket=str(sock), timeout=10) as early:
        assert early.request("ping")["starting"]   # from the first moment
        wait_for(lambda: "default model" in (early.request("ping").get("starting") or ""), 60,
                 "the phase that builds the default model")
        with pytest.raises(RequestError) as e:
            early.request("status")
        assert e.value.code == "unavailable" and e.value.message.startswith("cllmd is starting: ")
        assert e.value.error["starting"]
    d.client = d.connect()
    c = d.client
    out = d.output()
    assert "starting: creating the default model" in out and "kernels ready in" in out
    info = c.request("model.info")
    assert info["tokenizer"]["kind"] == "bpe" and info["tokenizer"]["vocab_size"] == 512
    wait_for(lambda: len(d.queue("done")) >= 3, 120, "the default corpus to be ingested")
    assert all(n.startswith("default-corpus-") for n in d.queue("done"))
    wait_for(lambda: c.request("train.status")["step"] >= 2, 120, "auto-training on the corpus")
    assert d.stop() == 0


def test_daemon_restart_keeps_the_training_budget(daemon):
    d = daemon("--train-batch-size", "4", "--train-checkpoint-interval-steps", "3")
    drop(d, "long.txt", "".join(f"sentence {i} of a long document.\n" for i in range(3000)).encode())
    wait_for(lambda: d.client.request("train.status")["step"] >= 6, 60, "training to run")
    before = d.client.request("train.status")
    assert before["budget_total"] > before["step"] + 20
    assert d.stop() == 0                      # graceful: a final checkpoint records the budget
    d = daemon()
    after = d.client.request("train.status")
    assert after["budget"] > 0 and after["budget_total"] == before["budget_total"]
    assert after["step"] >= before["step"]
    wait_for(lambda: d.client.request("train.status")["step"] > after["step"], 60, "training to continue")
    d.stop()


def test_daemon_tcp_only_with_curve_keys(daemon, tmp_path):
    import shutil
    import zmq.auth
    keys, authorized = tmp_path / "keys", tmp_path / "authorized"
    keys.mkdir()
    authorized.mkdir()
    zmq.auth.create_certificates(str(keys), "server")
    friend_public, _ = zmq.auth.create_certificates(str(keys), "friend")
    shutil.copy(friend_public, authorized)
    with socket_port() as port, socket_port() as events_port:
        endpoint = f"tcp://127.0.0.1:{port}"
        events = f"tcp://127.0.0.1:{events_port}"
    d = daemon("--no-train-auto-train", "--server-tcp", endpoint, "--server-events-tcp", events, start=False)
    refused = subprocess.run(d.args, capture_output=True, text=True, timeout=60)  # keys missing
    assert refused.returncode == 2 and "server.tcp" in refused.stderr
    d.args += ["--server-curve-secret-key-file", str(keys / "server.key_secret"),
               "--server-curve-authorized-keys-dir", str(authorized)]
    d.start()
    server_public, _ = zmq.auth.load_certificate(str(keys / "server.key"))
    friend_public, friend_secret = zmq.auth.load_certificate(str(keys / "friend.key_secret"))
    from cllm.client import Client
    friend = Client(socket=endpoint, timeout=5, retries=0, curve=(friend_secret, friend_public, server_public))
    assert friend.request("ping")["pong"] is True
    # the events endpoint the doc describes, over CURVE too (server.events_tcp)
    listener = Client(socket=endpoint, events=events, timeout=5, retries=0,
                      curve=(friend_secret, friend_public, server_public))
    with listener.subscribe(["train"]) as sub:
        assert sub.recv(timeout=20)[0] == "train"
    listener.close()
    stranger_public, stranger_secret = zmq.curve_keypair()
    stranger = Client(socket=endpoint, timeout=1, retries=0, curve=(stranger_secret, stranger_public, server_public))
    with pytest.raises(Exception):
        stranger.request("ping")
    friend.close()
    stranger.close()
    assert d.stop() == 0


class socket_port:
    """A free TCP port on 127.0.0.1 (closed again before the daemon binds it)."""

    def __enter__(self):
        import socket as socket_module
        self.s = socket_module.socket()
        self.s.bind(("127.0.0.1", 0))
        return self.s.getsockname()[1]

    def __exit__(self, *exc):
        self.s.close()


# ---- slow requests and slow readers (issue 11, F1 and F7) ------------------------------------------


def _dealer(ctx, d):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{d.run / 'cllmd.sock'}")
    return s


def test_daemon_answers_ping_while_a_big_tokenize_runs(daemon):
    d = daemon("--no-train-auto-train")
    rss = lambda: d.client.request("status")["daemon"]["rss_bytes"]  # noqa: E731
    text = "".join(random.Random(0).choice("abcdefgh ij\n") for _ in range(4 << 20))
    ctx = zmq.Context()
    try:
        big, pinger = _dealer(ctx, d), _dealer(ctx, d)
        poller = _poller(big, pinger)
        for s in (big, pinger):  # both connected before the clock starts
            s.send(msgpack.packb({"v": 1, "id": 0, "op": "ping"}))
            assert s.poll(10000) and msgpack.unpackb(s.recv())["ok"]
        idle = rss()
        for _ in range(2):
            t0 = time.monotonic()
            big.send(msgpack.packb({"v": 1, "id": 1, "op": "tokenize", "args": {"text": text}}))
            latencies, sent, rid, reply = [], None, 10, None
            while reply is None or sent is not None:
                if sent is None and reply is None:
                    rid += 1
                    pinger.send(msgpack.packb({"v": 1, "id": rid, "op": "ping"}))
                    sent = time.monotonic()
                events = dict(poller.poll(30000))
                assert events, "no reply within 30 s"
                if pinger in events:
                    assert msgpack.unpackb(pinger.recv())["id"] == rid
                    latencies.append(time.monotonic() - sent)
                    sent = None
                if big in events:
                    reply = msgpack.unpackb(big.recv())
                    took = time.monotonic() - t0
            assert reply["ok"] and reply["result"]["count"] == len(text)
            assert reply["result"]["ids"][:3] == list(text[:3].encode())
            # the pings were answered while the tokenize was being served, not queued behind it
            # (behind it, one ping waits for nearly all of it, and one or two are sent in all);
            # the median, as the tokenize takes ~0.1 s now and one late ping on a loaded
            # machine is not queueing
            median = sorted(latencies)[len(latencies) // 2]
            assert len(latencies) >= 3 and median < took / 2, (len(latencies), median, took)
            del reply
        # what the tokenize needed is returned: RSS is back near idle (not a multiple of it)
        assert rss() < idle + (128 << 20)
    finally:
        ctx.destroy(0)


def _poller(*socks):
    p = zmq.Poller()
    for s in socks:
        p.register(s, zmq.POLLIN)
    return p


def test_daemon_large_tokenize_gives_the_ids_of_encode(daemon):
    # the reply is built 1 Mi characters at a time: a special token across a chunk's end, and
    # multi-byte characters, get the ids of the whole text's encode()
    from cllmd.tokenizer import EOT, REPLY_CHARS, BytesTokenizer
    text = "ab é日 " * (REPLY_CHARS // 6) + "😀" * 7
    text = text[:REPLY_CHARS - 5] + EOT + text[REPLY_CHARS - 5:] + EOT
    d = daemon("--no-train-auto-train")
    result = d.client.request("tokenize", text=text)
    expected = BytesTokenizer().encode(text)
    assert result["count"] == len(expected) and result["ids"] == expected.tolist()


def test_daemon_tokenize_too_large_for_one_reply_says_so(daemon):
    d = daemon("--no-train-auto-train", "--server-max-message-bytes", "65536")
    with pytest.raises(RequestError) as e:
        d.client.request("tokenize", text="é" * 16500)   # 33 kB in, 33,000 two-byte ids out
    assert e.value.code == "too_large" and "in parts" in str(e.value)
    assert d.client.request("tokenize", text="é" * 100)["count"] == 200


# ---- docs/protocol.md and the daemon agree (issue 11) ----------------------------------------------


def test_daemon_agrees_with_protocol_md_on_the_points_found_apart(daemon):
    from cllm.catalogue import SETTINGS
    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    d = daemon("--no-train-auto-train")
    c = d.client
    # lr is nil before the first step, a float after
    assert "lr: float or nil (nil before the first step)" in doc
    assert c.request("status")["train"]["lr"] is None and c.request("train.status")["lr"] is None
    sub = c.subscribe(["queue", "checkpoint"])
    time.sleep(0.5)   # the subscription is live before the events it waits for
    # the changes of one file arrive in the order it goes through
    name = c.request("queue.add", name="order.txt", data=b"an ordered little file of words\n" * 20)["name"]
    states, deadline = [], time.monotonic() + 30
    while "done" not in states and time.monotonic() < deadline:
        ev = sub.recv(timeout=1)
        if ev and ev[0] == "queue" and (ev[1].get("change") or {}).get("name") == name:
            states.append(ev[1]["change"]["state"])
    assert states == ["incoming", "processing", "done"], states
    assert "`incoming` (for files added with `queue.add` or `queue.retry`), `processing`, then" in doc
    # every checkpoint event has kind "checkpoint" (model.save writes a checkpoint too)
    c.request("train.start", steps=2)
    wait_for(lambda: c.request("train.status")["step"] >= 2 and c.request("train.status")["state"] == "idle",
             60, "two steps")
    assert isinstance(c.request("train.status")["lr"], float)
    c.request("model.save")
    kinds, deadline = [], time.monotonic() + 30
    while not kinds and time.monotonic() < deadline:
        ev = sub.recv(timeout=1)
        if ev and ev[0] == "checkpoint":
            kinds.append(ev[1]["kind"])
    sub.close()
    assert kinds == ["checkpoint"] and '`kind` is always `"checkpoint"` in protocol 1' in doc
    # bytes that are not UTF-8 arrive as U+FFFD
    assert c.request("detokenize", ids=[0xFF, 0x41, 0xC3])["text"] == "\ufffdA\ufffd"
    assert "U+FFFD REPLACEMENT CHARACTER" in doc
    # the tokenizer travels inside the model file and the checkpoint, as architecture.md says
    from cllmd.modelfile import read_model_file
    arch = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
    model_path = Path(c.request("model.info")["path"])
    checkpoints = sorted(d.state.rglob("latest.cllm"))
    assert "The tokenizer has no file of its own" in arch and checkpoints
    assert not list(d.state.rglob("tokenizer.json"))
    for path in (model_path, *checkpoints):
        assert json.loads(read_model_file(path, verify=False)[0]["tokenizer"])["type"] == "bytes"
    # the stream timeout the doc states is the setting's default
    timeout = SETTINGS["server.stream_timeout"].default
    assert f"{timeout:g} seconds (the daemon's `server.stream_timeout`)" in doc
    # status's serving map and its decoding batch have the fields the doc lists, no more, no fewer
    row = next(line for line in doc.splitlines() if line.startswith("| `serving` | map |"))
    documented = [set(re.findall(r"(\w+): ", span)) for span in re.findall(r"`\{([^`]*)\}`", row)]
    serving = c.request("status")["serving"]
    assert documented[0] == set(serving), (documented[0], set(serving))
    assert documented[1] == set(serving["batch"]), (documented[1], set(serving["batch"]))
