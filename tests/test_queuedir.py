"""Tests for cllmd.queuedir: the moves between the queue's directories, on real files."""

import json
import os

import pytest

from cllm.durable import temp_path
from cllmd.queuedir import BadInput, NotInQueue, QueueDir


def test_queuedir_moves_through_every_state_and_reports_each(tmp_path):
    events = []
    q = QueueDir(tmp_path, max_file_bytes=100, on_event=events.append)
    placed = []
    q.on_placed.append(placed.append)
    assert q.add("a.txt", b"one") == "a.txt" and placed == ["a.txt"]
    (tmp_path / "incoming" / "b.txt").write_bytes(b"two")
    assert q.claim("a.txt") == "a.txt" and q.claim("a.txt") is None
    assert q.read("a.txt") == b"one"
    assert q.finish("a.txt", tokens=3) == "a.txt"
    assert q.claim("b.txt") == "b.txt"
    assert q.fail("b.txt", "bad input", 1) == "b.txt"
    reason = json.loads((tmp_path / "failed" / "b.txt.reason").read_text())
    assert reason["reason"] == "bad input" and reason["attempts"] == 1
    assert q.retry("b.txt") == "b.txt" and not (tmp_path / "failed" / "b.txt.reason").exists()
    assert q.counts() == {"incoming": 1, "processing": 0, "done": 1, "failed": 0}
    assert [(e["name"], e["state"]) for e in events] == [
        ("a.txt", "incoming"), ("a.txt", "done"), ("b.txt", "failed"), ("b.txt", "incoming")]
    assert events[1]["tokens"] == 3


def test_queuedir_stranded_sweeps_crash_leftovers_and_keeps_attempts(tmp_path):
    q = QueueDir(tmp_path, max_file_bytes=100)
    (tmp_path / "processing" / "left.txt").write_text("mid-ingest")
    q.record_attempt("left.txt", 2, "boom")
    temp_path(tmp_path / "processing" / "x").write_text("torn")  # a killed atomic write
    temp_path(tmp_path / "failed" / "y.reason").write_text("torn")
    (tmp_path / "processing" / ".attempts-000000000000000000000000").write_text(
        json.dumps({"name": "gone.txt", "attempts": 1}))
    assert q.stranded() == ["left.txt"]
    assert q.attempts("left.txt") == (2, "boom")
    assert sorted(os.listdir(tmp_path / "processing")) == [q._sidecar("left.txt").name, "left.txt"]
    assert os.listdir(tmp_path / "failed") == []


def test_queuedir_read_refuses_what_is_not_a_plain_file(tmp_path):
    q = QueueDir(tmp_path, max_file_bytes=4)
    os.symlink("/etc/hostname", tmp_path / "processing" / "link")
    os.mkfifo(tmp_path / "processing" / "fifo")
    (tmp_path / "processing" / "big").write_bytes(b"12345")
    for name, why in (("link", "not a regular file"), ("fifo", "not a regular file"),
                      ("big", "too large: 5 bytes, the limit is 4")):
        with pytest.raises(BadInput, match=why):
            q.read(name)
    with pytest.raises(NotInQueue, match="invalid queue file name"):
        q.retry(".hidden")


def test_queuedir_claim_gives_a_name_that_is_not_utf8_a_portable_form(tmp_path):
    # Issue 11, F4: a real file whose name holds the byte 0xff (and a newline).
    events = []
    q = QueueDir(tmp_path, max_file_bytes=100, on_event=events.append)
    raw = os.fsdecode(b"caf\xe9\nmenu.txt")
    (tmp_path / "incoming" / raw).write_bytes(b"text")
    listed = q.list()["incoming"]
    assert [e["name"] for e in listed] == ["caf\ufffd_menu.txt"]
    listed[0]["name"].encode("utf-8")  # can go on the wire
    pname = q.claim(raw)
    assert pname == "caf\ufffd_menu.txt"
    assert q.finish(pname) == pname
    assert events[-1]["name"].encode("utf-8") == "caf\ufffd_menu.txt".encode("utf-8")
    assert os.listdir(tmp_path / "done") == ["caf\ufffd_menu.txt"]


def test_queuedir_refuses_a_hard_link(tmp_path):
    # Issue 11, F8: a link to a file its dropper may not read must not be read for them.
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"private")
    os.chmod(secret, 0o600)
    q = QueueDir(tmp_path / "q", max_file_bytes=100)
    os.link(secret, tmp_path / "q" / "processing" / "linked.txt")
    with pytest.raises(BadInput, match=r"a hard link \(2 names for one file\): refused"):
        q.read("linked.txt")


def test_queuedir_list_limit_picks_the_newest_moves_first(tmp_path):
    q = QueueDir(tmp_path, max_file_bytes=100)
    for i in range(30):  # older files, not moved by this process
        (tmp_path / "done" / f"old{i:02d}.txt").write_bytes(b"x")
    for name in ("a.txt", "b.txt", "c.txt"):
        q.add(name, b"y")
        q.finish(q.claim(name))
    done = q.list(limit=5, states=["done"])["done"]
    assert sorted(e["name"] for e in done) == ["a.txt", "b.txt", "c.txt", "old28.txt", "old29.txt"]
    assert q.list(limit=2, states=["done"])["done"][-1]["name"] in ("b.txt", "c.txt")
    assert len(q.list()["done"]) == 33


def test_queuedir_list_during_a_failure_waits_for_its_reason(tmp_path, monkeypatch):
    # fail() renames the file into failed/, then writes its reason: a listing in between
    # (the reads pool runs it beside the queue thread) must still show the reason
    import threading

    import cllmd.queuedir as queuedir
    q = QueueDir(tmp_path, max_file_bytes=100)
    q.add("b.txt", b"two")
    assert q.claim("b.txt") == "b.txt"
    renamed, go = threading.Event(), threading.Event()
    write = queuedir.atomic_write

    def paused(*args, **kwargs):   # the reason's write, held until the listing has started
        renamed.set()
        go.wait(10)
        return write(*args, **kwargs)

    monkeypatch.setattr(queuedir, "atomic_write", paused)
    failer = threading.Thread(target=q.fail, args=("b.txt", "bad input", 1))
    failer.start()
    assert renamed.wait(10) and (tmp_path / "failed" / "b.txt").exists()
    listing = []
    lister = threading.Thread(target=lambda: listing.append(q.list()))
    lister.start()
    lister.join(0.3)
    go.set()
    failer.join(10)
    lister.join(10)
    assert listing[0]["failed"][0]["reason"] == "bad input"
