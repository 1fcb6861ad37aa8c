"""Reliability benchmark: kill -9 campaign, hostile messages, hostile files (issue 11).

    .venv/bin/python benchmarks/bench_reliability.py [--trials 20] [--messages 10000] [--big-mb 64] [--cold-cache] [--keep]

Runs a real `cllmd serve` (tiny bytes-tokenizer model, so restarts are quick) on temporary
directories and attacks it three ways, then checks what it kept:
- kill -9 campaign: each trial drops fresh files, waits a random moment in one of three phases
  (ingestion, training, a checkpoint being written), kills the daemon with SIGKILL and starts
  it again; the training owed (budget + step, which a step leaves unchanged) must not shrink;
- hostile messages over the real socket: random bytes, wrong types, huge and deeply nested
  fields, slow readers that never read their streams, hundreds of connections; meanwhile a
  separate client pings every 10 ms (p50 / p99 printed, beside how late that client's own
  10 ms sleeps woke: the machine's wait for a core, the floor of any reply time);
- hostile files in incoming/: binary, bad encodings, empty, a --big-mb text file, a 1,000-file
  burst, symbolic and hard links, FIFOs, odd names (newline, not UTF-8, 250 bytes, leading dash).
Before the attack, a --big-mb text file alone: its ingestion time and the daemon's peak RSS
(VmHWM, reset before), and the longest gap between watchdog pings meanwhile (the daemon runs
with a real notification socket and WATCHDOG_USEC=2 s: a ping every second while every worker's
heartbeat is fresh; a worker silent for 5 s stops them); the longest gap during the attack is
printed too. --cold-cache gives the daemon an empty numba cache (a first start: every kernel
compiled before it serves).
At the end (daemon stopped): every good file must be in done/ and its text in the data store
exactly once (files lost / stored twice), the model, the checkpoint and the store must load
(unloadable), and the attack's peak RSS (VmHWM, reset as it starts) is compared with RSS when
idle (2 s after the daemon served its first ping).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import psutil
import zmq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.daemonproc import Daemon, NotifyListener, drop, wait_for  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls watch from old oak "
         "trees and count every star above the quiet sleeping town").split()


def prose(rng: random.Random, n_words: int, tag: str) -> str:
    lines, line = [f"{tag}."], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) == 12:
            lines.append(" ".join(line) + ".")
            line = []
    return "\n".join(lines) + "\n"


def percentiles(samples: list[float]) -> dict:
    s = sorted(samples) or [float("nan")]
    return {"p50_ms": round(1e3 * s[len(s) // 2], 2), "p99_ms": round(1e3 * s[max(0, int(len(s) * 0.99) - 1)], 2),
            "max_ms": round(1e3 * s[-1], 2), "n": len(samples)}


def vm_hwm(pid: int, reset: bool = False) -> int:
    """Peak RSS of `pid` in bytes (VmHWM); with `reset`, first set it to the current RSS."""
    if reset:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def write_big(path: Path, rng: random.Random, big_mb: int) -> tuple[bytes, int]:
    """A big text file, written in pieces under a hidden name, then renamed to `path`; returns
    (block, times): its content is block * times (the daemon may claim it at once, so it is
    not read back)."""
    part = path.with_name("." + path.name + ".part")
    with open(part, "wb") as f:
        block = prose(rng, 20_000, "big file").encode()
        written = 0
        while written < big_mb * 2**20 - len(block):
            f.write(block)
            written += len(block)
    os.rename(part, path)
    return block, written // len(block)


def big_file_alone(d: Daemon, watchdog: NotifyListener, rng: random.Random, big_mb: int,
                   idle: int) -> tuple[dict, tuple[str, str]]:
    inc = d.state / "queue" / "incoming"
    base = vm_hwm(d.proc.pid, reset=True)
    t0 = time.monotonic()
    write_big(inc / "big-alone.txt", rng, big_mb)
    t1 = time.monotonic()
    wait_for(lambda: "big-alone.txt" in d.queue("done") or "big-alone.txt" in d.queue("failed"),
             900, "the big file")
    t2 = time.monotonic()
    peak = vm_hwm(d.proc.pid)
    text = (d.state / "queue" / "done" / "big-alone.txt").read_text()
    return {"mib": big_mb, "ingest_seconds": round(t2 - t1, 1), "rss_before_mib": round(base / 2**20, 1),
            "peak_rss_mib": round(peak / 2**20, 1), "peak_rss_vs_idle": round(peak / idle, 2),
            "longest_watchdog_gap_s": round(watchdog.longest_gap(t0, t2), 2),
            "withheld_pings_logged": d.output().count("withholding the watchdog ping")}, ("big-alone.txt", text)


def _ping_loop(path: str, stop, out) -> None:
    """The pinger's process: ping every 10 ms on its own connection; the round trips go to `out`,
    and how late its own 10 ms sleeps woke (the reference: the machine's wait for a core, which
    no daemon can be faster than)."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{path}")
    rtts, late, errors, rid = [], [], 0, 0
    while not stop.is_set():
        rid += 1
        t0 = time.perf_counter()
        s.send(msgpack.packb({"v": 1, "id": rid, "op": "ping"}))
        while True:
            if not s.poll(5000):
                errors += 1
                break
            if msgpack.unpackb(s.recv()).get("id") == rid:
                rtts.append(time.perf_counter() - t0)
                break
        t0 = time.perf_counter()
        stop.wait(0.01)
        late.append(max(0.0, time.perf_counter() - t0 - 0.01))
    ctx.destroy(0)
    out.put((rtts, late, errors))


