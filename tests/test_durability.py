"""Issue 11's durability and queue findings, each through the real daemon (tests/daemonproc.py):
real files, real signals, kill -9."""
from __future__ import annotations

import json
import os
import signal
import stat
import threading

import numpy as np

from tests.daemonproc import daemon, drop, wait_for  # noqa: F401 (fixture)

TEXT = "".join(f"line {i} of a document that earns a training budget.\n" for i in range(400))


def _modes(root):
    return {str(p.relative_to(root)): stat.S_IMODE(os.lstat(p).st_mode)
            for p in root.rglob("*") if not p.is_symlink() and not p.name.startswith(".")}


def _checkpoint_plan(path):
    from cllmd.modelfile import read_model_file
    header, _ = read_model_file(path, verify=False)
    return header["metadata"]["checkpoint"].get("extra", {}).get("plan")


def test_durability_kill9_right_after_done_keeps_the_files_budget(daemon):
    # F2: paused, so no step runs and no checkpoint is written between done/ and the kill.
    d = daemon()
    d.client.request("train.pause")
    drop(d, "notes.txt", TEXT.encode())
    wait_for(lambda: d.queue("done") == ["notes.txt"], 60, "notes.txt in done/")
    before = wait_for(lambda: (s := d.client.request("train.status"))["budget"] > 0 and s, 30,
                      "the file's budget")
    assert not (d.model_dir() / "checkpoints" / "latest.cllm").exists()
    d.stop(signal.SIGKILL)
    d = daemon()
    after = d.client.request("train.status")   # (training has started again: compare totals)
    assert after["budget_total"] == before["budget"] and after["budget"] > 0
    assert d.output().count("stored after the last checkpoint: their steps are owed") == 1
    # Once checkpointed, the credit is in the checkpoint: another kill -9 owes nothing twice.
    d.client.request("train.pause")
    d.client.request("checkpoint", timeout=60)
    plan = _checkpoint_plan(d.model_dir() / "checkpoints" / "latest.cllm")
    # (the restarted daemon was not paused at once: a step or two may have run)
    assert 0 < plan["budget"] <= before["budget"] and plan["credited"] > 0
    d.stop(signal.SIGKILL)
    d = daemon()
    again = d.client.request("train.status")
    assert again["budget_total"] == before["budget"] and 0 < again["budget"] <= plan["budget"]
    assert d.output().count("their steps are owed") == 1   # nothing owed twice
    d.stop()


def test_durability_plan_lives_in_the_checkpoint_and_old_state_dirs_migrate(daemon, tmp_path):
    # F6: a state directory of the previous layout (a checkpoint without a plan, the plan in
    # checkpoints/training.json) keeps its budget, and its next checkpoint holds the plan.
    from cllmd.model import Model, ModelConfig
    from cllmd.tokenizer import BytesTokenizer
    from cllmd.tokensource import TokenArraySource
    from cllmd.trainer import TrainConfig, Trainer

    state = tmp_path / "state"
    (state / "checkpoints").mkdir(parents=True)
    cfg = ModelConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=32, block_size=32)
    model = Model(cfg, seed=0, tokenizer=BytesTokenizer())
    model.save(state / "model.cllm")
    source = TokenArraySource(np.arange(500, dtype=np.uint16) % 257)
    trainer = Trainer(model, source, TrainConfig(batch_size=4), threads=1)
    trainer.save_checkpoint(state / "checkpoints" / "latest.cllm")  # no plan: the old layout
    trainer.close()
    legacy = state / "checkpoints" / "training.json"
    legacy.write_text(json.dumps({"step": 0, "budget": 37, "budget_total": 50, "reason": "auto",
                                  "since": 0}))
    d = daemon()   # moves the old layout into models/default/ first
    status = d.client.request("train.status")
    assert (status["budget"], status["budget_total"]) == (37, 50)
    d.client.request("checkpoint", timeout=60)
    assert not legacy.exists() and not (d.model_dir() / "checkpoints" / "training.json").exists()
    plan = _checkpoint_plan(d.model_dir() / "checkpoints" / "latest.cllm")
    assert (plan["budget"], plan["budget_total"], plan["reason"]) == (37, 50, "auto")
    d.stop()
    d = daemon()
    assert d.client.request("train.status")["budget"] == 37
    d.stop()


