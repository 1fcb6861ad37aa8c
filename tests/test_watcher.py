"""The queue watcher on a real inotify-watched directory (cllmd.watcher over cllmd.queuedir),
with real ingest functions."""

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from cllmd.queuedir import FileTooLarge, NotInQueue, QueueDir
from cllmd.retry import RetryPolicy
from cllmd.watcher import QueueWatcher


def wait_for(predicate, what, timeout=20.0):
    """Poll until predicate() is true; the deadline only bounds a hang, it is not measured."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class ListStore:
    """A real ingest function: keeps each distinct text (by sha256) once, in a list."""

    def __init__(self, fail_sources=(), fail_times=None):
        self.docs = []  # (source, sha256, text)
        self.calls = []  # source of every call, failed or not
        self.fail_sources = set(fail_sources)
        self.fail_times = fail_times  # fail only the first N calls per source
        self.lock = threading.Lock()

    def __call__(self, pre, sha):
        with self.lock:
            self.calls.append(pre.source)
            if pre.source in self.fail_sources and (
                    self.fail_times is None or self.calls.count(pre.source) <= self.fail_times):
                raise OSError("store unavailable")
            duplicate = any(s == sha for _, s, _ in self.docs)
            if not duplicate:
                self.docs.append((pre.source, sha, pre.text))
            return {"tokens": len(pre.text.split()), "duplicate": duplicate}

    def texts(self):
        return sorted(t for _, _, t in self.docs)


class Queue:
    """The daemon's composition: the directory state machine and its watcher."""

    def __init__(self, root, ingest, *, max_file_bytes=10_000, max_attempts=3, on_event=None,
                 retry_backoff=0.05, **kw):
        self.dir = QueueDir(root, max_file_bytes=max_file_bytes, on_event=on_event)
        self.watcher = QueueWatcher(self.dir, ingest,
                                    retry=RetryPolicy(max_attempts, backoff=retry_backoff), **kw)

    def __getattr__(self, name):  # add, retry, list, counts / run, wake, scan, recover
        return getattr(self.dir if hasattr(self.dir, name) else self.watcher, name)


def make_queue(root, ingest, events=None, **kw):
    opts = dict(max_file_bytes=10_000, max_attempts=3, rescan_seconds=3600, retry_backoff=0.05)
    opts.update(kw)
    return Queue(root, ingest, on_event=None if events is None else events.append, **opts)


@contextmanager
def running(queue):
    stop = threading.Event()
    beats = []
    t = threading.Thread(target=queue.run, args=(stop, lambda: beats.append(1)), daemon=True)
    t.start()
    # The first heartbeat comes from the loop, so the inotify watch is in place by then.
    wait_for(lambda: beats, "the watcher to start")
    try:
        yield beats
    finally:
        stop.set()
        queue.wake()
        t.join(timeout=30)
        assert not t.is_alive(), "watcher did not stop"


def drop(root, name, data):
    """Write the way the contract asks: .NAME.part, fsync, rename."""
    part = root / "incoming" / f".{name}.part"
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(part, root / "incoming" / name)


def names(root, state):
    return sorted(n for n in os.listdir(root / state) if not n.startswith("."))


def reason(root, name):
    return json.loads((root / "failed" / (name + ".reason")).read_text())


def test_watcher_run_picks_up_renamed_direct_and_added_files(tmp_path):
    store, events = ListStore(), []
    q = make_queue(tmp_path, store, events)
    with running(q):
        drop(tmp_path, "renamed.txt", b"dropped by rename")
        with open(tmp_path / "incoming" / "direct.md", "w") as f:  # written in place
            f.write("written directly")
        (tmp_path / "incoming" / ".half.txt.part").write_bytes(b"never finished")
        added = q.add("added.html", b"<p>sent over the socket</p>")
        wait_for(lambda: len(names(tmp_path, "done")) == 3, "three files in done/")
    assert names(tmp_path, "done") == ["added.html", "direct.md", "renamed.txt"]
    assert added == "added.html"
    assert store.texts() == ["dropped by rename", "sent over the socket", "written directly"]
    # The half-written dotfile was never touched.
    assert os.listdir(tmp_path / "incoming") == [".half.txt.part"]
    done = [e for e in events if e["state"] == "done"]
    assert {e["name"] for e in done} == {"added.html", "direct.md", "renamed.txt"}
    for e in done:
        assert e["event"] == "queue" and e["tokens"] >= 2 and e["duplicate"] is False
        # each file went through processing before done
        assert events.index({"event": "queue", "name": e["name"], "state": "processing",
                             "attempt": 1}) < events.index(e)