class Pinger:
    """Pings every 10 ms from a process of its own (the attack, sent from this process, must
    not delay the pings on this side: only the daemon's answer time is measured)."""

    def __init__(self, sock_path: str):
        mp = multiprocessing.get_context("spawn")
        self._stop, self._out = mp.Event(), mp.Queue()
        self.proc = mp.Process(target=_ping_loop, args=(sock_path, self._stop, self._out), daemon=True)
        self.proc.start()
        self.rtts: list[float] = []
        self.late: list[float] = []   # the pinger's own sleeps: how late they woke
        self.errors = 0

    def stop(self):
        self._stop.set()
        self.rtts, self.late, self.errors = self._out.get(timeout=60)
        self.proc.join(10)


# ----------------------------------------------------------------------------- hostile messages

def hostile_messages(sock_path: str, n: int, rng: random.Random) -> dict:
    ctx = zmq.Context()
    sent = answered = 0
    endpoint = f"ipc://{sock_path}"

    def dealer(hwm=None):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if hwm:
            s.setsockopt(zmq.RCVHWM, hwm)
        s.connect(endpoint)
        return s

    def nested(depth):
        return b"\x91" * depth + b"\xc0"   # fixarray of one element, depth times, then nil

    ops = ["ping", "status", "tokenize", "detokenize", "generate", "queue.list", "queue.add",
           "train.config.set", "cancel", "model.info", "nope", ""]
    wrong = [None, True, -1, 2**64 - 1, -2**63, 1.5, "x" * 300, b"\xff" * 10, [1, [2, [3]]], {"a": {"b": 1}}]

    def one(i):
        kind = i % 8
        if kind == 0:
            return os.urandom(rng.randint(0, 200))
        if kind == 1:   # a real op, arguments of the wrong type
            op = rng.choice(ops)
            return msgpack.packb({"v": 1, "id": i, "op": op,
                                  "args": {k: rng.choice(wrong) for k in ("text", "ids", "prompt", "name",
                                                                          "data", "max_tokens", "id", "lr")}})
        if kind == 2:   # the envelope wrong
            return msgpack.packb(rng.choice([{"v": rng.choice(wrong), "id": i, "op": "ping"},
                                             {"v": 1, "id": rng.choice(wrong), "op": "ping"},
                                             {"v": 1, "id": i, "op": rng.choice(wrong)},
                                             [1, 2, 3], "str", 7, {"v": 1, "id": i, "op": "ping", "args": []}]))
        if kind == 3:   # deeply nested arguments
            return (b"\x84\xa1v\x01\xa2id" + msgpack.packb(i) + b"\xa2op\xa4ping\xa4args"
                    + nested(rng.randint(100, 100_000)))
        if kind == 4:   # huge fields: 1-20 MiB strings (over the 16 MiB limit sometimes)
            if rng.random() < 0.02:
                return msgpack.packb({"v": 1, "id": i, "op": "tokenize", "args": {"text": "a" * rng.randint(1, 20) * 2**20}})
            return msgpack.packb({"v": 1, "id": i, "op": "detokenize", "args": {"ids": list(range(rng.randint(1, 50_000)))}})
        if kind == 5:   # truncated msgpack
            frame = msgpack.packb({"v": 1, "id": i, "op": "status", "args": {"x": "y" * 50}})
            return frame[:rng.randint(1, len(frame) - 1)]
        if kind == 6:   # generate with odd options
            return msgpack.packb({"v": 1, "id": i, "op": "generate",
                                  "args": {"prompt": "ab", "max_tokens": rng.choice([0, 1, 5, 10**9]),
                                           "temperature": rng.choice([-1, 0, 1e308, float("nan")]),
                                           "stream": rng.choice([True, False, "yes"])}})
        return msgpack.packb({"v": 1, "id": i, "op": "queue.add",
                              "args": {"name": rng.choice(["../x", "a\nb", "", ".hidden", "ok.txt", "x" * 300]),
                                       "data": rng.choice([b"", b"\0\1\2", "text", b"ok text\n"])}})

    workers = [dealer() for _ in range(8)]
    for i in range(n):
        s = workers[i % len(workers)]
        s.send(one(i))
        sent += 1
        if i % 50 == 49:   # drain what came back, so our own queues stay small
            for w in workers:
                while w.poll(0):
                    w.recv()
                    answered += 1
    # slow readers: streams requested and never read
    slow = [dealer(hwm=1) for _ in range(8)]
    for j, s in enumerate(slow):
        s.send(msgpack.packb({"v": 1, "id": j, "op": "generate", "args": {"prompt": "x", "max_tokens": 60000}}))
        sent += 1
    # many connections, each a ping
    many = [dealer() for _ in range(300)]
    for j, s in enumerate(many):
        s.send(msgpack.packb({"v": 1, "id": j, "op": "ping"}))
        sent += 1
    deadline = time.monotonic() + 30
    for s in many:
        if s.poll(max(0, int(1000 * (deadline - time.monotonic())))):
            s.recv()
            answered += 1
    time.sleep(2)
    for w in workers:
        while w.poll(200):
            w.recv()
            answered += 1
    ctx.destroy(0)
    return {"sent": sent, "answered": answered}


