"""The `cllm` command against a real daemon: every subcommand with --json, human output, exit
codes, streaming generation cancelled by a real SIGINT, the queue written atomically, the crawler."""
from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cllm.client import Client
from cllm.layout import write_incoming
from tests.daemonproc import Daemon, daemon, drop, wait_for  # noqa: F401 (fixture)
from tests.ptyterm import cllm

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.\n") * 30


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """One daemon for the module (tiny bytes model, context 32, no automatic training)."""
    dm = Daemon(tmp_path_factory.mktemp("clid"), "--no-train-auto-train").start()
    try:
        yield dm
    finally:
        dm.client.close()
        dm.stop()


def run(d, *args, input=None, timeout=60, env=None):
    return subprocess.run(cllm("--socket", str(d.run / "cllmd.sock"), *args), input=input,
                          capture_output=True, text=True, timeout=timeout, env=env)


def as_json(d, *args, input=None):
    r = run(d, "--json", *args, input=input)
    assert r.returncode == 0, f"cllm {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout)


# ---- the command itself ---------------------------------------------------------------------------


def test_cli_imports_only_the_client_side():
    code = ("import sys, io, contextlib\n"
            "from cllm import cli, chat, status, client, wire, fmt\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n"
            "        cli.main(['--help'])\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, e.code\n"
            "assert 'generate' in out.getvalue()\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'numba', 'cllmd'))\n"
            "print(bad)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_cli_every_subcommand_has_help():
    for args in (["--help"], ["status", "--help"], ["generate", "--help"], ["chat", "--help"],
                 ["train", "--help"], ["train", "config", "--help"], ["queue", "add", "--help"],
                 ["queue", "ls", "--help"], ["model", "info", "--help"], ["checkpoint", "--help"],
                 ["tokenize", "--help"], ["ping", "--help"], ["crawl", "--help"], ["top", "--help"]):
        r = subprocess.run(cllm(*args), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage:" in r.stdout, (args, r.stderr)
    r = subprocess.run(cllm("generate", "--help"), capture_output=True, text=True, timeout=60)
    for option in ("--max-tokens", "--temperature", "--top-k", "--top-p", "--min-p", "--repeat-penalty",
                   "--seed", "--stop", "--json", "--socket"):
        assert option in r.stdout


def test_cli_not_running_answers_at_once_with_exit_2(tmp_path):
    missing = tmp_path / "nothing.sock"
    t0 = time.monotonic()
    r = subprocess.run(cllm("--socket", str(missing), "status"), capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2 and r.stderr == f"cllm: cllmd is not running (no socket at {missing})\n"
    assert elapsed < 2.0   # the bound; the client itself does not wait at all

    stale = tmp_path / "stale.sock"   # a socket file nobody listens on (a daemon killed with -9)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    r = subprocess.run(cllm("--json", "ping"), capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, CLLM_SOCKET=str(stale)))
    assert r.returncode == 2 and f"nothing listening at {stale}" in r.stderr
    assert json.loads(r.stdout)["error"]["code"] == "not_running"
    for args in (["generate", "hi"], ["train", "status"], ["queue", "ls"], ["top", "--once"]):
        r = subprocess.run(cllm("--socket", str(missing), *args), capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "cllmd is not running (no socket at" in r.stderr, args


@pytest.mark.parametrize("args, message", [
    (["generate", "--temperature", "11", "x"], "temperature must be a number >= 0 and <= 10"),
    (["generate", "--max-tokens", "0", "x"], "max_tokens must be an integer from 1 to 65536"),
    (["generate", "--top-k", "many", "x"], "top_k must be an integer"),
    (["generate", "--stop", "", "x"], "a stop string must have 1 to 1024 characters"),
    (["train", "config", "lr=fast"], "lr must be a number"),
    (["train", "config", "nonsense=1"], "unknown key 'nonsense'"),
    (["train", "config", "auto_train=maybe"], "auto_train must be true or false"),
    (["train", "config", "lr"], "expected KEY=VALUE"),
    (["train", "start", "--steps", "0"], "expected an integer >= 1"),
    (["queue", "add", "/no/such/file.txt"], "cannot read /no/such/file.txt"),
    (["queue", "ls", "--state", "lost"], "invalid choice: 'lost'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train"], "required: ACTION"),
    (["ping", "-c", "0"], "expected an integer >= 1"),
])
def test_cli_bad_arguments_give_one_line_and_exit_2(d, args, message):
    r = run(d, *args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_cli_daemon_errors_print_code_and_message_and_exit_1(d):
    r = run(d, "queue", "retry", "no-such-file.txt")
    assert r.returncode == 1 and r.stderr.startswith("cllm: error not_found: ") and "no-such-file.txt" in r.stderr
    r = run(d, "--json", "train", "config", "min_lr=0.5", "lr=0.1")   # valid alone, not together
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "bad_request"
    assert "min_lr" in r.stderr


# ---- every subcommand with --json, and its human output -------------------------------------------


def test_cli_status_ping_model_tokenize_json_and_text(d):
    st = as_json(d, "status")
    assert st["model"]["context"] == 32 and st["train"]["state"] == "idle" and st["daemon"]["rss_bytes"] > 0
    assert set(st["queue"]) >= {"incoming", "processing", "done", "failed"}
    text = run(d, "status").stdout
    for word in ("daemon", "model", "training", "queue", "serving", "perplexity", "tokens/s", "rss"):
        assert word in text

    ping = as_json(d, "ping", "-c", "3", "-i", "0")
    assert ping["version"] == 1 and len(ping["rtt_ms"]) == 3 and ping["min_ms"] <= ping["max_ms"]
    out = run(d, "ping").stdout
    assert out.startswith("pong from cllmd ") and " ms" in out

    info = as_json(d, "model", "info")
    assert info["config"]["context"] == 32 and info["tokenizer"]["kind"] == "bytes" and info["parameters"] > 0
    assert "tokenizer   bytes (257 symbols)" in run(d, "model", "info").stdout

    tok = as_json(d, "tokenize", "héllo")
    assert tok == {"ids": list("héllo".encode()), "count": 6}
    r = run(d, "tokenize", input="ab")   # from stdin
    assert r.stdout == "97 98\n" and r.stderr == "2 tokens\n"
    assert as_json(d, "detokenize", *map(str, tok["ids"]))["text"] == "héllo"
    assert run(d, "detokenize", "104", "105").stdout == "hi"


def test_cli_generate_with_every_sampling_option(d):
    opts = ["--max-tokens", "12", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.01",
            "--repeat-penalty", "1.1", "--repeat-last-n", "16", "--seed", "7"]
    a = as_json(d, "generate", *opts, "Once upon")
    b = run(d, "generate", *opts, "Once upon")
    assert a["tokens_generated"] == 12 and a["tokens_prompt"] == 9 and a["stop_reason"] == "max_tokens"
    assert b.returncode == 0 and b.stdout == a["text"]   # same seed, same text; streamed to stdout
    assert b.stderr.startswith("[9 prompt tokens, 12 generated in ") and "tokens/s, stop: max_tokens]" in b.stderr
    with Client(str(d.run / "cllmd.sock")) as c:
        same = c.request("generate", prompt="Once upon", max_tokens=12, temperature=0.9, top_k=40, top_p=0.95,
                         min_p=0.01, repeat_penalty=1.1, repeat_last_n=16, seed=7, stream=False)
    assert same["text"] == a["text"]

    # the prompt from stdin; a stop string cuts the text
    greedy = as_json(d, "generate", "--temperature", "0", "--max-tokens", "20", input="abc")
    assert greedy["tokens_prompt"] == 3 and len(greedy["text"]) > 3
    cut = greedy["text"][3:6]
    stopped = as_json(d, "generate", "--temperature", "0", "--max-tokens", "20", "--stop", cut, "abc")
    assert stopped["stop_reason"] == "stop" and stopped["text"] == greedy["text"][:greedy["text"].index(cut)]
    quiet = run(d, "generate", "-q", "--max-tokens", "3", "x")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_cli_generate_ctrl_c_cancels_in_the_daemon(d):
    p = subprocess.Popen(cllm("--socket", str(d.run / "cllmd.sock"), "generate", "--temperature", "0",
                              "--max-tokens", "65536", "a"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         bufsize=0)   # unbuffered: communicate() below must see every byte not read here
    try:
        first = b""
        while len(first) < 64:   # it streams: text arrives long before the generation ends
            first += p.stdout.read(64 - len(first))
        assert p.poll() is None
        with Client(str(d.run / "cllmd.sock")) as c:
            assert c.request("status")["serving"]["running"] == 1
            p.send_signal(signal.SIGINT)
            rest, err = p.communicate(timeout=60)
            assert p.returncode == 130
            assert "stop: cancelled]" in err.decode()
            generated = int(err.decode().split(" generated")[0].rsplit(" ", 1)[1])
            assert 64 <= generated < 65536
            assert len(first + rest) == generated   # one byte per token, nothing lost or extra
            wait_for(lambda: c.request("status")["serving"]["running"] == 0, 30, "the daemon to stop generating")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ---- the queue, training, the model ---------------------------------------------------------------


def test_cli_queue_add_writes_into_incoming_or_sends(d, tmp_path):
    f = tmp_path / "austen.txt"
    f.write_text(TEXT)
    added = as_json(d, "queue", "add", str(f))["added"]
    assert added == [{"file": str(f), "name": "austen.txt", "bytes": len(TEXT), "via": "directory",
                      "path": str(d.state / "queue" / "incoming" / "austen.txt")}]
    g = tmp_path / "more.txt"
    g.write_text(TEXT.replace("wife", "house"))
    sent = as_json(d, "queue", "add", "--via-socket", str(g))["added"]
    assert sent[0]["via"] == "socket" and sent[0]["bytes"] == len(TEXT) + 30
    wait_for(lambda: {"austen.txt", "more.txt"} <= set(d.queue("done")), 30, "both files to be ingested")
    assert (d.state / "queue" / "done" / "austen.txt").read_text() == TEXT
    out = run(d, "queue", "add", str(f)).stdout
    assert out.startswith(f"queued {f} as austen.txt (") and "incoming/austen.txt" in out

    # an empty file or a directory is refused before anything is written
    (tmp_path / "empty.txt").touch()
    r = run(d, "queue", "add", str(tmp_path / "empty.txt"))
    assert r.returncode == 2 and "is empty" in r.stderr
    # a directory stands for the files under it (hidden ones and links left out, empty ones skipped)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text(TEXT.replace("man", "woman"))
    (tree / "sub" / "b.md").write_text(TEXT.replace("man", "cat"))
    (tree / ".hidden.txt").write_text("secret")
    (tree / "nothing.txt").touch()
    os.symlink(f, tree / "link.txt")
    r = run(d, "--json", "queue", "add", str(tree))
    assert r.returncode == 0 and "skipping" in r.stderr and "nothing.txt" in r.stderr
    assert [e["file"] for e in json.loads(r.stdout)["added"]] == [str(tree / "a.txt"), str(tree / "sub" / "b.md")]
    r = run(d, "queue", "add", str(tmp_path / "tree" / "sub" / "none"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    assert "Formats:" in run(d, "queue", "add", "--help").stdout


def test_cli_queue_ls_shows_failures_and_retry(d, tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x00\x01\x02binary" * 10)
    as_json(d, "queue", "add", str(blob))
    wait_for(lambda: "blob.bin" in d.queue("failed"), 30, "the binary file to fail")
    listing = as_json(d, "queue", "ls", "--state", "failed")
    failed = {f["name"]: f for f in listing["files"]}
    assert listing["counts"]["failed"] >= 1 and "binary" in failed["blob.bin"]["reason"]["reason"]
    text = run(d, "queue", "ls").stdout
    assert text.splitlines()[0].startswith("incoming ") and "\nfailed (" in text
    line = next(x for x in text.splitlines() if x.strip().startswith("blob.bin"))
    assert "binary" in line and "attempt" in line
    assert as_json(d, "queue", "retry", "blob.bin")["retried"] == [{"name": "blob.bin"}]
    wait_for(lambda: "blob.bin" in d.queue("failed") and not d.queue("incoming"), 30, "the retried file to fail again")
    assert as_json(d, "queue", "ls", "--limit", "1")["truncated"] is True
    # bounded by default; --all lifts the bound
    for i in range(25):
        write_incoming(d.state / "queue" / "incoming", f"many-{i}.txt", f"file number {i} of many\n".encode() * 5)
    wait_for(lambda: sum(n.startswith("many-") for n in d.queue("done")) == 25, 60, "25 files done")
    assert len(as_json(d, "queue", "ls")["files"]) == 20
    assert "--all for more" in run(d, "queue", "ls").stdout
    assert len(as_json(d, "queue", "ls", "--all")["files"]) >= 26


def test_cli_train_control_and_config(d, tmp_path):
    f = tmp_path / "train.txt"
    f.write_text(TEXT.upper())
    as_json(d, "queue", "add", str(f))
    wait_for(lambda: "train.txt" in d.queue("done"), 30, "the training text")

    cfg = as_json(d, "train", "config")
    assert cfg["lr"] == pytest.approx(1e-3) and "batch_size" in cfg
    assert "lr" in run(d, "train", "config").stdout
    new = as_json(d, "train", "config", "lr=3e-4", "batch-size=8", "threads=1", "auto_train=off")
    assert new["config"]["lr"] == pytest.approx(3e-4) and new["config"]["batch_size"] == 8
    assert new["config"]["threads"] == 1 and new["config"]["auto_train"] is False
    assert run(d, "train", "config", "warmup=5").stdout.startswith("warmup = 5\n(applies at step ")

    started = as_json(d, "train", "start", "--steps", "100000")
    assert started["budget"] > 0 and started["state"] == "running"   # what it leads to, not what was
    wait_for(lambda: as_json(d, "train", "status")["step"] > 2, 60, "training to run")
    assert as_json(d, "train", "pause")["state"] == "paused"
    wait_for(lambda: as_json(d, "train", "status")["state"] == "paused", 30, "pause")
    assert "training  paused" in run(d, "train", "status").stdout
    assert as_json(d, "train", "resume")["state"] == "running"
    wait_for(lambda: as_json(d, "train", "status")["state"] == "running", 30, "resume")
    assert as_json(d, "train", "stop")["state"] == "idle"
    st = wait_for(lambda: (s := as_json(d, "train", "status"))["state"] == "idle" and s, 30, "stop")
    assert st["loss"] > 0 and len(st["spheres"]) == 12
    text = run(d, "train", "status").stdout
    assert "spheres   12:" in text and "loss" in text

    ck = as_json(d, "checkpoint")
    assert Path(ck["path"]).exists() and ck["step"] == st["step"]
    saved = as_json(d, "model", "save")
    assert Path(saved["path"]) == d.model_dir() / "model.cllm" and saved["bytes"] > 0
    assert run(d, "checkpoint").stdout.startswith(f"checkpoint at step {st['step']} written to ")


# ---- the pass-through commands ---------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_cli_crawl_drops_pages_into_the_daemons_queue(d, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html><body><p>A page about kissing spheres.</p>"
                                     "<a href='two.html'>two</a></body></html>")
    (site / "two.html").write_text("<html><body><p>Twelve spheres around a thirteenth.</p></body></html>")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a: _QuietHandler(*a, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
        r = run(d, "--json", "crawl", url, "--depth", "1", "--delay", "0", "--state", str(tmp_path / "crawl.sqlite"))
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["queued"] == 2 and summary["queue"] == str(d.state / "queue" / "incoming")
        wait_for(lambda: len([n for n in d.queue("done") if n.startswith("crawl-")]) == 2, 30, "crawled pages")
    finally:
        server.shutdown()
        server.server_close()


def test_cli_top_once_is_cllm_status(d):
    r = run(d, "top", "--once")
    assert r.returncode == 0 and "node 0" in r.stdout and "queue" in r.stdout
    stats = as_json(d, "top")
    assert len(stats["train"]["spheres"]) == 12


def test_cli_generate_on_a_terminal_puts_the_statistics_on_a_line_of_their_own(d):
    from tests.ptyterm import Pty
    for prompt in ("ab", "a\n"):
        t = Pty(cllm("--socket", str(d.run / "cllmd.sock"), "generate", prompt, "--max-tokens", "12",
                     "--temperature", "1", "--seed", "3"))
        try:
            assert t.wait() == 0
            out = t.text()
        finally:
            t.close()
        stats = re.search(r"\[\d+ prompt tokens, \d+ generated", out)
        assert stats and stats.start() > 0 and out[stats.start() - 1] == "\n", repr(out)


def test_cli_python_dash_m_cllm_is_the_cllm_command():
    r = subprocess.run([sys.executable, "-m", "cllm", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: cllm ")


def test_cli_package_docstrings_say_where_each_package_lives():
    import cllm
    import cllmd
    import cllmd.kernels
    assert "client/" in cllm.__doc__ and "kernels/" in cllmd.__doc__ and "client/" in cllmd.__doc__
    assert cllmd.kernels.__doc__.startswith("cllmd.kernels (the directory kernels/)")


def test_cli_queue_show_prints_what_a_file_becomes(d, tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<html><body><nav>Home | Blog</nav><main><h1>Title</h1><p>The body.</p></main></body></html>")
    as_json(d, "queue", "add", str(page))
    wait_for(lambda: "page.html" in d.queue("done"), 30, "the page to be ingested")
    r = run(d, "queue", "show", "page.html")
    assert r.returncode == 0 and r.stdout == "Title\n\nThe body.\n" and "html" in r.stderr
    shown = as_json(d, "queue", "show", "page.html", "--max-chars", "3")
    assert shown["state"] == "done" and shown["text"] == "Tit" and shown["truncated"] is True
    blob = tmp_path / "blob2.bin"
    blob.write_bytes(b"%PDF-1.7 not text")
    as_json(d, "queue", "add", str(blob))
    wait_for(lambda: "blob2.bin" in d.queue("failed"), 30, "the PDF to fail")
    r = run(d, "queue", "show", "blob2.bin")
    assert r.returncode == 1 and "would be refused: binary data: a PDF document" in r.stderr
    r = run(d, "queue", "show", "nothing-here.txt")
    assert r.returncode == 1 and "not_found" in r.stderr
