"""`cllm-status` (also `cllm top`): the live full-screen view of cllmd — node zero and its 12
kissing spheres, training figures with loss sparklines, the queue, serving and recent log lines —
fed by the event subscription; `--once` prints one plain-text snapshot, `--json` the raw stats."""
from __future__ import annotations

import argparse
import json
import locale
import math
import queue
import shutil
import sys
import threading
import time
from collections import deque
from typing import Any, Iterable

from cllm import __version__
from cllm.catalogue import SETTINGS
from cllm.client import Client, ClientError, DaemonNotRunning, RequestError
from cllm.fmt import duration, human_bytes, human_count, number, sparkline, unicode_ok, use_color

TOPICS = ("train", "queue", "checkpoint", "log", "error")
FAILED_AT_START = 10   # failed files shown in the recent log when the view starts
MIN_REDRAW_S = 0.25        # at most four frames a second
EVENT_WAIT_S = 0.1         # how long the loop sleeps on the event socket: key latency
HISTORY = 512              # loss values kept for the sparklines
RUNNING_POLL_S = 0.25      # stats polls while training runs: the spheres' states

# --------------------------------------------------------------------------- what is known


class Dashboard:
    """Everything the view shows, updated from `stats` replies and events; no I/O."""

    def __init__(self) -> None:
        self.stats: dict = {}
        self.connected = False
        self.down_reason = "connecting..."
        self.loss: deque[float] = deque(maxlen=HISTORY)
        self.val_loss: deque[float] = deque(maxlen=HISTORY)
        self._last_step: int | None = None
        self._last_val: tuple | None = None
        self.logs: deque[tuple[float, str, str]] = deque(maxlen=200)   # (time, level, text)
        self.checkpoint: dict | None = None
        self.message = ""
        self.message_until = 0.0
        self.show_help = False
        self.events_seen = 0
        self.live_states = False   # sphere states known from a stats poll

    @property
    def train(self) -> dict:
        return self.stats.get("train") or {}

    def apply_stats(self, stats: dict) -> None:
        self.stats = dict(stats)
        self.connected = True
        self.live_states = True
        self._note_train(self.train)

    def apply_failures(self, listing: dict) -> None:
        """Files that failed before this view started, from queue.list, into the recent log."""
        seen = {text for _, _, text in self.logs}
        for f in sorted(listing.get("files") or [], key=lambda f: (f.get("reason") or {}).get("time") or ""):
            r = f.get("reason") or {}
            text = f"{f.get('name')} -> failed: {r.get('reason')}"
            if " ".join(text.split()) not in seen:
                when = f.get("mtime") or time.time()
                self.log(when, "error", text)

    def went_away(self, reason: str) -> None:
        if self.connected:
            self.log(time.time(), "error", f"disconnected: {reason}")
        self.connected = False
        self.down_reason = reason

    def apply_event(self, topic: str, payload: dict) -> None:
        self.events_seen += 1
        when = payload.get("time") or time.time()
        body = {k: v for k, v in payload.items() if k not in ("seq", "time")}
        if topic == "train":
            polled = {sp.get("id"): sp for sp in self.train.get("spheres") or [] if isinstance(sp, dict)}
            if self.live_states and polled and isinstance(body.get("spheres"), list):
                # train events are sent between two steps, when every sphere is idle; what the
                # spheres are doing comes from the stats polls, sampled while steps run
                body["spheres"] = [{**sp, "state": polled.get(sp.get("id"), sp).get("state")}
                                   if isinstance(sp, dict) else sp for sp in body["spheres"]]
            self.stats["train"] = {**self.train, **body}
            self._note_train(self.train)
        elif topic == "queue":
            q = dict(self.stats.get("queue") or {})
            q.update(body.get("counts") or {})
            q["current"] = body.get("current")
            self.stats["queue"] = q
            change = body.get("change")
            if change and change.get("state") in ("done", "failed"):
                why = f": {change['reason']}" if change.get("reason") else ""
                level = "error" if change["state"] == "failed" else "queue"
                self.log(when, level, f"{change.get('name')} -> {change['state']}{why}")
        elif topic == "checkpoint":
            self.checkpoint = {**body, "time": when}
            self.log(when, "info", f"{body.get('kind', 'checkpoint')} at step {body.get('step')} written "
                                   f"({human_bytes(body.get('bytes'))}, {number(body.get('seconds'), '.2f')} s)")
        elif topic == "log":
            self.log(when, body.get("level", "log"), f"{body.get('logger')}: {body.get('message')}")
        elif topic == "error":
            self.log(when, "error", f"{body.get('source')}: {body.get('message')}")

    def _note_train(self, t: dict) -> None:
        step, loss = t.get("step"), t.get("loss")
        if step is not None and step != self._last_step and isinstance(loss, (int, float)):
            self._last_step = step
            self.loss.append(float(loss))
        val = t.get("val_loss")
        if isinstance(val, (int, float)) and (step, val) != self._last_val:
            if self._last_val is None or self._last_val[1] != val:
                self.val_loss.append(float(val))
            self._last_val = (step, val)

    def log(self, when: float, level: str, text: str) -> None:
        self.logs.append((when, level, " ".join(str(text).split())))

    def say(self, text: str, seconds: float = 4.0) -> None:
        self.message = text
        self.message_until = time.monotonic() + seconds