# ----------------------------------------------------------------------------- hostile files

def hostile_files(d: Daemon, rng: random.Random, big_mb: int) -> list[tuple[str, str]]:
    """Drops the hostile set; returns (name, text) of the good files among it."""
    inc = d.state / "queue" / "incoming"
    good: list[tuple[str, str]] = []
    drop(d, "binary.bin", os.urandom(4096))
    drop(d, "latin1.txt", "caf\xe9 cr\xe8me ".encode("latin-1") * 100)
    drop(d, "utf16-nobom.txt", "hello there".encode("utf-16-le"))
    drop(d, "empty.txt", b"")
    drop(d, "spaces.txt", b" \n\t\n")
    block, times = write_big(inc / "big.txt", rng, big_mb)
    good.append(("big.txt", (block * times).decode()))
    for i in range(1000):   # a burst
        text = prose(rng, 60, f"burst file {i} {rng.random()}")
        drop(d, f"burst-{i:04d}.txt", text.encode())
        good.append((f"burst-{i:04d}.txt", text))
    secret = d.root / "secret.txt"
    secret.write_text("a private file\n")
    os.chmod(secret, 0o600)
    os.symlink(secret, inc / "symlink.txt")
    try:
        os.link(secret, inc / "hardlink.txt")
    except OSError:
        pass
    os.mkfifo(inc / "fifo.txt")
    for name in ("new\nline.txt", "-dash.txt", "x" * 240 + ".txt", "sp ace.txt"):
        text = prose(rng, 50, f"odd name {name!r} {rng.random()}")
        drop(d, name, text.encode())
        good.append((name, text))
    bad_name = os.fsencode(inc) + b"/caf\xe9.txt"   # not UTF-8
    with open(bad_name, "wb") as f:
        f.write(prose(rng, 50, "non utf8 name").encode())
    return good