def test_durability_crash_leftovers_are_swept_at_start(daemon, tmp_path):
    # F5: the temporary files of checkpoint and model writes a kill -9 interrupted.
    d = daemon(start=False)   # its model file is made now
    state = d.state
    (state / "checkpoints").mkdir(parents=True)
    (d.model_dir() / "checkpoints").mkdir(parents=True)
    junk = {d.model_dir() / "checkpoints" / ".latest.cllm.tmp-4243-0badf00d": 2_000_000,
            state / "checkpoints" / ".latest.cllm.tmp-4242-0badf00d": 3_000_000,
            state / ".model.cllm.tmp-4242-deadbeef": 1_000_000}
    for path, size in junk.items():
        path.write_bytes(b"\0" * size)
    keep = state / "checkpoints" / ".not-ours"
    keep.write_bytes(b"left alone")
    d.start()
    assert not [p for p in junk if p.exists()]
    assert (d.model_dir() / "checkpoints" / ".not-ours").exists()   # migrated, not swept
    for size in (3_000_000, 2_000_000, 1_000_000):
        assert f"removed 1 temporary file(s) ({size} bytes) left in" in d.output()
    d.stop()


def test_durability_files_and_directories_are_private_by_default(daemon, tmp_path):
    # F9: run by hand with the usual umask 022, over directories that already exist 0755.
    old = os.umask(0o022)
    try:
        d = daemon(start=False)   # its model.cllm is made now, 0644
        state = d.state
        for sub in ("", "data", "checkpoints", "queue"):
            (state / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(state / sub, 0o755)
        d.start()
    finally:
        os.umask(old)
    drop(d, "doc.txt", TEXT.encode())
    wait_for(lambda: d.queue("done") == ["doc.txt"], 60, "doc.txt in done/")
    d.client.request("checkpoint", timeout=60)
    d.stop()
    modes = _modes(state)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o750 and modes["queue"] == 0o750
    # data/ and checkpoints/ were 0755 in the old layout: migrated, then tightened
    for sub in ("models", "models/default", "models/default/data", "models/default/checkpoints"):
        assert modes[sub] == 0o700, (sub, oct(modes[sub]))
    for name, mode in modes.items():
        if name.startswith("models/") and (state / name).is_file():
            assert mode == 0o600, (name, oct(mode))
        if not name.startswith("queue/"):   # dropped files keep their dropper's mode
            assert not mode & 0o007, (name, oct(mode))   # nothing for others


def test_durability_queue_names_that_are_not_utf8_and_hard_links(daemon, tmp_path):
    # F4 and F8: both handled at claim time, with their events, and queue.list keeps answering.
    d = daemon()
    sub = d.client.subscribe(["queue", "train"], timeout=60)
    next(iter(sub))  # subscribed for real (a PUB socket drops what comes before)
    incoming = d.state / "queue" / "incoming"
    raw = os.fsdecode(b"r\xe9sum\xe9.txt")
    with open(incoming / f".{raw}.part", "wb") as f:
        f.write(TEXT.encode())
    os.rename(incoming / f".{raw}.part", incoming / raw)
    secret = tmp_path / "secret.txt"
    secret.write_text("only its owner may read this\n" * 10)
    os.chmod(secret, 0o600)
    os.link(secret, incoming / "linked.txt")
    portable = "r\ufffdsum\ufffd.txt"
    failed = d.state / "queue" / "failed"
    wait_for(lambda: d.queue("done") == [portable] and (failed / "linked.txt.reason").exists(),
             60, "both claimed")
    listing = d.client.request("queue.list")
    names = {(f["name"], f["state"]) for f in listing["files"]}
    assert (portable, "done") in names and ("linked.txt", "failed") in names
    reason = next(f["reason"] for f in listing["files"] if f["name"] == "linked.txt")
    assert reason["reason"].startswith("a hard link (2 names for one file): refused")
    changes = []
    for topic, payload in sub:
        if topic != "queue":
            continue
        changes.append((payload["change"]["name"], payload["change"]["state"]))
        if (portable, "done") in changes and ("linked.txt", "failed") in changes:
            break
    assert (portable, "processing") in changes
    d.stop()


def test_durability_sigusr1_checkpoints_without_a_waiting_thread(daemon):
    # F10: each SIGUSR1 used to start a thread that waited for the checkpoint with no timeout.
    d = daemon()
    drop(d, "doc.txt", TEXT.encode())
    wait_for(lambda: d.queue("done") == ["doc.txt"], 60, "doc.txt in done/")
    d.client.request("train.pause")
    tasks = lambda: len(os.listdir(f"/proc/{d.proc.pid}/task"))  # noqa: E731
    before = tasks()
    ckpt = d.model_dir() / "checkpoints" / "latest.cllm"
    for _ in range(5):
        mtime = ckpt.stat().st_mtime_ns if ckpt.exists() else 0
        d.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: ckpt.exists() and ckpt.stat().st_mtime_ns != mtime, 60, "a checkpoint")
    assert tasks() <= before
    assert d.output().count("checkpoint requested (SIGUSR1)") == 5
    d.stop()