# --------------------------------------------------------------------------- drawing into a grid


class Canvas:
    """A width x height grid of characters, each with a style name (None = plain)."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.chars = [[" "] * width for _ in range(height)]
        self.styles: list[list[str | None]] = [[None] * width for _ in range(height)]

    def put(self, y: int, x: int, text: str, style: str | None = None) -> int:
        """Writes `text` at (y, x), clipped to the grid; returns the column after it."""
        if 0 <= y < self.height:
            for i, ch in enumerate(text):
                cx = x + i
                if 0 <= cx < self.width:
                    self.chars[y][cx] = ch
                    self.styles[y][cx] = style
        return x + len(text)

    def fill(self, y: int, style: str) -> None:
        if 0 <= y < self.height:
            self.styles[y] = [style] * self.width

    def lines(self) -> list[str]:
        return ["".join(row).rstrip() for row in self.chars]

    def runs(self, y: int) -> Iterable[tuple[int, str, str | None]]:
        """(x, text, style) runs of one row, for curses."""
        row, styles = self.chars[y], self.styles[y]
        start = 0
        for x in range(1, self.width + 1):
            if x == self.width or styles[x] != styles[start]:
                yield start, "".join(row[start:x]), styles[start]
                start = x


# Clock positions of the 12 spheres around node zero, (row, column) of each 2-line, 9-column
# cell in a 14 x 41 ring: an ellipse, since a terminal cell is about twice as tall as wide.
RING = {12: (0, 16), 1: (2, 25), 2: (4, 31), 3: (6, 32), 4: (8, 31), 5: (10, 25), 6: (12, 16),
        7: (10, 7), 8: (8, 1), 9: (6, 0), 10: (4, 1), 11: (2, 7)}
RING_CENTRE = (6, 16)
RING_HEIGHT, RING_WIDTH = 14, 41
STATE_STYLE = {"working": "working", "waiting": "waiting", "idle": "idle", "stopped": "stopped",
               "running": "working", "paused": "waiting", "stopping": "waiting"}
SYMBOLS = {True: {"working": "●", "waiting": "◐", "idle": "○", "stopped": "×", None: "◇", "centre": "◉"},
           False: {"working": "*", "waiting": "+", "idle": "o", "stopped": "x", None: "?", "centre": "@"}}
KEYS = "q quit  p pause/resume  t start/stop  s checkpoint  +/- threads  ? help"
HELP_LINES = [
    "keys",
    "",
    "q          quit (Ctrl-C too)",
    "p          pause or resume training",
    "t          start training (one pass) or stop it",
    "s, c       write a checkpoint now",
    "+ / -      one thread more / fewer for the spheres",
    "? or h     this help (any key closes it)",
    "",
    "sphere colours: working, waiting for node zero,",
    "idle, stopped; each shows its batches and mean loss",
]


def short_count(n: float | None) -> str:
    """At most four characters: 999, 1.2k, 12k, 123k, 1.2M, ..."""
    if n is None:
        return "-"
    n = float(n)
    if n < 1000:
        return f"{n:.0f}"
    for unit, scale in (("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12)):
        v = n / scale
        if v < 10:
            return f"{v:.1f}{unit}"
        if v < 1000:
            return f"{v:.0f}{unit}"
    return "9999T"


def short_loss(x: float | None) -> str:
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return "  - "
    if x < 10:
        return f"{x:4.2f}"
    if x < 100:
        return f"{x:4.1f}"
    return " 99+"


def draw_spheres(c: Canvas, top: int, left: int, train: dict, unicode: bool) -> None:
    """Node zero in the centre, sphere k at the k o'clock position, coloured by state."""
    sym = SYMBOLS[unicode]
    spheres = {s.get("id"): s for s in (train.get("spheres") or []) if isinstance(s, dict)}
    for sid, (dy, dx) in RING.items():
        s = spheres.get(sid)
        y, x = top + dy, left + dx
        if s is None:
            c.put(y, x, f"{sym[None]}{sid:>3}  -- ", "dim")
            continue
        state = str(s.get("state") or "?")
        style = STATE_STYLE.get(state, "other")
        c.put(y, x, f"{sym.get(state, sym[None])}{sid:>3} {state[:4]:<4}", style)
        # under mpirun the rank that runs the sphere replaces its batch count (same 4 columns)
        first = f"r{s.get('rank')}"[:4] if train.get("ranks") else short_count(s.get('batches'))
        c.put(y + 1, x, f"{first:>4} {short_loss(s.get('mean_loss'))}")
    state = str(train.get("state") or "?")
    y, x = top + RING_CENTRE[0], left + RING_CENTRE[1]
    c.put(y, x, f"{sym['centre']} node 0", "bold")
    c.put(y + 1, x, f"{state[:9]:^9}", STATE_STYLE.get(state, "other"))