# ----------------------------------------------------------------------------- kill -9 campaign

def owed(c) -> int:
    st = c.request("train.status")
    return (st.get("budget") or 0) + (st.get("step") or 0)


def kill_campaign(d: Daemon, trials: int, rng: random.Random) -> tuple[dict, list]:
    phases = ["ingestion", "training", "checkpoint"]
    lost_budget = 0
    counts = {p: 0 for p in phases}
    good: list[tuple[str, str]] = []
    for t in range(trials):
        phase = phases[t % 3]
        counts[phase] += 1
        for k in range(5):
            text = prose(rng, 400, f"trial {t} file {k} {rng.random()}")
            name = f"trial-{t:02d}-{k}.txt"
            drop(d, name, text.encode())
            good.append((name, text))
        if phase == "ingestion":
            time.sleep(rng.uniform(0.0, 0.5))
        elif phase == "training":
            wait_for(lambda: not d.queue("incoming") and not d.queue("processing"), 60, "ingestion")
            time.sleep(rng.uniform(0.2, 1.5))
        else:
            wait_for(lambda: not d.queue("incoming") and not d.queue("processing"), 60, "ingestion")
            d.proc.send_signal(signal.SIGUSR1)     # a checkpoint write, killed at a random moment
            time.sleep(rng.uniform(0.0, 0.25))
        try:
            before = owed(d.client)
        except Exception:
            before = None
        d.proc.kill()
        d.proc.wait()
        d.close_client()
        d.log.close()
        d.start()
        if before is not None:
            after = owed(d.client)
            lost_budget += max(0, before - after)
    return {"trials": trials, "by_phase": counts, "budget_steps_lost": lost_budget}, good


# ----------------------------------------------------------------------------- checks

