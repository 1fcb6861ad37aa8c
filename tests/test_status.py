"""`cllm-status` against a real daemon: the --once snapshot (12 spheres around node zero, queue
counts), the layout at 80x24, and the live curses view on a real 80x24 pseudo-terminal: it
draws, follows training, its keys act on the daemon, q restores the terminal, and it shows a
daemon going away and coming back."""
from __future__ import annotations

import json
import re
import subprocess
import termios

import pytest

from cllm.client import Client
from cllm.status import RING, Dashboard, render
from tests.daemonproc import Daemon, daemon, drop, wait_for  # noqa: F401 (fixture)
from tests.ptyterm import Pty, cllm_status

TEXT = b"Twelve spheres kiss a thirteenth in the middle, and node zero sums what they learn.\n" * 40
COLOUR = re.compile(rb"\x1b\[(?:\d+;)*3[0-7](?:;\d+)*m")   # a foreground colour (setaf)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """One daemon for the module, with a little data to train on and one rejected file."""
    dm = Daemon(tmp_path_factory.mktemp("statusd"), "--no-train-auto-train").start()
    try:
        drop(dm, "spheres.txt", TEXT)
        drop(dm, "blob.bin", b"\x00\x01binary")
        wait_for(lambda: dm.queue("done") == ["spheres.txt"] and "blob.bin" in dm.queue("failed"), 30,
                 "the queue to settle")
        yield dm
    finally:
        dm.client.close()
        dm.stop()


def sock(d) -> str:
    return str(d.run / "cllmd.sock")


def cells(lines: list[str]) -> dict[int, tuple[int, int]]:
    """Where each sphere's label is drawn: id -> (row, column); node zero is id 0."""
    found = {}
    for y, line in enumerate(lines):
        for m in re.finditer(r"[○●◐×◇] *(\d{1,2}) (?:idle|work|wait|stop)", line):
            found[int(m.group(1))] = (y, m.start())
        if "◉ node 0" in line:
            found[0] = (y, line.index("◉ node 0"))
    return found


def test_status_once_shows_the_12_spheres_and_the_queue_counts(d):
    r = subprocess.run(cllm_status("--socket", sock(d), "--once"), capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines) and len(lines) <= 24 and "\x1b" not in r.stdout
    where = cells(lines)
    assert sorted(where) == list(range(13))   # node zero and all 12 spheres
    (y0, x0), (y12, x12), (y6, x6), (y3, x3), (y9, x9) = (where[k] for k in (0, 12, 6, 3, 9))
    assert y12 < y0 < y6 and x12 == x0 == x6   # a clock: 12 above, 6 below,
    assert x9 < x0 < x3 and y9 == y0 == y3     # 9 left, 3 right

    def clockwise(ids, down, right):   # each quarter of the clock turns the right way
        for a, b in zip(ids, ids[1:]):
            (ya, xa), (yb, xb) = where[a], where[b]
            assert (yb > ya) == down and (xb > xa) == right, (a, b)
    clockwise([12, 1, 2, 3], down=True, right=True)
    clockwise([3, 4, 5, 6], down=True, right=False)
    clockwise([6, 7, 8, 9], down=False, right=False)
    clockwise([9, 10, 11, 12], down=False, right=True)
    counts = next(line for line in lines if line.startswith("queue "))
    assert re.search(r"incoming 0\s+processing 0\s+done 1\s+failed 1", counts)
    assert "training" in r.stdout and "state     idle" in r.stdout and "node zero and the 12 spheres" in r.stdout
    # a view started after the fact still shows the failure, and when the model was last saved
    d.client.request("checkpoint")
    r = subprocess.run(cllm_status("--socket", sock(d), "--once"), capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "COLUMNS": "80", "LINES": "40"})
    assert re.search(r"blob\.bin -> failed: binary data", r.stdout), r.stdout
    assert re.search(r"saved +step \d+, \S+ ago", r.stdout), r.stdout


def test_status_json_is_the_stats_snapshot(d):
    r = subprocess.run(cllm_status("--socket", sock(d), "--json"), capture_output=True, text=True, timeout=60)
    stats = json.loads(r.stdout)
    assert [s["id"] for s in stats["train"]["spheres"]] == list(range(1, 13))
    assert stats["queue"]["done"] == 1 and stats["queue"]["failed"] == 1 and stats["model"]["context"] == 32


