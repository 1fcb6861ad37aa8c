"""Tests of the crawler (cllm.crawl) against the fixture site in tests/fixtures/site, served on
127.0.0.1 and 127.0.0.2 by http.server threads that log every request. Nothing here reaches
an address outside 127.0.0.0/8."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from cllm import crawl
from cllm.crawl import CrawlConfig, Crawler, CrawlState, RobotsRules, extract_links, main, normalize_url

SITE = Path(__file__).parent / "fixtures" / "site"
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


# --------------------------------------------------------------------------------------------
# The fixture servers
# --------------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """Static files from SITE with {{A}}/{{B}}/{{DELAY}} filled in, plus dynamic routes:
    /redirect/1 -> 2 -> 3 -> /chain-end.html, /loop/N -> /loop/N+1 forever, /redirect/away (to
    host B), /redirect/private (into /private/), /big.html (200 KB), /error500.html (always
    500), /flaky.html (500 once, then a page), /slow.html (waits while the site blocks it),
    /mislabeled.txt (binary bytes sent as text/plain)."""

    server: "_Server"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        site = self.server.site
        path = self.path.split("?", 1)[0]
        with site.lock:
            site.log.append((time.monotonic(), self.path))
            hits = sum(1 for _, p in site.log if p == self.path)
        if path in site.block:
            site.arrived[path].set()
            site.block[path].wait(10)
        m = re.fullmatch(r"/loop/(\d+)", path)
        redirects = {"/redirect/1": (302, "/redirect/2"), "/redirect/2": (301, "3"),
                     "/redirect/3": (307, f"http://{site.a}/chain-end.html"),
                     "/redirect/away": (302, f"http://{site.b}/other.html"),
                     "/redirect/private": (302, "/private/redirected.html")}
        if m:
            return self._send(302, b"", headers={"Location": f"/loop/{int(m.group(1)) + 1}"})
        if path in redirects:
            code, location = redirects[path]
            return self._send(code, b"", headers={"Location": location})
        if path == "/big.html":
            body = (b"<html><body><a href=\"/big-early.html\">early</a><p>" + b"lorem ipsum " * 16_000
                    + b"</p><a href=\"/big-late.html\">late</a></body></html>")
            return self._send(200, body, "text/html")
        if path == "/error500.html" or (path == "/flaky.html" and hits == 1):
            return self._send(500, b"server error", "text/plain")
        if path == "/mislabeled.txt":
            return self._send(200, b"\x00\x01binary\x00" * 8, "text/plain")
        if path in ("/flaky.html", "/slow.html"):
            return self._send(200, f"<html><body><p>{path} served</p></body></html>".encode(), "text/html")
        file = (SITE / path.lstrip("/")).resolve()
        if not file.is_file() or SITE.resolve() not in file.parents:
            return self._send(404, b"not found", "text/plain")
        body = file.read_bytes()
        if path == "/robots.txt" and site.robots is not None:
            body = site.robots.encode()
        types = {".html": "text/html", ".txt": "text/plain", ".png": "image/png"}
        ctype = types.get(file.suffix, "application/octet-stream")
        if ctype.startswith("text/") and b"{{" in body:
            body = (body.replace(b"{{A}}", site.a.encode()).replace(b"{{B}}", site.b.encode())
                    .replace(b"{{DELAY}}", site.delay.encode()))
        self._send(200, body, ctype)

    def _send(self, code: int, body: bytes, ctype: str | None = None, headers: dict | None = None):
        self.send_response(code)
        if ctype:
            self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):  # a client that hung up (killed crawler, cut page)
            self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


class Site:
    """One fixture host: a server thread on an ephemeral port and its request log."""

    def __init__(self, host: str, delay: str = "0"):
        self.server = _Server((host, 0), _Handler)
        self.server.site = self
        self.host = f"{host}:{self.server.server_address[1]}"
        self.a = self.b = self.host
        self.delay = delay
        self.robots: str | None = None  # replaces robots.txt when set
        self.log: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.block: dict[str, threading.Event] = {}
        self.arrived: dict[str, threading.Event] = {}
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str = "/index.html") -> str:
        return f"http://{self.host}{path}"

    def paths(self) -> list[str]:
        with self.lock:
            return [p for _, p in self.log]

    def close(self) -> None:
        for event in self.block.values():
            event.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch):
    # urllib honours proxy variables: the crawl must go straight to 127.0.0.x.
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


def _sites(delay: str = "0") -> tuple[Site, Site]:
    a, b = Site("127.0.0.1", delay), Site("127.0.0.2", delay)
    a.b = b.b = b.host
    b.a = a.a = a.host
    return a, b


@pytest.fixture
def sites():
    a, b = _sites()
    yield a, b
    a.close()
    b.close()


def _run_main(argv: list[str], **kw) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv, **kw)
    return code, out.getvalue(), err.getvalue()


def _paths(tmp: Path) -> list[str]:
    return ["--state", str(tmp / "state.sqlite"), "--queue-dir", str(tmp / "queue")]


def _queued(queue: Path) -> dict[str, tuple[str, bytes]]:
    """{source URL: (file name, content without the provenance line)} of incoming/."""
    out = {}
    for f in sorted((queue / "incoming").iterdir()):
        data = f.read_bytes()
        first, _, rest = data.partition(b"\n")
        m = re.fullmatch(rb"#cllm-source (\S+) (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)", first)
        assert m, f"{f.name} lacks the provenance line: {first!r}"
        url = m.group(1).decode()
        assert url not in out, f"{url} queued twice"
        out[url] = (f.name, rest)
    return out


# --------------------------------------------------------------------------------------------
# Units: URLs, robots.txt, links
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, base, expected", [
    ("HTTP://Example.ORG:80/a/./b/../c?q=1#frag", None, "http://example.org/a/c?q=1"),
    ("https://example.org:443", None, "https://example.org/"),
    ("https://example.org:8443/x", None, "https://example.org:8443/x"),
    ("../up.html", "http://h.org/a/b/page.html", "http://h.org/a/up.html"),
    ("/abs?x=%7e%2f", "http://h.org/a/b", "http://h.org/abs?x=~%2F"),
    ("sub/p q.html", "http://h.org/dir/", "http://h.org/dir/sub/p%20q.html"),
    ("//other.org/x", "https://h.org/", "https://other.org/x"),
    ("http://bücher.example/ä", None, "http://xn--bcher-kva.example/%C3%A4"),
    ("  /x\n", "http://h.org/", "http://h.org/x"),
    ("http://h.org/a?", None, "http://h.org/a"),
    ("#only-fragment", "http://h.org/p", "http://h.org/p"),
    ("mailto:a@b.org", "http://h.org/", None),
    ("ftp://h.org/x", None, None),
    ("http://h.org:notaport/", None, None),
    ("http:///nohost", None, None),
])
def test_normalize_url_canonical_forms(raw, base, expected):
    assert normalize_url(raw, base) == expected


def test_robots_rules_longest_match_wildcards_and_agent_groups():
    text = """