def verify(d: Daemon, good: list[tuple[str, str]]) -> dict:
    from cllmd.datastore import DataStore
    from cllmd.modelfile import read_model_file
    from cllmd.preprocess import preprocess
    unloadable = []
    # the model's directory: <state>/models/NAME/ (named models), else the state directory itself
    home = next((p.parent for p in sorted(d.state.rglob("model.cllm"))), d.state)
    for path in (home / "model.cllm", home / "checkpoints" / "latest.cllm"):
        try:
            read_model_file(path, verify=True)
        except Exception as e:   # noqa: BLE001  (any failure to load counts)
            unloadable.append(f"{path.name}: {e}")
    try:
        store = DataStore(home / "data", vocab_size=257)
    except Exception as e:   # noqa: BLE001
        return {"unloadable": unloadable + [f"data store: {e}"], "lost": None, "stored_twice": None}
    by_sha: dict[str, int] = {}
    for doc in store.documents():
        by_sha[doc.sha256] = by_sha.get(doc.sha256, 0) + 1
    by_source: dict[str, int] = {}
    for doc in store.documents():
        by_source[doc.source] = by_source.get(doc.source, 0) + 1
    store.close()
    lost, twice = [], []
    for name, text in good:
        sha = hashlib.sha256(preprocess(name, text.encode()).text.encode("utf-8", "surrogatepass")).hexdigest()
        n = by_sha.get(sha, 0)
        if n == 0:
            lost.append(name)
    twice = [s for s, n in by_source.items() if n > 1] + [s for s, n in by_sha.items() if n > 1]
    return {"unloadable": unloadable, "lost": lost, "stored_twice": twice}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=21)
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--big-mb", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cold-cache", action="store_true", help="an empty numba cache, as at a first start")
    p.add_argument("--keep", action="store_true",
                   help="keep the run's directory (the daemon's log, state, queue: ~400 MiB) for a look")
    a = p.parse_args()
    rng = random.Random(a.seed)
    root = Path(tempfile.mkdtemp(prefix="cllmd-rel-", dir="/tmp"))
    watchdog = NotifyListener(root / "notify.sock")
    env = {"NOTIFY_SOCKET": str(watchdog.path), "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": ""}
    if a.cold_cache:
        env["NUMBA_CACHE_DIR"] = str(root / "numba-cache")
    d = Daemon(root, "--train-batch-size", "4", "--train-checkpoint-interval-steps", "50",
               "--queue-max-file-bytes", str(max(64, a.big_mb + 1) * 2**20),
               env=env)
    d.start()
    try:
        run(d, a, rng, watchdog)
    finally:
        watchdog.close()
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        if a.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def run(d: Daemon, a, rng: random.Random, watchdog: NotifyListener) -> None:
    time.sleep(2)
    idle = psutil.Process(d.proc.pid).memory_info().rss
    report: dict = {"idle_rss_mib": round(idle / 2**20, 1)}
    report["big_file_alone"], big_alone = big_file_alone(d, watchdog, rng, a.big_mb, idle)

    t0 = time.monotonic()
    vm_hwm(d.proc.pid, reset=True)   # the attack's peak: the kernel's, no sample misses it
    withheld = d.output().count("withholding the watchdog ping")
    pinger = Pinger(str(d.run / "cllmd.sock"))
    good = hostile_files(d, rng, a.big_mb) + [big_alone]
    report["messages"] = hostile_messages(str(d.run / "cllmd.sock"), a.messages, rng)
    wait_for(lambda: not d.queue("incoming") and not d.queue("processing") or None, 900, "the hostile files")
    pinger.stop()
    peak = vm_hwm(d.proc.pid)
    report["attack_seconds"] = round(time.monotonic() - t0, 1)
    report["attack_longest_watchdog_gap_s"] = round(watchdog.longest_gap(t0, time.monotonic()), 2)
    report["attack_withheld_pings_logged"] = d.output().count("withholding the watchdog ping") - withheld
    report["ping_under_attack"] = percentiles(pinger.rtts)
    report["pinger_wakeup_lateness"] = percentiles(pinger.late)   # the reference
    report["ping_timeouts"] = pinger.errors
    report["attack_peak_rss_mib"] = round(peak / 2**20, 1)
    report["attack_peak_rss_vs_idle"] = round(peak / idle, 2)
    report["failed_files"] = sorted(n for n in d.queue("failed") if not n.endswith(".reason"))

    campaign, trial_files = kill_campaign(d, a.trials, rng)
    report["kill9"] = campaign
    good += trial_files
    wait_for(lambda: not d.queue("incoming") and not d.queue("processing") or None, 300, "the last files")
    d.stop()
    checks = verify(d, good)
    report["files_checked"] = len(good)
    report["files_lost"] = len(checks["lost"]) if checks["lost"] is not None else "store unloadable"
    report["files_stored_twice"] = len(checks["stored_twice"]) if checks["stored_twice"] is not None else "-"
    report["unloadable"] = checks["unloadable"]
    report["lost_names"] = (checks["lost"] or [])[:10]
    print(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"\nfiles lost {report['files_lost']}, stored twice {report['files_stored_twice']}, "
          f"unloadable {len(report['unloadable'])}; budget steps lost {campaign['budget_steps_lost']} "
          f"over {a.trials} kill -9 trials; ping under attack p50 {report['ping_under_attack']['p50_ms']} ms, "
          f"p99 {report['ping_under_attack']['p99_ms']} ms (the pinger's own wake-ups meanwhile: p99 "
          f"{report['pinger_wakeup_lateness']['p99_ms']} ms late); peak RSS {report['attack_peak_rss_mib']} MiB "
          f"= {report['attack_peak_rss_vs_idle']}x idle ({report['idle_rss_mib']} MiB); longest watchdog gap "
          f"{report['attack_longest_watchdog_gap_s']} s ({report['attack_withheld_pings_logged']} pings withheld); "
          f"the {a.big_mb} MiB file alone: {report['big_file_alone']['ingest_seconds']} s, peak RSS "
          f"{report['big_file_alone']['peak_rss_mib']} MiB, longest watchdog gap "
          f"{report['big_file_alone']['longest_watchdog_gap_s']} s")


if __name__ == "__main__":
    main()