def test_durability_a_checkpoint_that_fails_otherwise_than_by_oserror_keeps_training(tmp_path):
    # F10: a value msgpack cannot pack makes write_model_file raise ModelFileError (a
    # ValueError, not an OSError); the trainer
    # thread records the error, keeps the previous checkpoint and goes on training.
    from cllmd.controller import ControllerSettings, TrainingController
    from cllmd.model import Model, ModelConfig
    from cllmd.tokensource import TokenArraySource
    from cllmd.trainer import TrainConfig, Trainer

    cfg = ModelConfig(vocab_size=50, n_layer=1, n_head=1, n_embd=8, block_size=8)
    trainer = Trainer(Model(cfg, seed=0), TokenArraySource(np.arange(400) % 50),
                      TrainConfig(batch_size=2, eval_interval=0), threads=1)
    ctl = TrainingController(trainer, checkpoint_path=tmp_path / "latest.cllm",
                             model_path=tmp_path / "model.cllm", settings=ControllerSettings())
    stop = threading.Event()
    t = threading.Thread(target=ctl.run, args=(stop,), daemon=True)
    t.start()
    try:
        assert ctl.request_checkpoint(timeout=60)
        good = (tmp_path / "latest.cllm").read_bytes()
        trainer.model.metadata["bad"] = object()
        ctl.start(10_000)
        assert ctl.request_checkpoint(timeout=60)
        assert t.is_alive() and ctl.last_error.startswith("checkpoint failed: ModelFileError")
        step = trainer.step_num
        wait_for(lambda: trainer.step_num > step + 2, 60, "training to go on")
        assert (tmp_path / "latest.cllm").read_bytes() == good
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    finally:
        trainer.model.metadata.pop("bad", None)
        stop.set()
        t.join(60)
    assert not t.is_alive()