# comment
User-agent: otherbot
Disallow: /

User-agent: *
Disallow: /private/
Allow: /private/open/
Disallow: /*.pdf$
Disallow: /tmp
Allow: /tmp
Crawl-delay: 0.25
"""
    r = RobotsRules.parse(text, "cllm-crawler/0.1.0")
    assert r.crawl_delay == 0.25  # fractional, which urllib.robotparser drops
    allowed = lambda path: r.allowed("http://h.org" + path)  # noqa: E731
    assert not allowed("/private/x.html")
    assert allowed("/private/open/x.html")  # longer Allow beats shorter Disallow
    assert not allowed("/docs/a.pdf")
    assert allowed("/docs/a.pdf?download=1")  # '$' anchors the end
    assert allowed("/tmp/x")  # equal length: Allow wins
    assert allowed("/robots.txt")
    assert allowed("/public.html")
    # A group naming the product token replaces the '*' group entirely.
    own = RobotsRules.parse(text + "\nUser-agent: CLLM-Crawler\nDisallow: /only-for-us\n", "cllm-crawler/0.1.0")
    assert not own.allowed("http://h.org/only-for-us") and own.allowed("http://h.org/private/x")
    assert own.crawl_delay is None
    assert RobotsRules.parse("User-agent: otherbot\nDisallow: /\n", "cllm-crawler").allowed("http://h.org/x")


def test_extract_links_resolves_against_base_and_reads_meta_robots():
    page = """<html><head><base href="/b/"><meta name="ROBOTS" content="NoIndex, nofollow"></head>
    <body><a href="x.html">x</a><a href="/abs">a</a><a href="x.html#f">dup</a><area href="../up">
    <a href="mailto:m@h.org">m</a><a>no href</a><a href="http://other.org/">o</a></body></html>"""
    links = extract_links(page, "http://h.org/dir/page.html")
    assert links.links == ["http://h.org/b/x.html", "http://h.org/abs", "http://h.org/up", "http://other.org/"]
    assert links.noindex and links.nofollow


# --------------------------------------------------------------------------------------------
# The full crawl of the fixture site (one crawl, several checks)
# --------------------------------------------------------------------------------------------

CRAWL_DELAY = 0.2
RETRIES = 2
EXPECTED_A = Counter({
    "/robots.txt": 1, "/index.html": 1,
    # depth 1
    "/page1.html": 1, "/dir/page2.html": 1, "/dir/page3.html": 1,
    "/redirect/1": 1, "/redirect/2": 1, "/redirect/3": 1, "/chain-end.html": 1,
    **{f"/loop/{i}": 1 for i in range(1, 7)},  # the first request and five redirects, then give up
    "/redirect/away": 1, "/redirect/private": 1, "/big.html": 1, "/image.png": 1, "/missing.html": 1,
    "/error500.html": 1 + RETRIES, "/notes.txt": 1, "/noindex.html": 1, "/nofollow.html": 1,
    # depth 2
    "/dup-a.html": 1, "/dup-b.html": 1, "/latin1.html": 1, "/based/target.html": 1,
    "/dir/deep/level2.html": 1, "/big-early.html": 1, "/from-noindex.html": 1,
})
EXPECTED_QUEUED = {"/index.html", "/page1.html", "/dir/page2.html", "/dir/page3.html", "/chain-end.html",
                   "/big.html", "/notes.txt", "/nofollow.html", "/dup-a.html", "/latin1.html",
                   "/based/target.html", "/dir/deep/level2.html", "/big-early.html", "/from-noindex.html"}


@pytest.fixture(scope="module")
def full_crawl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    a, b = _sites(delay=str(CRAWL_DELAY))
    try:
        with pytest.MonkeyPatch.context() as mp:
            for var in PROXY_VARS:
                mp.delenv(var, raising=False)
            mp.setenv("no_proxy", "*")
            code, out, err = _run_main([a.url(), *_paths(tmp), "--delay", "0", "--retries", str(RETRIES),
                                        "--backoff", "0.05", "--max-bytes", "64KiB", "--timeout", "5",
                                        "--deny", "/denied/", "--json"])
    finally:
        a.close()
        b.close()
    return {"code": code, "summary": json.loads(out), "err": err, "a": a, "b": b, "queue": tmp / "queue",
            "state": tmp / "state.sqlite"}


def test_crawl_fetches_exactly_the_in_scope_pages(full_crawl):
    assert full_crawl["code"] == 0, full_crawl["err"]
    assert Counter(full_crawl["a"].paths()) == EXPECTED_A
    # The other host is linked and redirected to, but out of scope: not even its robots.txt.
    assert full_crawl["b"].paths() == []


def test_crawl_obeys_robots_disallow_and_crawl_delay(full_crawl):
    paths = full_crawl["a"].paths()
    assert not any(p.startswith("/private/") for p in paths)
    assert paths[0] == "/robots.txt" and paths.count("/robots.txt") == 1
    # A behaviour check, not a speed check: the server saw every request to the host at least
    # Crawl-delay after the previous one (the crawler's own --delay was 0).
    times = [t for t, _ in full_crawl["a"].log]
    gaps = [t2 - t1 for t1, t2 in zip(times, times[1:])]
    assert min(gaps) >= CRAWL_DELAY, f"requests {min(gaps):.3f} s apart"


def test_crawl_queues_each_text_once_with_provenance(full_crawl):
    a = full_crawl["a"]
    queued = _queued(full_crawl["queue"])
    assert set(queued) == {a.url(p) for p in EXPECTED_QUEUED}
    assert not [f for f in (full_crawl["queue"] / "incoming").iterdir() if f.name.startswith(".")]
    for url, (name, body) in queued.items():
        assert re.fullmatch(r"crawl-[0-9a-f]{16}\.(html|txt)", name)
        assert name.endswith(".txt") == url.endswith(".txt")
        assert body == body.decode("utf-8").encode("utf-8")
    assert queued[a.url("/notes.txt")][1] == (SITE / "notes.txt").read_bytes()
    assert queued[a.url("/index.html")][1].startswith(b"<!DOCTYPE html>")
    # The Latin-1 page (declared by <meta charset>) is queued as UTF-8.
    assert "Un café crème" in queued[a.url("/latin1.html")][1].decode("utf-8")


def test_crawl_cuts_oversized_page_and_follows_only_kept_links(full_crawl):
    a = full_crawl["a"]
    name, body = _queued(full_crawl["queue"])[a.url("/big.html")]
    assert len(body) == 64 * 1024
    assert "/big-early.html" in a.paths() and "/big-late.html" not in a.paths()
    assert full_crawl["summary"]["truncated"] == 1


def test_crawl_json_summary_counts_every_outcome(full_crawl):
    s = full_crawl["summary"]
    a = full_crawl["a"]
    assert s["stopped"] == "finished"
    assert s["fetched"] == 16 and s["queued"] == len(EXPECTED_QUEUED) and s["pending"] == 0
    assert s["skipped"] == {"content-type": 1, "denied": 1, "duplicate": 1, "noindex": 1, "off-scope": 1,
                            "robots": 2}
    assert s["redirects"] == 10
    assert s["requests"] == sum(EXPECTED_A.values())
    failures = {f["url"]: f for f in s["failures"]}
    assert set(failures) == {a.url("/missing.html"), a.url("/error500.html"), a.url("/loop/6")}
    assert s["failed"] == 3
    assert failures[a.url("/missing.html")]["reason"] == "http 404"
    assert failures[a.url("/error500.html")]["reason"] == f"http 500 (after {RETRIES + 1} attempts)"
    assert failures[a.url("/error500.html")]["attempts"] == RETRIES + 1
    assert failures[a.url("/loop/6")]["reason"].startswith("too many redirects")
    assert s["seeds"] == [a.url()] and s["state"] == str(full_crawl["state"])


def test_crawl_new_crawl_does_not_requeue_known_content(sites, tmp_path):
    # A finished crawl, then a new one with the same state file: the page is fetched again
    # (a new crawl), but its content is known, so it is not queued twice.
    a, _ = sites
    argv = [a.url("/page1.html"), *_paths(tmp_path), "--delay", "0", "--depth", "0", "--json"]
    code, out, err = _run_main(argv)
    assert code == 0 and json.loads(out)["queued"] == 1, err
    code, out, err = _run_main(argv)
    assert code == 0, err
    assert json.loads(out)["queued"] == 0 and json.loads(out)["skipped"] == {"duplicate": 1}
    assert a.paths() == ["/robots.txt", "/page1.html", "/page1.html"]  # robots.txt cached in the state
    assert len(list((tmp_path / "queue" / "incoming").iterdir())) == 1


# --------------------------------------------------------------------------------------------
# Limits, scope, retries, queue hand-over
# --------------------------------------------------------------------------------------------


def _crawl(site: Site, tmp_path: Path, *extra: str, **kw) -> tuple[int, dict, str]:
    code, out, err = _run_main([site.url(), *_paths(tmp_path), "--delay", "0", "--retries", "0",
                                "--timeout", "5", "--json", *extra], **kw)
    return code, (json.loads(out) if out else {}), err


def test_crawl_depth_limit(sites, tmp_path):
    a, _ = sites
    code, s, err = _crawl(a, tmp_path / "d0", "--depth", "0")
    assert code == 0, err
    assert a.paths() == ["/robots.txt", "/index.html"]
    a.log.clear()
    code, s, err = _crawl(a, tmp_path / "d1", "--depth", "1")
    assert code == 0, err
    depth2 = {"/dup-a.html", "/latin1.html", "/based/target.html", "/dir/deep/level2.html", "/big-early.html"}
    assert "/page1.html" in a.paths() and not depth2 & set(a.paths())


def test_crawl_max_pages_limit(sites, tmp_path):
    a, _ = sites
    code, s, err = _crawl(a, tmp_path, "--max-pages", "3")
    assert code == 0, err
    # Breadth-first, in document order.
    assert a.paths() == ["/robots.txt", "/index.html", "/page1.html", "/dir/page2.html"]
    assert s["stopped"] == "max-pages" and s["pages"] == 3 and s["pending"] > 0
    # --resume with a higher limit carries on from the frontier, fetching nothing again.
    code, s, err = _crawl(a, tmp_path, "--resume", "--max-pages", "5")
    assert code == 0, err
    assert a.paths()[4:] == ["/dir/page3.html", "/redirect/1", "/redirect/2", "/redirect/3", "/chain-end.html"]
    assert s["pages"] == 5


def test_crawl_allow_domain_reaches_other_host(sites, tmp_path):
    a, b = sites
    code, s, err = _crawl(a, tmp_path, "--depth", "1", "--allow-domain", "127.0.0.2")
    assert code == 0, err
    assert b.paths() == ["/robots.txt", "/other.html"]
    assert {a.url("/index.html"), b.url("/other.html")} <= set(_queued(tmp_path / "queue"))


def test_crawl_seed_redirect_brings_target_host_into_scope(sites, tmp_path):
    # Like http://example.org -> https://www.example.org: the seed's redirect target is crawled.
    a, b = sites
    code, out, err = _run_main([a.url("/redirect/away"), *_paths(tmp_path), "--delay", "0", "--depth", "0",
                                "--json"])
    assert code == 0, err
    assert a.paths() == ["/robots.txt", "/redirect/away"] and b.paths() == ["/robots.txt", "/other.html"]
    assert set(_queued(tmp_path / "queue")) == {b.url("/other.html")}
    assert json.loads(out)["seeds"] == [a.url("/redirect/away"), b.url("/other.html")]


def test_crawl_max_pages_lets_a_counted_page_finish_its_retries(sites, tmp_path):
    a, _ = sites
    code, out, err = _run_main([a.url("/page1.html"), a.url("/flaky.html"), a.url("/notes.txt"), "--depth", "0",
                                "--max-pages", "2", *_paths(tmp_path), "--delay", "0", "--retries", "1",
                                "--backoff", "0.05", "--json"])
    assert code == 0, err
    assert a.paths() == ["/robots.txt", "/page1.html", "/flaky.html", "/flaky.html"]
    s = json.loads(out)
    assert s["stopped"] == "max-pages" and s["queued"] == 2 and s["pending"] == 1


def test_crawl_retries_with_backoff_without_blocking_others(sites, tmp_path):
    a, _ = sites
    code, out, err = _run_main([a.url("/flaky.html"), a.url("/page1.html"), a.url("/notes.txt"), "--depth", "0",
                                *_paths(tmp_path), "--delay", "0", "--retries", "2", "--backoff", "0.3",
                                "--json"])
    assert code == 0, err
    # /flaky.html failed once with 500; while it waited for its retry the others went ahead.
    assert a.paths() == ["/robots.txt", "/flaky.html", "/page1.html", "/notes.txt", "/flaky.html"]
    summary = json.loads(out)
    assert summary["failed"] == 0 and summary["queued"] == 3


def test_crawl_robots_unreachable_means_nothing_fetched(sites, tmp_path, monkeypatch):
    a, _ = sites
    monkeypatch.setattr(_Handler, "do_GET", _robots_503(_Handler.do_GET))
    code, s, err = _crawl(a, tmp_path, "--retries", "1", "--backoff", "0.01")
    assert code == 1  # nothing could be fetched
    assert a.paths() == ["/robots.txt", "/robots.txt"]
    assert s["failures"] == [{"url": a.url(), "reason": "robots.txt unreachable: http 503 (after 2 attempts)",
                              "attempts": 2, "status": None}]


def _robots_503(original):
    def do_get(self):
        if self.path == "/robots.txt":
            with self.server.site.lock:
                self.server.site.log.append((time.monotonic(), self.path))
            return self._send(503, b"busy", "text/plain")
        return original(self)
    return do_get


def test_crawl_sends_pages_when_queue_dir_not_writable(sites, tmp_path):
    a, _ = sites
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the queue's parent should be")  # unwritable even for root
    sent: dict[str, bytes] = {}

    def send(name: str, data: bytes) -> str:
        sent[name] = data
        return f"incoming/{name}"

    config = CrawlConfig(seeds=[a.url()], depth=0, delay=0.0, retries=0)
    state = CrawlState(tmp_path / "state.sqlite")
    try:
        crawler = Crawler(config, state, blocker / "queue", send=send)
        state.start(config.to_dict())
        crawler.seed()
        assert crawler.run() == "finished"
        assert crawler.queue.where == "daemon queue.add"
    finally:
        state.close()
    [(name, data)] = sent.items()
    assert re.fullmatch(r"crawl-[0-9a-f]{16}\.html", name)
    assert data.startswith(f"#cllm-source {a.url()} ".encode())
    # Without a send callable the same situation is a clear usage error.
    code, out, err = _run_main([a.url(), "--state", str(tmp_path / "s2.sqlite"),
                                "--queue-dir", str(blocker / "queue")])
    assert code == 2 and "not writable" in err and err.count("\n") == 1
    # main() passes send through to the crawler.
    sent.clear()
    code, out, err = _run_main([a.url(), "--state", str(tmp_path / "s3.sqlite"),
                                "--queue-dir", str(blocker / "queue"), "--depth", "0", "--delay", "0",
                                "--quiet"], send=send)
    assert code == 0 and len(sent) == 1 and out == ""


class _StopDuringWait(threading.Event):
    """A stop event that is set by the first wait on it: 'Ctrl-C during a politeness delay'."""

    def wait(self, timeout=None):
        self.set()
        return True


def test_crawl_skips_binary_served_as_text(sites, tmp_path):
    a, _ = sites
    code, out, err = _run_main([a.url("/mislabeled.txt"), *_paths(tmp_path), "--delay", "0", "--json"])
    assert code == 1  # nothing usable was fetched
    assert json.loads(out)["skipped"] == {"binary": 1}
    assert list((tmp_path / "queue" / "incoming").iterdir()) == []


def test_crawl_creates_missing_queue_dirs_with_daemon_modes(sites, tmp_path):
    a, _ = sites
    root = tmp_path / "state" / "cllmd" / "queue"
    code, out, err = _crawl(a, tmp_path, "--depth", "0", "--queue-dir", str(root))
    assert code == 0, err
    modes = {p: p.stat().st_mode & 0o777 for p in (root / "incoming", root, root.parent, root.parent.parent)}
    assert list(modes.values()) == [0o750, 0o750, 0o700, 0o700]


def test_crawl_stop_during_delay_makes_no_new_request(sites, tmp_path):
    a, _ = sites
    config = CrawlConfig(seeds=[a.url()], depth=0, delay=0.5, retries=0)
    state = CrawlState(tmp_path / "state.sqlite")
    try:
        crawler = Crawler(config, state, tmp_path / "queue", stop=_StopDuringWait())
        state.start(config.to_dict())
        crawler.seed()
        assert crawler.run() == "interrupted"
        assert a.paths() == ["/robots.txt"]  # the page waited for the delay, then was not requested
        assert state.db.execute("SELECT state, attempts FROM urls").fetchall() == [("queued", 0)]
        assert state.status() == "running"
    finally:
        state.close()


def test_crawl_page_already_in_queue_not_written_again(sites, tmp_path):
    # The situation after a kill between writing a page and recording it: a fresh state, but
    # the file is in the queue (here: already moved to done/ by the daemon).
    a, _ = sites
    code, s, err = _crawl(a, tmp_path / "first", "--depth", "0")
    [name] = [p.name for p in (tmp_path / "first" / "queue" / "incoming").iterdir()]
    done = tmp_path / "second" / "queue" / "done"
    done.mkdir(parents=True)
    (done / name).write_bytes(b"processed")
    code, s, err = _crawl(a, tmp_path / "second", "--depth", "0")
    assert code == 0, err
    assert list((tmp_path / "second" / "queue" / "incoming").iterdir()) == []


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    ([], "no URL to crawl"),
    (["ftp://h.org/"], "not an http(s) URL"),
    (["example.org"], "did you mean https://example.org"),
    (["http://h.org/", "--depth", "-1"], "--depth must be"),
    (["http://h.org/", "--max-pages", "0"], "--max-pages must be"),
    (["http://h.org/", "--deny", "a(b"], "bad --deny pattern"),
    (["http://h.org/", "--delay", "nan"], "--delay must be"),
    (["http://h.org/", "--timeout", "0"], "--timeout must be"),
    (["http://h.org/", "--max-bytes", "lots"], "not a size"),
    (["http://h.org/", "--allow-domain", "bad/domain"], "bad --allow-domain"),
    (["http://h.org/", "--bogus"], "unrecognized arguments"),
    (["http://h.org/", "--resume", "--restart"], "not allowed with"),
])
def test_main_bad_arguments_exit_2_with_one_line(argv, message, tmp_path):
    code, out, err = _run_main(argv + ["--state", str(tmp_path / "s.sqlite"),
                                       "--queue-dir", str(tmp_path / "q")])
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("cllm crawl: ")
    assert not (tmp_path / "q").exists()


def test_main_nothing_fetched_exits_1(sites, tmp_path):
    a, _ = sites
    code, s, err = _run_main([a.url("/missing.html"), "--state", str(tmp_path / "s.sqlite"), "--queue-dir",
                              str(tmp_path / "q"), "--delay", "0", "--quiet"])
    assert code == 1 and s == ""


def test_main_unfinished_state_needs_resume_or_restart(sites, tmp_path):
    a, _ = sites
    state = CrawlState(tmp_path / "s.sqlite")
    state.start(CrawlConfig(seeds=[a.url()]).to_dict())
    with state.tx() as db:
        state.add(db, a.url(), 0)
    with pytest.raises(crawl.StateError, match="in use by another crawl"):
        CrawlState(tmp_path / "s.sqlite")
    state.close()
    args = ["--state", str(tmp_path / "s.sqlite"), "--queue-dir", str(tmp_path / "q"), "--delay", "0",
            "--depth", "0"]
    code, out, err = _run_main([a.url("/page1.html"), *args])
    assert code == 2 and "--resume" in err and "--restart" in err and a.paths() == []
    code, out, err = _run_main(["--resume", "--json", *args])
    assert code == 0 and json.loads(out)["fetched"] == 1 and a.paths() == ["/robots.txt", "/index.html"]
    code, out, err = _run_main(["--resume", "--state", str(tmp_path / "none.sqlite")])
    assert code == 2 and "nothing to resume" in err


# --------------------------------------------------------------------------------------------
# Interruptions: SIGKILL and SIGINT of a real crawler process
# --------------------------------------------------------------------------------------------

KILL_DELAY = 0.2


def _spawn(site: Site, tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env["no_proxy"] = "*"
    argv = [sys.executable, "-m", "cllm.crawl", site.url(), *_paths(tmp_path), "--delay", "0", "--retries", "0",
            "--timeout", "5", "--deny", "/(loop|redirect)/", "--depth", "1", "--verbose", *extra]
    return subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def _wait_for_lines(proc: subprocess.Popen, prefix: str, n: int) -> list[str]:
    """Read the crawler's --verbose log until n lines start with prefix (each is logged only
    after its outcome was committed, so the crawler is then between requests)."""
    timer = threading.Timer(20, proc.kill)  # a hung crawler fails the test instead of hanging it
    timer.start()
    seen = []
    try:
        while len([l for l in seen if l.startswith(prefix)]) < n:
            line = proc.stderr.readline()
            assert line, f"crawler ended early: {seen}"
            seen.append(line)
    finally:
        timer.cancel()
    return seen


def _resume(site: Site, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env["no_proxy"] = "*"
    done = subprocess.run([sys.executable, "-m", "cllm.crawl", "--resume", "--json", "--state",
                           str(tmp_path / "state.sqlite"), "--queue-dir", str(tmp_path / "queue")],
                          capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_crawl_killed_halfway_resumes_without_fetching_twice(tmp_path):
    a, b = _sites(delay=str(KILL_DELAY))
    try:
        proc = _spawn(a, tmp_path)
        _wait_for_lines(proc, "queued", 3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = a.paths()
        summary = _resume(a, tmp_path)
    finally:
        a.close()
        b.close()
    counts = Counter(a.paths())
    assert [p for p, n in counts.items() if n > 1] == []  # robots.txt included: it is in the state
    assert len(before) < len(a.paths())
    assert summary["stopped"] == "finished" and summary["pending"] == 0
    queued = _queued(tmp_path / "queue")
    assert len(queued) == summary["queued"] == 8
    assert b.paths() == []


def test_crawl_killed_mid_request_retries_only_that_url(tmp_path):
    a, b = _sites(delay="0")
    a.block = {"/slow.html": threading.Event()}
    a.arrived = {"/slow.html": threading.Event()}
    a.robots = "User-agent: *\nDisallow:\n"
    try:
        env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
        env["no_proxy"] = "*"
        proc = subprocess.Popen([sys.executable, "-m", "cllm.crawl", a.url("/page1.html"), a.url("/slow.html"),
                                 a.url("/notes.txt"), "--depth", "0", *_paths(tmp_path), "--delay", "0",
                                 "--timeout", "5"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        assert a.arrived["/slow.html"].wait(20)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        a.block.pop("/slow.html").set()
        summary = _resume(a, tmp_path)
    finally:
        a.close()
        b.close()
    # The request cut by the kill is the only one made twice: it never completed.
    assert Counter(a.paths()) == {"/robots.txt": 1, "/page1.html": 1, "/slow.html": 2, "/notes.txt": 1}
    assert summary["queued"] == 3 and summary["failed"] == 0
    assert len(_queued(tmp_path / "queue")) == 3


def test_crawl_sigint_stops_after_current_page_and_resumes(tmp_path):
    a, b = _sites(delay=str(KILL_DELAY))
    try:
        proc = _spawn(a, tmp_path, "--json")
        _wait_for_lines(proc, "queued", 2)
        requested = len(a.paths())
        proc.send_signal(signal.SIGINT)  # while it waits out the crawl delay
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 130, err
        assert len(a.paths()) == requested  # no new request once asked to stop
        first = json.loads(out)
        assert first["stopped"] == "interrupted" and first["pending"] > 0
        with sqlite3.connect(tmp_path / "state.sqlite") as db:  # nothing left in flight
            assert db.execute("SELECT COUNT(*) FROM urls WHERE state='fetching'").fetchone()[0] == 0
        summary = _resume(a, tmp_path)
    finally:
        a.close()
        b.close()
    assert [p for p, n in Counter(a.paths()).items() if n > 1] == []
    assert summary["stopped"] == "finished" and len(_queued(tmp_path / "queue")) == 8