def render(d: Dashboard, width: int = 80, height: int = 24, *, unicode: bool = True,
           once: bool = False) -> Canvas:
    """The whole screen. The layout is made for 80x24 and grows with the terminal: a wider
    one gets longer sparklines and log lines, a taller one more log lines."""
    c = Canvas(width, height)
    st = d.stats
    dm, model, t = st.get("daemon") or {}, st.get("model") or {}, d.train
    q, sv = st.get("queue") or {}, st.get("serving") or {}

    # row 0: who and how the daemon is doing
    c.fill(0, "title")
    badge = " connected " if d.connected else " disconnected "
    head = " cllm-status"
    if dm:
        dot = " · " if unicode else " | "
        head = dot.join([f" cllmd {dm.get('version')}", f"pid {dm.get('pid')}", f"up {duration(dm.get('uptime_s'))}",
                         f"cpu {number(dm.get('cpu_percent'), '.0f')}%", f"rss {human_bytes(dm.get('rss_bytes'))}"])
    c.put(0, 0, head[:max(0, width - len(badge))], "title")
    c.put(0, max(0, width - len(badge)), badge, "title" if d.connected else "bad")
    if not d.connected:
        c.put(1, 0, f"{d.down_reason} - retrying", "bad")
    elif model:
        c.put(1, 0, f"model {model.get('name')}  {human_count(model.get('parameters'))} parameters  "
                    f"context {model.get('context')}  vocabulary {model.get('vocab_size')}", "dim")

    # the spheres, left
    c.put(2, 1, "node zero and the 12 spheres", "bold")
    draw_spheres(c, 3, 1, t, unicode)

    # training, right
    rx = RING_WIDTH + 4
    c.put(2, rx, "training", "bold")
    rows = _training_rows(d, t, width - rx - 10, unicode)
    for i, (label, value, style) in enumerate(rows):
        c.put(3 + i, rx, f"{label:<10}", "dim")
        c.put(3 + i, rx + 10, value, style)

    # the pipeline and serving
    y = 3 + RING_HEIGHT
    x = c.put(y, 0, "queue    ", "bold")
    for name in ("incoming", "processing", "done", "failed"):
        n = q.get(name, 0) or 0
        x = c.put(y, x, f"{name} ", "dim")
        x = c.put(y, x, f"{n}", "bad" if name == "failed" and n else None) + 2
    if q.get("current"):
        c.put(y, x, f"now: {q['current']}", "accent")
    x = c.put(y + 1, 0, "serving  ", "bold")
    c.put(y + 1, x, f"running {sv.get('running', 0)}  waiting {sv.get('waiting', 0)}  "
                    f"{human_count(sv.get('tokens_per_second'))} tokens/s")
    if once and not (d.logs and height > 24):   # --once shows the log only when given room
        return c

    # recent log lines, then the keys
    y += 2
    c.put(y, 0, "recent log " + ("─" if unicode else "-") * (width - 11), "dim")
    room = height - y - (1 if once else 2)
    recent = list(d.logs)[-room:] if room > 0 else []
    if not recent and room > 0:
        c.put(y + 1, 0, "(warnings, errors, checkpoints and queue results appear here)", "dim")
    for i, (when, level, text) in enumerate(recent):
        stamp = time.strftime("%H:%M:%S", time.localtime(when))
        style = {"error": "bad", "critical": "bad", "warning": "warn", "queue": "dim", "info": "ok"}.get(level)
        c.put(y + 1 + i, 0, f"{stamp} {level:<7} {text}"[:width], style)
    if once:
        return c
    last = height - 1
    c.fill(last, "title")
    if d.message and time.monotonic() < d.message_until:
        c.put(last, 0, f" {d.message}"[:width], "title")
    else:
        c.put(last, 0, f" {KEYS}"[:width], "title")
    if width < 80 or height < 24:
        c.put(last, max(0, width - 14), " need 80x24 ", "bad")
    if d.show_help:
        _draw_help(c)
    return c