def test_watcher_scan_fails_bad_files_with_reasons(tmp_path):
    store = ListStore()
    q = make_queue(tmp_path, store, max_file_bytes=100)
    inc = tmp_path / "incoming"
    (inc / "binary.txt").write_bytes(b"GIF89a\x00\x01\x02")
    (inc / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (inc / "empty.txt").write_bytes(b"  \n ")
    (inc / "big.txt").write_bytes(b"x" * 101)
    (inc / "broken.json").write_bytes(b'{"text": ')
    (inc / "good.txt").write_bytes(b"fine")
    os.symlink("/etc/hostname", inc / "link.txt")
    os.mkdir(inc / "adir")
    assert q.scan() == 8
    assert names(tmp_path, "done") == ["good.txt"]
    expected = {
        "binary.txt": "binary data: a GIF image",
        "latin1.txt": "not valid UTF-8: byte 0xe9 at offset 3",
        "empty.txt": "empty after preprocessing",
        "big.txt": "too large: 101 bytes, the limit is 100",
        "broken.json": "malformed JSON: Expecting value at line 1 column 10",
        "link.txt": "not a regular file",
        "adir": "not a regular file",
    }
    for name, why in expected.items():
        r = reason(tmp_path, name)
        assert r["reason"].startswith(why), (name, r)
        assert r["attempts"] == 1 and r["time"].endswith("Z")
    listing = q.list()
    assert {e["name"]: e["reason"] for e in listing["failed"]} == {
        n: reason(tmp_path, n)["reason"] for n in expected}
    assert q.counts() == {"incoming": 0, "processing": 0, "done": 1, "failed": 7}
    assert store.calls == ["good.txt"]  # bad input never reaches the store


def test_watcher_retry_moves_failed_back_to_incoming(tmp_path):
    store = ListStore()
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming" / "big.txt").write_bytes(b"a rather long text")
    make_queue(tmp_path, store, max_file_bytes=5).scan()
    assert names(tmp_path, "failed") == ["big.txt", "big.txt.reason"]
    q = make_queue(tmp_path, store, max_file_bytes=1000)  # the limit was raised
    with pytest.raises(NotInQueue, match="no file 'nope.txt' in"):
        q.retry("nope.txt")
    with pytest.raises(NotInQueue):
        q.retry("big.txt.reason")
    with pytest.raises(NotInQueue, match="invalid queue file name"):
        q.retry("../done/x")
    assert q.retry("big.txt") == "big.txt"
    assert names(tmp_path, "failed") == [] and names(tmp_path, "incoming") == ["big.txt"]
    with running(q):  # retry() pokes the watcher: no inotify event is needed
        wait_for(lambda: names(tmp_path, "done") == ["big.txt"], "big.txt in done/")
    assert store.texts() == ["a rather long text"]


def test_watcher_failing_ingest_does_not_block_and_gives_up(tmp_path):
    store, events = ListStore(fail_sources={"bad.txt"}), []
    q = make_queue(tmp_path, store, events)
    for name in ("bad.txt", "good1.txt", "good2.txt"):
        (tmp_path / "incoming" / name).write_text(f"text of {name}")
    # The first pass: bad.txt fails once and waits in processing/, the others go through.
    assert q.scan() == 3
    assert names(tmp_path, "done") == ["good1.txt", "good2.txt"]
    assert names(tmp_path, "processing") == ["bad.txt"]
    assert q.list()["processing"][0]["attempts"] == 1
    with running(q):
        wait_for(lambda: names(tmp_path, "failed"), "bad.txt in failed/")
    assert store.calls.count("bad.txt") == 3  # max_attempts, not forever
    r = reason(tmp_path, "bad.txt")
    assert r["attempts"] == 3
    assert r["reason"] == "ingest failed: OSError: store unavailable (after 3 attempts)"
    retries = [e for e in events if e["name"] == "bad.txt" and "retry_in" in e]
    assert [e["attempt"] for e in retries] == [1, 2]
    assert events[-1] == {"event": "queue", "name": "bad.txt", "state": "failed",
                          "reason": r["reason"], "attempts": 3}
    assert os.listdir(tmp_path / "processing") == []  # no sidecar left behind


def test_watcher_transient_ingest_failure_recovers(tmp_path):
    store = ListStore(fail_sources={"flaky.txt"}, fail_times=1)
    q = make_queue(tmp_path, store)
    with running(q):
        drop(tmp_path, "flaky.txt", b"second time lucky")
        wait_for(lambda: names(tmp_path, "done") == ["flaky.txt"], "flaky.txt in done/")
    assert store.calls == ["flaky.txt", "flaky.txt"] and store.texts() == ["second time lucky"]


def test_watcher_recover_takes_back_files_left_in_processing(tmp_path):
    store, events = ListStore(), []
    q = make_queue(tmp_path, store, events)
    # A crash left two files mid-ingest; one of them had reached the store already.
    (tmp_path / "processing" / "stored.txt").write_text("already stored")
    (tmp_path / "processing" / "new.txt").write_text("not yet stored")
    store(type("P", (), {"source": "stored.txt", "text": "already stored"})(),
          __import__("hashlib").sha256(b"already stored").hexdigest())
    (tmp_path / "processing" / ".attempts-0123456789abcdef01234567").write_text(
        json.dumps({"name": "gone.txt", "attempts": 1}))  # an orphaned sidecar
    q.recover()
    assert names(tmp_path, "done") == ["new.txt", "stored.txt"]
    assert os.listdir(tmp_path / "processing") == []
    assert store.texts() == ["already stored", "not yet stored"]  # stored once each
    dup = next(e for e in events if e["name"] == "stored.txt" and e["state"] == "done")
    assert dup["duplicate"] is True


def test_watcher_recover_gives_up_on_a_file_that_keeps_killing_the_daemon(tmp_path):
    store = ListStore()
    q = make_queue(tmp_path, store, max_attempts=2)
    (tmp_path / "processing" / "poison.txt").write_text("crashes the tokenizer")
    q.record_attempt("poison.txt", 2, None)  # two attempts begun, none finished
    q.recover()
    assert names(tmp_path, "failed") == ["poison.txt", "poison.txt.reason"]
    assert reason(tmp_path, "poison.txt")["reason"] == (
        "gave up after 2 attempts: the daemon stopped during each attempt")
    assert store.calls == []


def test_watcher_names_never_overwrite(tmp_path):
    store = ListStore()
    q = make_queue(tmp_path, store)
    for text in ("one", "two", "two"):
        (tmp_path / "incoming" / "same.txt").write_text(text)
        q.scan()
    # Same name thrice: three files in done/, the repeated text stored once.
    assert names(tmp_path, "done") == ["same-1.txt", "same-2.txt", "same.txt"]
    assert store.texts() == ["one", "two"]
    for _ in range(2):
        (tmp_path / "incoming" / "e.txt").write_text("")
        q.scan()
    assert names(tmp_path, "failed") == ["e-1.txt", "e-1.txt.reason", "e.txt", "e.txt.reason"]


def test_watcher_add_sanitizes_and_caps_size(tmp_path):
    q = make_queue(tmp_path, ListStore(), max_file_bytes=10)
    assert q.add("../../etc/.passwd", b"x") == ".._.._etc_.passwd".lstrip(".")
    assert q.add("notes.txt", b"a") == "notes.txt"
    assert q.add("notes.txt", b"b") == "notes-1.txt"
    assert q.add("...", b"c") == "unnamed"
    assert q.add("tab\there\n.md", b"d") == "tab_here_.md"
    assert len(q.add("n" * 400 + ".txt", b"e").encode()) <= 200
    with pytest.raises(FileTooLarge, match="11 bytes is over the queue's limit of 10 bytes"):
        q.add("big.txt", b"x" * 11)
    incoming = os.listdir(tmp_path / "incoming")
    assert not [n for n in incoming if n.startswith(".")]  # no temporary file left
    assert (tmp_path / "incoming" / "notes-1.txt").read_bytes() == b"b"
    assert q.counts()["incoming"] == 6


def test_watcher_burst_of_files_all_done(tmp_path):
    store = ListStore()
    q = make_queue(tmp_path, store)
    with running(q):
        for i in range(300):
            drop(tmp_path, f"f{i:03d}.txt", f"document number {i}".encode())
        wait_for(lambda: q.counts()["done"] == 300, "300 files in done/")
    assert len(store.docs) == 300
    assert q.counts() == {"incoming": 0, "processing": 0, "done": 300, "failed": 0}
    assert len(q.list(limit=5)["done"]) == 5


def test_watcher_survives_incoming_being_removed(tmp_path):
    q = make_queue(tmp_path, ListStore())
    with running(q):
        os.rmdir(tmp_path / "incoming")
        wait_for(lambda: (tmp_path / "incoming").is_dir(), "incoming/ recreated")
        drop(tmp_path, "after.txt", b"still watched")
        wait_for(lambda: names(tmp_path, "done") == ["after.txt"], "after.txt in done/")


def test_watcher_run_beats_while_idle_and_stops_without_wake(tmp_path):
    q = make_queue(tmp_path, ListStore())
    stop = threading.Event()
    beats = []
    t = threading.Thread(target=q.run, args=(stop, lambda: beats.append(1)), daemon=True)
    t.start()
    wait_for(lambda: len(beats) >= 3, "heartbeats while nothing happens")
    stop.set()  # no wake(): the watcher notices within its one-second turn
    t.join(timeout=30)
    assert not t.is_alive()
    q.wake()  # after run() ended: harmless


def test_watcher_with_real_datastore_dedups(tmp_path):
    from cllmd.datastore import DataStore
    from cllmd.tokenizer import BytesTokenizer

    tok = BytesTokenizer()
    with DataStore(tmp_path / "data", vocab_size=tok.vocab_size) as ds:
        def ingest(pre, sha):
            ids = tok.encode(pre.text)
            duplicate = ds.has(sha)
            doc = ds.append(np.asarray(ids), source=pre.source, sha256=sha)
            return {"tokens": doc.tokens, "duplicate": duplicate}

        q = make_queue(tmp_path / "queue", ingest)
        drop(tmp_path / "queue", "a.txt", b"#cllm-source https://e.org/a 2026-01-01T00:00:00Z\nhello")
        drop(tmp_path / "queue", "b.txt", b"hello")
        assert q.scan() == 2
        assert names(tmp_path / "queue", "done") == ["a.txt", "b.txt"]
        docs = ds.documents()
        assert len(docs) == 1 and docs[0].source == "https://e.org/a"
        assert tok.decode(ds.read(docs[0])) == "hello"


CHILD = textwrap.dedent("""
    import json, os, sys, threading, time
    from cllmd.queuedir import QueueDir
    from cllmd.retry import RetryPolicy
    from cllmd.watcher import QueueWatcher
    root, log_path = sys.argv[1], sys.argv[2]
    log = open(log_path, "a")

    def ingest(pre, sha):
        time.sleep(0.01)  # slow enough to be killed mid-ingest now and then
        log.write(json.dumps({"sha": sha, "source": pre.source}) + "\\n")
        log.flush()
        os.fsync(log.fileno())  # durable before the queue moves the file to done/
        return {"tokens": 1, "duplicate": False}

    def beat(said=[]):
        if not said:  # the first heartbeat comes once the inotify watch is in place
            print("ready", flush=True)
            said.append(1)

    q = QueueWatcher(QueueDir(root, max_file_bytes=10_000), ingest, retry=RetryPolicy(3),
                     rescan_seconds=3600)
    q.run(threading.Event(), beat)
""")


def read_log(path):
    shas = []
    for line in Path(path).read_text().splitlines():
        try:
            shas.append(json.loads(line)["sha"])
        except ValueError:
            pass  # torn by the kill: that ingest never finished
    return shas


def test_watcher_sigkill_mid_run_loses_no_file(tmp_path):
    root, log_path = tmp_path / "q", tmp_path / "store.log"
    texts = {f"doc{i:02d}.txt": f"text number {i}" for i in range(40)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(log_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        for name, text in texts.items():
            drop(root, name, text.encode())
        wait_for(lambda: len(names(root, "done")) >= 10, "some files done in the child")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
    # Nothing lost: every file is in done/, or still in incoming/ or processing/.
    after_kill = {s: names(root, s) for s in ("incoming", "processing", "done", "failed")}
    assert after_kill["failed"] == []
    assert sorted(after_kill["incoming"] + after_kill["processing"] + after_kill["done"]) == \
        sorted(texts)
    for name in after_kill["done"]:  # done/ means durably in the store
        assert __import__("hashlib").sha256(texts[name].encode()).hexdigest() in read_log(log_path)

    # The next start recovers by itself; the store (dedup by sha256) never keeps a text twice.
    stored = set(read_log(log_path))

    def ingest(pre, sha):
        duplicate = sha in stored
        stored.add(sha)
        return {"tokens": 1, "duplicate": duplicate}

    q = make_queue(root, ingest)
    q.recover()
    q.scan()
    assert names(root, "done") == sorted(texts)
    assert len(stored) == len(texts)
    assert os.listdir(root / "processing") == []


def test_watcher_keeps_going_through_many_errors_in_a_row_and_says_it_recovered(tmp_path, caplog):
    # A lasting real fault: incoming/ replaced by a regular file, so the watch cannot be set up
    # again. Twelve errors in a row (the old limit was ten) must not end the watcher.
    q = make_queue(tmp_path, ListStore(), error_wait=(0.005, 0.05), rescan_seconds=0.05)
    caplog.set_level("INFO", logger="cllmd.watcher")
    stop = threading.Event()
    t = threading.Thread(target=q.run, args=(stop, None), daemon=True)
    t.start()
    wait_for(lambda: "queue: watching" in caplog.text, "the watcher to start")
    # Renaming the watched directory away sends no IN_IGNORED: the next rescan meets the file.
    (tmp_path / "blocker").write_bytes(b"in the way")
    os.rename(tmp_path / "incoming", tmp_path / "incoming.old")
    os.rename(tmp_path / "blocker", tmp_path / "incoming")
    wait_for(lambda: caplog.text.count("watcher error") >= 12, "twelve errors in a row")
    assert t.is_alive()
    assert "watcher error (12 in a row); watching again in 0.05 s" in caplog.text
    os.unlink(tmp_path / "incoming")  # the fault passes
    wait_for(lambda: "watcher recovered after" in caplog.text, "the recovery in the log")
    drop(tmp_path, "after.txt", b"watched again")
    wait_for(lambda: names(tmp_path, "done") == ["after.txt"], "after.txt in done/")
    stop.set()
    q.wake()
    t.join(timeout=30)
    assert not t.is_alive()


def test_watcher_streams_a_large_file_beating_between_pieces(tmp_path, monkeypatch):
    # The daemon's ingest (encode_stream into append_stream) on a file of many pieces: the
    # heartbeat comes after every piece of both passes, with the progress status shows.
    import cllmd.preprocess as P
    from cllmd.datastore import DataStore
    from cllmd.tokenizer import BytesTokenizer
    monkeypatch.setattr(P, "STREAM_MIN_BYTES", 10_000)
    monkeypatch.setattr(P, "READ_BYTES", 4096)
    monkeypatch.setattr(P, "PIECE_CHARS", 4096)
    tok = BytesTokenizer()
    text = "".join(f"line {i}: some plain words of prose.\n" for i in range(20_000))
    with DataStore(tmp_path / "data", vocab_size=tok.vocab_size) as ds:
        def ingest(pre, sha):
            ids = itertools.chain(tok.encode_stream(pre.pieces(), 4096), [np.array([tok.eot_id])])
            doc = ds.append_stream(ids, source=pre.source, sha256=sha, max_tokens=pre.size + 1)
            return {"tokens": doc.tokens}

        q = make_queue(tmp_path / "queue", ingest, max_file_bytes=len(text) + 1)
        seen = []
        stop = threading.Event()
        t = threading.Thread(target=q.run, args=(stop, lambda: seen.append(q.watcher.progress)),
                             daemon=True)
        t.start()
        try:
            wait_for(lambda: seen, "the watcher to start")
            drop(tmp_path / "queue", "big.txt", text.encode())
            wait_for(lambda: names(tmp_path / "queue", "done") == ["big.txt"], "big.txt done")
        finally:
            stop.set()
            q.wake()
            t.join(30)
        docs = ds.documents()
        assert len(docs) == 1 and docs[0].tokens == len(text) + 1
        assert tok.decode(ds.read(docs[0])[:-1]) == text
    pieces = len(text) // 4096
    reading = [p["chars"] for p in seen if p and p["phase"] == "reading"]
    storing = [p["chars"] for p in seen if p and p["phase"] == "storing"]
    assert len(set(reading)) >= pieces and len(set(storing)) >= pieces
    assert reading == sorted(reading) and storing == sorted(storing) and storing[-1] == len(text)
    assert all(p["of"] == len(text) for p in seen if p and p["phase"] == "storing")
    assert q.watcher.progress is None