def test_status_render_fits_80x24_and_grows_with_the_terminal(d):
    board = Dashboard()
    with Client(sock(d)) as c:
        board.apply_stats(c.request("stats"))
    for i in range(30):
        board.apply_event("log", {"time": 1e9 + i, "level": "warning", "logger": "cllmd.x", "message": f"line {i}"})
    board.apply_event("queue", {"counts": {"incoming": 2, "processing": 1, "done": 5, "failed": 1},
                                "current": "notes.txt", "change": {"name": "a.bin", "state": "failed",
                                                                   "reason": "binary data"}})
    small = render(board, 80, 24)
    lines = small.lines()
    assert len(lines) == 24 and all(len(x) <= 80 for x in lines)
    assert sorted(cells(lines)) == list(range(13))
    assert lines[-1].strip().startswith("q quit") and "now: notes.txt" in "\n".join(lines)
    assert "a.bin -> failed: binary data" in "\n".join(lines)   # newest log lines are shown
    big = render(board, 132, 40).lines()
    shown = lambda ls: sum(1 for x in ls if re.search(r"warning +cllmd\.x: line", x))  # noqa: E731
    assert shown(big) > shown(lines) and max(map(len, big)) > 80
    board.went_away("cllmd is not running (no socket at /x)")
    down = "\n".join(render(board, 80, 24).lines())
    assert "disconnected" in down and "cllmd is not running (no socket at /x) - retrying" in down
    ascii_only = "\n".join(render(board, 80, 24, unicode=False).lines())
    assert ascii_only.isascii()


def test_status_train_events_keep_the_polled_sphere_states(d):
    with Client(sock(d)) as c:
        stats = c.request("stats")
    stats["train"]["spheres"][0]["state"] = "working"   # as a poll sees it during a step
    board = Dashboard()
    board.apply_stats(stats)
    event = json.loads(json.dumps(stats["train"]))
    for sp in event["spheres"]:   # as a train event, sent between two steps, sees it
        sp.update(state="idle", batches=sp["batches"] + 1)
    board.apply_event("train", {"seq": 1, "time": 1e9, **event, "step": 5, "loss": 2.5})
    spheres = board.train["spheres"]
    assert spheres[0]["state"] == "working" and spheres[1]["state"] == "idle"
    assert spheres[0]["batches"] == stats["train"]["spheres"][0]["batches"] + 1
    assert board.train["step"] == 5 and list(board.loss) == [2.5]


def test_status_live_view_under_a_pty(d, tmp_path):
    c = Client(sock(d))
    t = Pty(cllm_status("--socket", sock(d)), rows=24, cols=80)
    try:
        for drawn in (r"◉ node 0", r"state +idle", r"connected", r"queue +incoming 0"):
            t.expect(drawn)   # (in the order curses writes them, not necessarily top to bottom)
        for sid in RING:
            t.expect(rf"[○●◐×] *{sid} idle")

        m = t.mark()
        c.request("train.start", steps=10**7)
        t.expect(r"running", m)   # follows the daemon's train events
        t.expect(r"step +\d|\d{3,}", m)

        m = t.mark()
        t.write("p")
        wait_for(lambda: c.request("train.status")["state"] == "paused", 30, "p to pause training")
        t.expect(r"paused", m)
        t.write("p")
        wait_for(lambda: c.request("train.status")["state"] == "running", 30, "p to resume training")
        threads = c.request("train.config.get")["threads"]
        t.write("+" if threads < 12 else "-")
        wait_for(lambda: c.request("train.config.get")["threads"] != threads, 30, "+ to change the threads")
        m = t.mark()
        t.write("s")
        t.expect(r"checkpoint at step \d+ written", m)
        t.write("t")
        wait_for(lambda: c.request("train.status")["state"] == "idle", 30, "t to stop training")
        c.request("train.config.set", threads=threads)

        m = t.mark()
        t.write("?")
        t.expect(r"one thread more / fewer", m)
        t.write("x")   # any key closes the help
        m = t.mark()
        t.write("q")
        assert t.wait(30) == 0
        assert b"\x1b[?1049l" in t.data[m:]                       # left the alternate screen
        assert termios.tcgetattr(t.slave) == t.initial_attrs     # echo, line mode: as before
        assert COLOUR.search(bytes(t.data))                      # states are coloured
    finally:
        t.close()
        c.close()


def test_status_shows_a_daemon_going_away_and_coming_back_without_colour(daemon, tmp_path):
    first = daemon("--no-train-auto-train")
    first.client.close()
    drop(first, "spheres.txt", TEXT)   # data to train on after the restart
    wait_for(lambda: first.queue("done") == ["spheres.txt"], 30, "the text to be ingested")
    t = Pty(cllm_status("--socket", str(first.run / "cllmd.sock"), "--interval", "0.3"),
            env={"NO_COLOR": "1"})
    second = None
    try:
        t.expect(r"model default")
        m = t.mark()
        first.stop()
        t.expect(r"disconnected", m)
        t.expect(r"cllmd is not running", m)
        m = t.mark()
        second = Daemon(tmp_path, "--no-train-auto-train").start()
        t.expect(r"model default", m)   # reconnected by itself
        with second.client as c:
            c.request("train.start", steps=10**7)
            t.expect(r"running", m)     # the event subscription came back too
            c.request("train.stop")
        t.write("q")
        assert t.wait(30) == 0
        assert not COLOUR.search(bytes(t.data))   # NO_COLOR
    finally:
        t.close()
        if second is not None:
            second.stop()