def _training_rows(d: Dashboard, t: dict, spark_width: int, unicode: bool) -> list[tuple[str, str, str | None]]:
    state = str(t.get("state") or "?")
    budget = t.get("budget")
    step = f"{t.get('step', '-')}"
    if budget:
        step += f"  ({human_count(budget)} to go)"
    spark = max(0, spark_width - 8)
    loss = f"{number(t.get('loss'), '.4f'):<7} {sparkline(d.loss, spark, unicode)}"
    val = f"{number(t.get('val_loss'), '.4f'):<7} {sparkline(d.val_loss, spark, unicode)}"
    ppl = t.get("perplexity")
    if ppl is None:
        base = t.get("val_loss") if t.get("val_loss") is not None else t.get("loss")
        ppl = math.exp(min(base, 700.0)) if isinstance(base, (int, float)) else None
    ck = d.checkpoint or t.get("checkpoint")   # the last event seen, else what the daemon says
    ck_text = (f"step {ck.get('step')}, {duration(time.time() - ck['time'])} ago" if ck else "-")
    rows = [
        ("state", state + ("  (auto)" if t.get("auto_train") else ""), STATE_STYLE.get(state, "other")),
        ("step", step, "bold"),
        ("tokens", f"{human_count(t.get('tokens_seen'))} seen", None),
        ("loss", loss, "accent"),
        ("val loss", val, "accent"),
        ("perplex.", number(ppl, ".2f"), None),
        ("lr", number(t.get("lr"), ".2e"), None),
        ("grad norm", number(t.get("grad_norm"), ".3f"), None),
        ("speed", f"{human_count(t.get('tokens_per_second'))} tokens/s", None),
        ("eta", duration(t.get("eta_s")), None),
        ("skipped", f"{t.get('skipped_steps', 0)} steps", "bad" if t.get("skipped_steps") else None),
        ("threads", f"{t.get('threads', '-')}   batch {t.get('batch_size', '-')}   {t.get('precision', '-')}", None),
        ("saved", ck_text, None),
    ]
    if t.get("last_error"):
        rows.append(("error", str(t["last_error"]), "bad"))
    return rows