def _big_text(mib: int) -> bytes:
    line = "a line of plain prose that a large text file is made of, over and over again.\n"
    return (line * (mib * 2**20 // len(line))).encode()


def _peak_rss_since_reset(pid: int, reset: bool = False) -> int:
    """VmHWM (peak RSS) of `pid` in bytes; with `reset`, first make it the current RSS."""
    if reset:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")   # resets the peak RSS to the current RSS (Linux >= 4.0)
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_durability_a_large_text_file_streams_under_the_watchdog(daemon, tmp_path):
    # F3: a multi-MiB text file goes through in pieces: its progress shows in status, the
    # watchdog keeps being pinged (a worker silent for 3 intervals would stop the pings), and
    # the daemon's peak RSS grows by less than the file's size (whole, it grew ~10x the file).
    from tests.daemonproc import NotifyListener
    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        d = daemon("--no-train-auto-train", env={"NOTIFY_SOCKET": str(listener.path),
                                                "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": ""})
        wait_for(lambda: "WATCHDOG=1" in listener.messages, 30, "a first watchdog ping")
        data = _big_text(48)
        base = _peak_rss_since_reset(d.proc.pid, reset=True)
        drop(d, "big.txt", data)
        progress = []

        def done():
            p = d.client.request("status")["queue"]["progress"]
            if p:
                progress.append(p)
            return d.queue("done") == ["big.txt"]
        wait_for(done, 300, "big.txt in done/")
        peak = _peak_rss_since_reset(d.proc.pid)
        status = d.client.request("status")
        assert status["queue"]["progress"] is None and status["queue"]["failed"] == 0
        print(f"48 MiB text file: peak RSS {base / 2**20:.0f} -> {peak / 2**20:.0f} MiB; "
              f"{len(progress)} progress samples")
        assert peak - base < len(data), (base, peak)
        assert any(p["phase"] == "storing" and 0 < p["chars"] < p["of"] for p in progress), progress
        assert "withholding the watchdog ping" not in d.output()
        pings = listener.messages.count("WATCHDOG=1")
        wait_for(lambda: listener.messages.count("WATCHDOG=1") > pings, 30, "pings going on")
        d.stop()
    finally:
        listener.close()
    from cllmd.datastore import DataStore
    with DataStore(d.model_dir() / "data", vocab_size=257) as store:
        (doc,) = store.documents()
        assert doc.tokens == len(data) + 1
        assert store.read(doc)[:-1].tobytes() == np.frombuffer(data, np.uint8).astype(store.dtype).tobytes()


def test_durability_kill9_in_the_middle_of_a_streamed_file(daemon):
    # The queue's state machine holds for a file stored piece by piece: killed while its
    # pieces are being written, it is neither lost nor stored twice; the torn tail is cut.
    d = daemon("--no-train-auto-train")
    data = _big_text(48)
    drop(d, "big.txt", data)

    def storing():
        p = d.client.request("status")["queue"]["progress"]
        return p and p["phase"] == "storing" and 0 < p["chars"] < p["of"] // 2
    wait_for(storing, 300, "big.txt being stored")
    d.stop(signal.SIGKILL)
    assert d.queue("processing") == ["big.txt"] and d.queue("done") == []
    d = daemon("--no-train-auto-train")
    wait_for(lambda: d.queue("done") == ["big.txt"], 300, "big.txt in done/ after the restart")
    assert "written but never indexed" in d.output()   # the tail of the killed attempt, cut
    drop(d, "again.txt", data)   # the same text under another name: stored once
    wait_for(lambda: d.queue("done") == ["again.txt", "big.txt"], 300, "again.txt in done/")
    d.stop()
    from cllmd.datastore import DataStore
    with DataStore(d.model_dir() / "data", vocab_size=257) as store:
        (doc,) = store.documents()
        assert doc.tokens == len(data) + 1
        assert store.read(doc)[:-1].tobytes() == np.frombuffer(data, np.uint8).astype(store.dtype).tobytes()


def test_durability_site_furniture_is_remembered_across_restarts(daemon):
    # Lines repeated across a site's pages are dropped once 4 earlier pages held them; that
    # memory lives in <state>/furniture.msgpack, so pages after a restart are still cleaned.
    def page(i):
        return (f"#cllm-source https://docs.example.org/p{i}.html 2026-01-01T00:00:00Z\n"
                f"<html><body><div>Page {i} says something of its own, number {i}.</div>"
                f"<div>Copyright 2026 Example Docs Team, all rights reserved.</div>"
                f"</body></html>").encode()
    d = daemon("--no-train-auto-train")
    for i in range(4):
        drop(d, f"p{i}.html", page(i))
        wait_for(lambda: len(d.queue("done")) == i + 1, 60, f"p{i}.html in done/")
    d.stop()
    assert (d.state / "furniture.msgpack").exists()
    d = daemon("--no-train-auto-train")
    assert "furniture memory: 1 site(s)" in d.output()
    drop(d, "p4.html", page(4))
    wait_for(lambda: "p4.html" in d.queue("done"), 60, "p4.html in done/")
    d.stop()
    from cllmd.datastore import DataStore
    from cllmd.tokenizer import BytesTokenizer
    with DataStore(d.model_dir() / "data", vocab_size=257) as store:
        texts = [BytesTokenizer().decode(store.read(doc)[:-1]) for doc in store.documents()]
    assert len(texts) == 5 and sum("Copyright" in t for t in texts) == 4
    assert "Page 4 says something of its own, number 4." in texts