def _draw_help(c: Canvas) -> None:
    w = max(map(len, HELP_LINES)) + 4
    h = len(HELP_LINES) + 2
    top, left = max(0, (c.height - h) // 2), max(0, (c.width - w) // 2)
    for i in range(h):
        c.put(top + i, left, " " * w, "help")
    for i, line in enumerate(HELP_LINES):
        c.put(top + 1 + i, left + 2, line, "help")


# --------------------------------------------------------------------------- the live view


class Worker(threading.Thread):
    """Talks to the daemon off the drawing thread, on its own Client: a `stats` poll every
    `interval` seconds (every RUNNING_POLL_S while training runs, for the spheres' states) and
    the actions the keys ask for. Results go to `results`."""

    def __init__(self, socket: str | None, interval: float, results: queue.SimpleQueue):
        super().__init__(name="cllm-status-requests", daemon=True)
        self.socket, self.interval, self.results = socket, interval, results
        self.jobs: queue.Queue = queue.Queue()
        self.stopping = threading.Event()

    def ask(self, label: str, op: str, timeout: float = 5.0, **args: Any) -> None:
        self.jobs.put((label, op, timeout, args))

    def run(self) -> None:
        client = Client(self.socket, timeout=3.0, retries=0)
        next_poll = 0.0
        self.ask("failures", "queue.list", state="failed", limit=FAILED_AT_START)
        try:
            while not self.stopping.is_set():
                try:
                    job = self.jobs.get(timeout=max(0.0, next_poll - time.monotonic()))
                except queue.Empty:
                    job = None
                if job is None:
                    every = self.interval
                    try:
                        stats = client.request("stats")
                        self.results.put(("stats", stats))
                        if (stats.get("train") or {}).get("state") == "running":
                            every = min(every, RUNNING_POLL_S)
                    except ClientError as e:
                        self.results.put(("down", str(e)))
                    next_poll = time.monotonic() + every
                    continue
                label, op, timeout, args = job
                try:
                    self.results.put(("done", label, op, client.request(op, timeout=timeout, **args)))
                except RequestError as e:
                    self.results.put(("failed", label, op, f"{e.code}: {e.message}"))
                except ClientError as e:
                    self.results.put(("failed", label, op, str(e)))
        finally:
            client.close()


def _curses_styles(curses, color: bool) -> dict[str | None, int]:
    A = curses
    styles = {None: A.A_NORMAL, "title": A.A_REVERSE, "dim": A.A_DIM, "bold": A.A_BOLD,
              "help": A.A_REVERSE, "working": A.A_BOLD, "waiting": A.A_NORMAL, "idle": A.A_DIM,
              "stopped": A.A_UNDERLINE, "other": A.A_UNDERLINE, "ok": A.A_NORMAL, "bad": A.A_BOLD,
              "warn": A.A_BOLD, "accent": A.A_NORMAL}
    if not curses.has_colors():
        return styles
    curses.start_color()   # (curses.wrapper did too) the terminal's own colours for plain text,
    try:                   # not white on black
        curses.use_default_colors()
        bg = -1
    except curses.error:
        bg = curses.COLOR_BLACK
    if not color:
        return styles
    pairs = {"working": curses.COLOR_GREEN, "waiting": curses.COLOR_YELLOW, "idle": curses.COLOR_BLUE,
             "stopped": curses.COLOR_RED, "other": curses.COLOR_MAGENTA, "ok": curses.COLOR_GREEN,
             "bad": curses.COLOR_RED, "warn": curses.COLOR_YELLOW, "accent": curses.COLOR_CYAN}
    for i, (name, fg) in enumerate(pairs.items(), start=1):
        curses.init_pair(i, fg, bg)
        styles[name] = curses.color_pair(i) | (A.A_BOLD if name in ("working", "bad") else 0)
    curses.init_pair(len(pairs) + 1, curses.COLOR_BLACK, curses.COLOR_CYAN)
    styles["title"] = curses.color_pair(len(pairs) + 1)
    styles["help"] = curses.color_pair(len(pairs) + 1)
    return styles


class LiveView:
    """The curses loop: events and worker results in, keys handled, redrawn when something
    changed but at most every MIN_REDRAW_S."""

    def __init__(self, socket: str | None, interval: float, color: bool):
        self.socket, self.interval, self.color = socket, interval, color
        self.d = Dashboard()
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.worker = Worker(socket, interval, self.results)

    def run(self) -> int:
        import curses
        locale.setlocale(locale.LC_ALL, "")
        unicode = unicode_ok(locale.getpreferredencoding(False))
        client = Client(self.socket)
        sub = client.subscribe(TOPICS)
        self.worker.start()
        try:
            return curses.wrapper(self._loop, sub, unicode)
        except KeyboardInterrupt:
            return 0
        finally:
            self.worker.stopping.set()
            self.worker.jobs.put(None)
            sub.close()
            client.close()

    def _loop(self, stdscr, sub, unicode: bool) -> int:
        import curses
        try:
            curses.curs_set(0)
        except curses.error:
            pass
        stdscr.nodelay(True)
        stdscr.keypad(True)
        styles = _curses_styles(curses, self.color)
        dirty, last_draw = True, 0.0
        while True:
            event = sub.recv(EVENT_WAIT_S)
            while event is not None:
                self.d.apply_event(*event)
                dirty = True
                event = sub.recv(0)
            while True:
                try:
                    result = self.results.get_nowait()
                except queue.Empty:
                    break
                self._on_result(result)
                dirty = True
            while True:
                key = stdscr.getch()
                if key == -1:
                    break
                if self._on_key(key) == "quit":
                    return 0
                dirty = True
            if self.d.message and time.monotonic() >= self.d.message_until:
                self.d.message = ""
                dirty = True
            now = time.monotonic()
            if dirty and now - last_draw >= MIN_REDRAW_S:
                self._draw(stdscr, styles, unicode)
                dirty, last_draw = False, now

    def _draw(self, stdscr, styles: dict, unicode: bool) -> None:
        import curses
        height, width = stdscr.getmaxyx()
        canvas = render(self.d, width, height, unicode=unicode)
        stdscr.erase()
        for y in range(height):
            for x, text, style in canvas.runs(y):
                try:
                    stdscr.addstr(y, x, text, styles.get(style, 0))
                except curses.error:   # the bottom-right cell cannot be written without scrolling
                    pass
        stdscr.refresh()

    def _on_result(self, r: tuple) -> None:
        kind = r[0]
        if kind == "stats":
            self.d.apply_stats(r[1])
        elif kind == "down":
            self.d.went_away(r[1])
        elif kind == "done":
            _, label, op, res = r
            if op == "queue.list":
                self.d.apply_failures(res)
                return
            if op.startswith("train.") and op != "train.config.set":
                self.d.stats["train"] = {**self.d.train, **res}
            if op == "checkpoint":
                self.d.say(f"checkpoint at step {res.get('step')} written ({human_bytes(res.get('bytes'))})")
            elif op == "train.config.set":
                self.d.say(f"threads: {res.get('config', {}).get('threads')} from step {res.get('applies_at_step')}")
            else:
                self.d.say(f"{label} requested (training {res.get('state')})")
        elif kind == "failed":
            _, label, op, err = r
            self.d.say(f"{label} failed: {err}", 8.0)
            self.d.log(time.time(), "error", f"{label}: {err}")

    def _on_key(self, key: int) -> str | None:
        ch = chr(key) if 0 <= key < 256 else ""
        if self.d.show_help and key != -1:
            self.d.show_help = False
            return None if ch not in ("q", "Q") else "quit"
        state = self.d.train.get("state")
        if ch in ("q", "Q", "\x03"):
            return "quit"
        if ch in ("?", "h", "H"):
            self.d.show_help = True
        elif ch in ("p", "P"):
            if state == "running":
                self.worker.ask("pause", "train.pause")
                self.d.say("pausing after this step...")
            elif state == "paused":
                self.worker.ask("resume", "train.resume")
                self.d.say("resuming...")
            else:
                self.d.say(f"training is {state or 'unknown'}: nothing to pause (t starts it)")
        elif ch in ("t", "T"):
            if state in ("running", "paused"):
                self.worker.ask("stop", "train.stop")
                self.d.say("stopping after this step...")
            else:
                self.worker.ask("start", "train.start")
                self.d.say("starting training...")
        elif ch in ("s", "S", "c", "C"):
            self.worker.ask("checkpoint", "checkpoint", timeout=130.0)
            self.d.say("writing a checkpoint...", 130.0)
        elif ch in ("+", "=", "-", "_"):
            threads = self.d.train.get("threads")
            if not isinstance(threads, int):
                self.d.say("thread count not known yet")
                return None
            most = SETTINGS["train.threads"].kind.hi  # 0 means "the usable cores": not a step
            want = max(1, min(most, threads + (1 if ch in ("+", "=") else -1)))
            if want == threads:
                self.d.say(f"threads stay at {threads} (1 to {most})")
            else:
                self.worker.ask("threads", "train.config.set", threads=want)
                self.d.say(f"threads -> {want}...")
        return None


# --------------------------------------------------------------------------- the command


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser(prog: str = "cllm-status") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="The live view of cllmd: node zero and its 12 spheres, training, "
                                       "the queue, serving and recent log lines.",
                epilog="Keys: " + KEYS + ". NO_COLOR turns colours off. Exit codes: 0 ok, "
                       "2 bad arguments or (with --once/--json) cllmd not running.")
    p.add_argument("--socket", metavar="PATH", help="the daemon's socket (default: as cllm finds it)")
    p.add_argument("--once", action="store_true", help="print one plain-text snapshot and exit")
    p.add_argument("--json", action="store_true", help="print one snapshot as JSON (the stats op) and exit")
    p.add_argument("--width", type=int, metavar="COLUMNS", help="--once: width of the snapshot (default: the terminal's, at least 80)")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often daemon figures (CPU, memory, serving) are polled (default 1)")
    p.add_argument("--no-color", action="store_true", help="no colours (as NO_COLOR=1)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def snapshot(socket: str | None, width: int, unicode: bool, height: int = 24) -> str:
    d = Dashboard()
    with Client(socket, timeout=5.0) as client:
        d.apply_stats(client.request("stats"))
        d.apply_failures(client.request("queue.list", state="failed", limit=FAILED_AT_START))
    lines = render(d, width, max(24, height), unicode=unicode, once=True).lines()
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, prog: str = "cllm-status") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.interval <= 0 or not math.isfinite(args.interval):
        print(f"{prog}: --interval must be > 0 seconds", file=sys.stderr)
        return 2
    try:
        if args.json:
            with Client(args.socket, timeout=5.0) as client:
                print(json.dumps(client.request("stats"), indent=2, ensure_ascii=False))
            return 0
        if args.once:
            size = shutil.get_terminal_size((80, 24))   # $COLUMNS/$LINES, else the terminal's
            width = args.width or max(80, size.columns)
            sys.stdout.write(snapshot(args.socket, width, unicode_ok(sys.stdout.encoding), size.lines))
            return 0
    except DaemonNotRunning as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except RequestError as e:
        print(f"{prog}: error {e.code}: {e.message}", file=sys.stderr)
        return 1
    except ClientError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print(f"{prog}: the live view needs a terminal (use --once or --json in scripts)", file=sys.stderr)
        return 2
    color = use_color(sys.stdout) and not args.no_color
    return LiveView(args.socket, args.interval, color).run()


if __name__ == "__main__":
    sys.exit(main())
