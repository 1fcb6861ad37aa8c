"""The crawler behind ``cllm crawl``: a polite, resumable breadth-first web crawl whose pages are
dropped atomically into cllmd's training queue (``<queue>/incoming/``). Standard library only;
the daemon itself never opens a network connection."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import html.parser
import http.client
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import string
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

from . import __version__
from . import layout

# Named explicitly so `python -m cllm.crawl` logs under the same name as the imported module.
log = logging.getLogger("cllm.crawl")

DEFAULT_USER_AGENT = f"cllm-crawler/{__version__}"
DEFAULT_MAX_BYTES = 5 * 1024 * 1024
MAX_REDIRECTS = 5
# RFC 9309 2.5: a crawler must parse at least 500 KiB of robots.txt; 2.4: cache at most 24 h.
ROBOTS_MAX_BYTES = 500 * 1024
ROBOTS_MAX_AGE = 24 * 3600.0
MAX_LINKS_PER_PAGE = 10_000
MAX_RETRY_AFTER = 3600.0
# Only these media types are taken; the value is the extension the queue file gets, which
# chooses the daemon's preprocessing (.html: text extraction; .txt: plain text).
TAKEN_TYPES = {"text/html": ".html", "text/plain": ".txt"}
SCHEMA_VERSION = 1

Send = Callable[[str, bytes], str]


# --------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------

DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_STRAY_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PATH_SAFE = "/:@!$&'()*+,;="
_QUERY_SAFE = "/?:@!$&'()*+,;="


def _normalize_escapes(part: str, safe: str) -> str:
    """RFC 3986 6.2.2 on one component: decode escaped unreserved characters, upper-case the
    remaining escapes, and percent-encode what may not appear raw (spaces, non-ASCII as UTF-8)."""
    part = _STRAY_PCT.sub("%25", part)

    def fix(m: re.Match) -> str:
        c = chr(int(m.group(1), 16))
        return c if c in _UNRESERVED else "%" + m.group(1).upper()

    return urllib.parse.quote(_PCT.sub(fix, part), safe=safe + "%")


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path: '/a/./b/../c' -> '/a/c'."""
    segments = path.split("/")
    out: list[str] = []
    for seg in segments[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    if segments[-1] in (".", ".."):
        out.append("")  # '/a/b/..' names the directory '/a/'
    return "/" + "/".join(out)


def normalize_url(url: str, base: str | None = None) -> str | None:
    """The canonical form of an http(s) URL, resolved against `base` when given; None when it is
    not a crawlable http(s) URL. Lower-cases scheme and host, drops the default port and the
    fragment, removes dot segments and normalizes percent-escapes; the query is kept as is
    (apart from escapes) because reordering it can change what a server returns."""
    url = re.sub(r"[\t\n\r]", "", url).strip()  # WHATWG: tabs/newlines inside hrefs are ignored
    try:
        if base is not None:
            url = urllib.parse.urljoin(base, url)
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname  # already lower-cased, IPv6 brackets stripped
    if scheme not in DEFAULT_PORTS or not host:
        return None
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    host = host.rstrip(".")
    if not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    if "@" in parts.netloc:
        netloc = parts.netloc.rpartition("@")[0] + "@" + netloc
    path = _remove_dot_segments(_normalize_escapes(parts.path or "/", _PATH_SAFE))
    if not path.startswith("/"):
        path = "/" + path
    query = _normalize_escapes(parts.query, _QUERY_SAFE)
    return urllib.parse.urlunsplit((scheme, netloc, path, query, ""))


def origin_of(url: str) -> str:
    """'scheme://host[:port]' of a normalized URL: the unit of robots.txt and of politeness."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


class Scope:
    """Which URLs a crawl may fetch: the seeds' hosts, plus --allow-domain domains (each with its
    subdomains), minus anything a --deny regular expression finds in the URL."""

    def __init__(self, seeds: list[str], allow_domains: list[str] = (), deny: list[str] = ()):
        self.hosts = {urllib.parse.urlsplit(s).hostname for s in seeds}
        self.domains = [d.lower().strip(".") for d in allow_domains]
        self.deny = [re.compile(p) for p in deny]

    def check(self, url: str) -> str | None:
        """None when `url` is in scope, else the skip reason ('off-scope' or 'denied')."""
        host = urllib.parse.urlsplit(url).hostname or ""
        if host not in self.hosts and not any(host == d or host.endswith("." + d) for d in self.domains):
            return "off-scope"
        if any(p.search(url) for p in self.deny):
            return "denied"
        return None


# --------------------------------------------------------------------------------------------
# robots.txt (RFC 9309)
# --------------------------------------------------------------------------------------------


class RobotsRules:
    """A parsed robots.txt for one user agent, per RFC 9309: the groups naming our product token
    (else the '*' groups) merged; '*' and '$' in patterns; the longest matching rule wins and
    Allow wins a tie; Crawl-delay may be fractional. urllib.robotparser is not used because it
    matches the first rule instead of the longest, ignores '*' and '$', and only takes
    integer Crawl-delay values."""

    def __init__(self, rules: list[tuple[bool, re.Pattern, int]] = (), crawl_delay: float | None = None):
        self.rules = list(rules)
        self.crawl_delay = crawl_delay

    @classmethod
    def allowing_all(cls) -> RobotsRules:
        return cls()

    @classmethod
    def parse(cls, text: str, user_agent: str) -> RobotsRules:
        token = user_agent.split("/", 1)[0].strip().lower()
        groups: list[tuple[set[str], list[tuple[bool, str]], list[float]]] = []
        current = None
        collecting_agents = False
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            key, sep, value = line.partition(":")
            if not sep:
                continue
            key, value = key.strip().lower(), value.strip()
            if key == "user-agent":
                if current is None or not collecting_agents:
                    current = (set(), [], [])
                    groups.append(current)
                current[0].add(value.lower())
                collecting_agents = True
            elif key in ("allow", "disallow") and current is not None:
                collecting_agents = False
                if value:  # an empty Disallow allows everything: no rule
                    current[1].append((key == "allow", value))
            elif key == "crawl-delay" and current is not None:
                collecting_agents = False
                try:
                    delay = float(value)
                except ValueError:
                    continue
                if math.isfinite(delay) and delay >= 0:
                    current[2].append(delay)

        def names_us(agent: str) -> bool:
            return agent == token or agent.split("/", 1)[0].strip() == token

        chosen = [g for g in groups if any(names_us(a) for a in g[0])] or [g for g in groups if "*" in g[0]]
        rules = [(allow, cls._compile(pat), len(pat)) for g in chosen for allow, pat in g[1]]
        delays = [d for g in chosen for d in g[2]]
        return cls(rules, max(delays) if delays else None)

    @staticmethod
    def _compile(pattern: str) -> re.Pattern:
        # Escapes normalized like normalize_url's, so a pattern compares with normalized paths.
        pattern = _normalize_escapes(pattern, _QUERY_SAFE)
        anchored = pattern.endswith("$")
        if anchored:
            pattern = pattern[:-1]
        body = ".*".join(re.escape(piece) for piece in pattern.split("*"))
        return re.compile(body + ("$" if anchored else ""), re.DOTALL)

    def allowed(self, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        if target == "/robots.txt":
            return True
        best: tuple[int, bool] | None = None  # (pattern length, allow)
        for allow, rx, length in self.rules:
            if rx.match(target) and (best is None or length > best[0] or (length == best[0] and allow)):
                best = (length, allow)
        return best is None or best[1]


# --------------------------------------------------------------------------------------------
# HTML: links, <base>, meta robots, charset
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PageLinks:
    links: list[str]  # normalized, in document order, without duplicates
    noindex: bool = False
    nofollow: bool = False


class _LinkParser(html.parser.HTMLParser):
    def __init__(self, agent_token: str):
        super().__init__(convert_charrefs=True)
        self.agent_token = agent_token
        self.base: str | None = None
        self.hrefs: list[str] = []
        self.noindex = False
        self.nofollow = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v for k, v in attrs if v is not None}
        if tag == "base" and self.base is None and a.get("href"):
            self.base = a["href"]  # HTML: only the first <base href> counts, for the whole page
        elif tag in ("a", "area") and a.get("href") and len(self.hrefs) < MAX_LINKS_PER_PAGE:
            self.hrefs.append(a["href"])
        elif tag == "meta" and a.get("name", "").strip().lower() in ("robots", self.agent_token):
            words = {w.strip().lower() for w in a.get("content", "").split(",")}
            self.noindex |= bool(words & {"noindex", "none"})
            self.nofollow |= bool(words & {"nofollow", "none"})


def extract_links(text: str, page_url: str, user_agent: str = DEFAULT_USER_AGENT) -> PageLinks:
    """The http(s) links of an HTML page, resolved against its <base href> (itself resolved
    against the page URL) or the page URL, plus its meta robots noindex/nofollow."""
    parser = _LinkParser(user_agent.split("/", 1)[0].strip().lower())
    try:
        parser.feed(text)
        parser.close()
    except Exception as e:  # html.parser is lenient; a page it still chokes on keeps what was read
        log.warning("HTML of %s only partly parsed: %s", page_url, e)
    base = page_url
    if parser.base is not None:
        base = normalize_url(parser.base, page_url) or page_url
    seen: set[str] = set()
    links = []
    for href in parser.hrefs:
        url = normalize_url(href, base)
        if url is not None and url not in seen:
            seen.add(url)
            links.append(url)
    return PageLinks(links, parser.noindex, parser.nofollow)


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)


def _charset(body: bytes, header_charset: str | None, is_html: bool) -> str:
    """HTML's order of precedence: byte-order mark, then the HTTP header, then <meta charset>
    in the first 2 KiB, then UTF-8."""
    boms = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
    for bom, name in boms:
        if body.startswith(bom):
            return name
    candidates = [header_charset]
    if is_html:
        m = _META_CHARSET.search(body[:2048])
        candidates.append(m.group(1).decode("ascii") if m else None)
    for name in candidates:
        if name:
            try:
                return codecs.lookup(name).name
            except LookupError:
                continue
    return "utf-8"


def _decode(body: bytes, charset: str, truncated: bool) -> str:
    # A cut page may end inside a multi-byte character: final=False drops that partial tail.
    decoder = codecs.getincrementaldecoder(charset)(errors="replace")
    return decoder.decode(body, final=not truncated)


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


class _Stopped(Exception):
    """Raised instead of starting a request once a stop was asked for."""


class FetchError(Exception):
    """A request that produced no usable response; `retryable` for transient causes."""

    def __init__(self, reason: str, retryable: bool, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


@dataclasses.dataclass
class Response:
    url: str
    status: int
    headers: http.client.HTTPMessage
    media_type: str  # lower-case 'type/subtype', '' when absent
    charset: str | None
    body: bytes | None  # None when not read (a redirect, an error, a type not taken)
    truncated: bool = False


class _PassThrough(urllib.request.HTTPErrorProcessor):
    """Return every status to the crawler: it decides about redirects (scope, robots, the
    five-hop limit, never twice) and errors itself. Replacing the default error processor also
    keeps urllib's redirect handler from ever running."""

    def http_response(self, request, response):
        return response

    https_response = http_response


def _network_reason(exc: BaseException) -> tuple[str, bool]:
    """(reason, retryable) for an exception raised while connecting or reading."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout", True
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused", True
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"tls: {exc.verify_message or exc}", False
    if isinstance(exc, socket.gaierror):
        return f"name resolution: {exc.strerror or exc}", True
    if isinstance(exc, (ConnectionError, http.client.HTTPException, ssl.SSLError, OSError)):
        return f"network: {type(exc).__name__}: {exc}".rstrip(": "), True
    if isinstance(exc, urllib.error.URLError):
        return f"network: {exc.reason}", True
    return f"{type(exc).__name__}: {exc}", False


def _retry_after(headers: http.client.HTTPMessage) -> float | None:
    value = (headers.get("Retry-After") or "").strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    return None


class Fetcher:
    """One GET without following redirects; the body streamed up to a byte cap and within the
    timeout. Proxies from the environment (http_proxy, no_proxy) apply as usual in urllib."""

    def __init__(self, user_agent: str, timeout: float):
        self.user_agent = user_agent
        self.timeout = timeout
        self.opener = urllib.request.build_opener(_PassThrough)

    def get(self, url: str, max_bytes: int, take: Callable[[str], bool]) -> Response:
        request = urllib.request.Request(url, headers={
            "User-Agent": self.user_agent,
            "Accept": "text/html,text/plain;q=0.9,*/*;q=0.1",
            "Accept-Encoding": "identity",
        })
        deadline = time.monotonic() + self.timeout
        try:
            with self.opener.open(request, timeout=self.timeout) as resp:
                content_type = resp.headers.get_content_type() if resp.headers.get("Content-Type") else ""
                charset = resp.headers.get_content_charset()
                out = Response(url, resp.status, resp.headers, content_type, charset, None)
                if 200 <= resp.status < 300 and take(content_type):
                    out.body, out.truncated = self._read_capped(resp, max_bytes, deadline)
                return out
        except FetchError:
            raise
        except Exception as e:  # every network failure becomes a recorded reason
            reason, retryable = _network_reason(e)
            raise FetchError(reason, retryable) from e

    @staticmethod
    def _read_capped(resp, limit: int, deadline: float) -> tuple[bytes, bool]:
        """Read at most limit+1 bytes (the +1 tells a cut page from one of exactly `limit`);
        the rest is never downloaded: closing the response drops the connection."""
        chunks, n = [], 0
        while n <= limit:
            chunk = resp.read(min(64 * 1024, limit + 1 - n))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
            if time.monotonic() > deadline:
                raise FetchError("timeout (body still arriving)", True)
        data = b"".join(chunks)
        return data[:limit], len(data) > limit


# --------------------------------------------------------------------------------------------
# The queue
# --------------------------------------------------------------------------------------------


class QueueError(Exception):
    """A page could not be handed to the daemon's queue; the crawl stops, the page stays pending."""


def default_queue_dir() -> Path:
    """The daemon's queue root, found as every client finds it (cllm.layout.find_queue_dir)."""
    return layout.find_queue_dir()


def default_state_file() -> Path:
    return layout.client_state_dir() / "crawl.sqlite"


def _make_dirs(path: Path, depth: int) -> None:
    """mkdir -p, with the daemon's modes: the last `depth` levels (queue/ and queue/incoming/)
    0750, parents above them 0700 (XDG); existing directories are left as they are."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for i, d in enumerate(reversed(missing)):
        mode = 0o750 if len(missing) - i <= depth else 0o700
        d.mkdir(mode=mode, exist_ok=True)
        os.chmod(d, mode)


class QueueWriter:
    """Hands pages to the training queue: written to a hidden temporary file, fsynced, renamed to
    incoming/NAME (the queue contract), or given to `send(name, data)` (the daemon's queue.add)
    when the directory cannot be written."""

    def __init__(self, queue_dir: Path | None, send: Send | None = None):
        self.root = Path(queue_dir) if queue_dir is not None else None
        self.send = send
        self.incoming = self.root / "incoming" if self.root is not None else None
        self.writable = False
        problem = "no queue directory"
        if self.incoming is not None:
            try:
                _make_dirs(self.incoming, depth=2)
                self.writable = os.access(self.incoming, os.W_OK | os.X_OK)
                problem = "permission denied"
            except OSError as e:
                problem = e.strerror or str(e)
        if not self.writable and send is None:
            raise QueueError(f"queue directory {self.incoming} is not writable ({problem}) "
                             "and there is no daemon connection to send pages through")
        if not self.writable:
            log.info("queue directory %s not writable (%s): sending pages to the daemon",
                     self.incoming, problem)

    @property
    def where(self) -> str:
        return str(self.incoming) if self.writable else "daemon queue.add"

    def already_queued(self, name: str) -> bool:
        """Whether NAME is already in the queue (incoming, processing or done): a page written
        just before a crash, before the state recorded it, is then not written again."""
        if self.root is None or not self.writable:
            return False
        return any((self.root / sub / name).exists() for sub in ("incoming", "processing", "done"))

    def put(self, name: str, data: bytes) -> str:
        if self.writable:
            try:
                return self._write(name, data)
            except OSError as e:
                if self.send is None:
                    raise QueueError(f"cannot write {self.incoming / name}: {e.strerror or e}") from e
                log.warning("writing %s failed (%s): sending pages to the daemon from now on", name, e)
                self.writable = False
        try:
            return self.send(name, data)
        except Exception as e:
            raise QueueError(f"sending {name} to the daemon failed: {e}") from e

    def _write(self, name: str, data: bytes) -> str:
        return str(self.incoming / layout.write_incoming(self.incoming, name, data))


def provenance_line(url: str, when: float) -> bytes:
    stamp = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"#cllm-source {url} {stamp}\n".encode("utf-8")


# --------------------------------------------------------------------------------------------
# State (SQLite)
# --------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- One row per URL ever seen by this crawl: the frontier (queued), the one in flight (fetching)
-- and the visited set (everything else). UNIQUE(url) is what makes 'never twice' hold.
CREATE TABLE IF NOT EXISTS urls (
    id        INTEGER PRIMARY KEY,           -- discovery order: BFS order within a depth
    url       TEXT NOT NULL UNIQUE,
    depth     INTEGER NOT NULL,
    state     TEXT NOT NULL,                 -- queued|fetching|done|redirected|skipped|failed
    reason    TEXT,                          -- skip/failure reason; 'duplicate'/'noindex' on done
    detail    TEXT,
    attempts  INTEGER NOT NULL DEFAULT 0,    -- failed attempts so far (retries use it)
    next_try  REAL NOT NULL DEFAULT 0,       -- wall-clock time a retry waits for
    counted   INTEGER NOT NULL DEFAULT 0,    -- 1 once it counts towards --max-pages
    status    INTEGER,                       -- last HTTP status
    target    TEXT,                          -- where a redirect pointed
    sha256    TEXT,
    queued_as TEXT,
    truncated INTEGER NOT NULL DEFAULT 0,
    updated   REAL
);
CREATE INDEX IF NOT EXISTS urls_by_state ON urls(state, depth, id);
CREATE TABLE IF NOT EXISTS hosts (
    origin        TEXT PRIMARY KEY,
    robots_status INTEGER,
    robots_text   TEXT,
    robots_time   REAL,
    last_request  REAL                       -- wall-clock end of the last request
);
CREATE TABLE IF NOT EXISTS content (       -- what was queued, by sha256 of the UTF-8 page
    sha256 TEXT PRIMARY KEY,
    url    TEXT NOT NULL,
    name   TEXT NOT NULL,
    time   REAL NOT NULL
);
"""

TERMINAL_STATES = ("done", "redirected", "skipped", "failed")


class StateError(Exception):
    """The state file cannot be used (locked, unreadable, another schema, nothing to resume)."""


@dataclasses.dataclass
class Row:
    id: int
    url: str
    depth: int
    attempts: int
    counted: bool


class CrawlState:
    """The crawl's SQLite file: frontier, visited set, per-host state and content hashes, each
    change committed at once (WAL) so a killed crawl resumes where it stopped. An exclusive
    lock on FILE.lock keeps two crawls from sharing it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(str(self.path) + ".lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StateError(f"state file {self.path} is in use by another crawl") from None
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed transaction survives the process being killed.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            version = self.get_meta("schema_version")
            if version is None:
                self.set_meta("schema_version", str(SCHEMA_VERSION))
            elif version != str(SCHEMA_VERSION):
                raise StateError(f"state file {self.path} has schema version {version}, "
                                 f"expected {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            self.close()
            raise StateError(f"state file {self.path} is not a usable SQLite database: {e}") from None

    def close(self) -> None:
        if getattr(self, "db", None) is not None:
            self.db.close()
            self.db = None
        self._lock.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- meta ---------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def config(self) -> dict | None:
        value = self.get_meta("config")
        return json.loads(value) if value else None

    def status(self) -> str | None:
        return self.get_meta("status")

    def pending(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM urls WHERE state IN ('queued','fetching')").fetchone()[0]

    def start(self, config: dict) -> None:
        """A new crawl: frontier and visited set cleared; robots.txt cache, host timing and the
        content hashes (so a page queued by an earlier crawl is not queued again) are kept."""
        with self.tx() as db:
            db.execute("DELETE FROM urls")
            self.set_meta("config", json.dumps(config))
            self.set_meta("status", "running")

    def resume(self, config: dict) -> int:
        """Continue the stored crawl with `config`; a URL left in flight by a kill is retried,
        its interrupted request counted as a failed attempt. Returns how many there were."""
        with self.tx() as db:
            n = db.execute("UPDATE urls SET state='queued', attempts=attempts+1, reason=NULL, "
                           "detail='interrupted' WHERE state='fetching'").rowcount
            self.set_meta("config", json.dumps(config))
            self.set_meta("status", "running")
        return n

    def finish(self, status: str) -> None:
        with self.tx():
            self.set_meta("status", status)

    # -- frontier -----------------------------------------------------------------------------

    def add(self, db: sqlite3.Connection, url: str, depth: int, skip: str | None = None) -> None:
        """Record a discovered URL (no-op when already known: never fetched twice)."""
        db.execute("INSERT OR IGNORE INTO urls(url, depth, state, reason, updated) VALUES(?,?,?,?,?)",
                   (url, depth, "skipped" if skip else "queued", skip, time.time()))

    def ready(self, now: float, counted_only: bool = False, limit: int = 256) -> list[Row]:
        rows = self.db.execute(
            "SELECT id, url, depth, attempts, counted FROM urls WHERE state='queued' AND next_try<=? "
            "AND counted>=? ORDER BY depth, id LIMIT ?", (now, int(counted_only), limit)).fetchall()
        return [Row(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def next_retry(self, counted_only: bool = False) -> float | None:
        return self.db.execute("SELECT MIN(next_try) FROM urls WHERE state='queued' AND counted>=?",
                               (int(counted_only),)).fetchone()[0]

    def taken(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM urls WHERE counted=1").fetchone()[0]

    def mark_fetching(self, row: Row) -> None:
        """Committed before the request goes out: a kill during it leaves a trace to resume from."""
        with self.tx() as db:
            db.execute("UPDATE urls SET state='fetching', counted=1, updated=? WHERE id=?",
                       (time.time(), row.id))

    def requeue(self, row: Row) -> None:
        """Give back a URL whose request was abandoned by us (Ctrl-C, queue failure): no attempt."""
        with self.tx() as db:
            db.execute("UPDATE urls SET state='queued', updated=? WHERE id=? AND state='fetching'",
                       (time.time(), row.id))

    def set_outcome(self, row: Row, state: str, reason: str | None = None, detail: str | None = None,
                    status: int | None = None, db: sqlite3.Connection | None = None) -> None:
        def apply(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE urls SET state=?, reason=?, detail=?, status=COALESCE(?, status), updated=? "
                         "WHERE id=?", (state, reason, detail, status, time.time(), row.id))
        if db is not None:
            apply(db)
        else:
            with self.tx() as conn:
                apply(conn)

    def retry_later(self, row: Row, reason: str, when: float, status: int | None) -> None:
        with self.tx() as db:
            db.execute("UPDATE urls SET state='queued', attempts=attempts+1, detail=?, next_try=?, "
                       "status=COALESCE(?, status), updated=? WHERE id=?",
                       (reason, when, status, time.time(), row.id))

    def redirect(self, row: Row, target: str, status: int, skip: str | None) -> Row | None:
        """Record row -> target and claim the target for fetching now; None when the target is
        out of scope or already known as visited (it is then never fetched again)."""
        with self.tx() as db:
            db.execute("UPDATE urls SET state='redirected', status=?, target=?, updated=? WHERE id=?",
                       (status, target, time.time(), row.id))
            found = db.execute("SELECT id, state, attempts FROM urls WHERE url=?", (target,)).fetchone()
            if found is None:
                self.add(db, target, row.depth, skip)
                if skip:
                    return None
                found = db.execute("SELECT id, state, attempts FROM urls WHERE url=?", (target,)).fetchone()
            elif found[1] != "queued":
                return None
            db.execute("UPDATE urls SET state='fetching', depth=MIN(depth, ?), updated=? WHERE id=?",
                       (row.depth, time.time(), found[0]))
            return Row(found[0], target, row.depth, found[2], True)

    # -- pages --------------------------------------------------------------------------------

    def seen_content(self, sha256: str) -> bool:
        return self.db.execute("SELECT 1 FROM content WHERE sha256=?", (sha256,)).fetchone() is not None

    def record_page(self, row: Row, status: int, sha256: str, name: str | None, reason: str | None,
                    truncated: bool, links: list[tuple[str, str | None]], link_depth: int) -> None:
        """One transaction: the page's outcome, its content hash and its links for the frontier."""
        with self.tx() as db:
            db.execute("UPDATE urls SET state='done', reason=?, detail=NULL, status=?, sha256=?, queued_as=?, "
                       "truncated=?, updated=? WHERE id=?",
                       (reason, status, sha256, name, int(truncated), time.time(), row.id))
            if name is not None:
                db.execute("INSERT OR IGNORE INTO content(sha256, url, name, time) VALUES(?,?,?,?)",
                           (sha256, row.url, name, time.time()))
            for url, skip in links:
                self.add(db, url, link_depth, skip)

    # -- hosts --------------------------------------------------------------------------------

    def host(self, origin: str) -> tuple[int | None, str | None, float | None, float | None]:
        row = self.db.execute("SELECT robots_status, robots_text, robots_time, last_request FROM hosts "
                              "WHERE origin=?", (origin,)).fetchone()
        return tuple(row) if row else (None, None, None, None)

    def save_robots(self, origin: str, status: int, text: str) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO hosts(origin, robots_status, robots_text, robots_time) VALUES(?,?,?,?) "
                       "ON CONFLICT(origin) DO UPDATE SET robots_status=excluded.robots_status, "
                       "robots_text=excluded.robots_text, robots_time=excluded.robots_time",
                       (origin, status, text, time.time()))

    def save_last_request(self, origin: str, when: float) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO hosts(origin, last_request) VALUES(?,?) "
                       "ON CONFLICT(origin) DO UPDATE SET last_request=excluded.last_request", (origin, when))

    # -- reporting ----------------------------------------------------------------------------

    def counts(self) -> dict:
        out = {"fetched": 0, "queued": 0, "truncated": 0, "redirects": 0, "skipped": {}, "failed": 0,
               "pending": 0}
        for state, reason, n, queued, truncated in self.db.execute(
                "SELECT state, reason, COUNT(*), SUM(queued_as IS NOT NULL), SUM(truncated) FROM urls "
                "GROUP BY state, reason"):
            if state == "done":
                out["fetched"] += n
                out["queued"] += queued or 0
                out["truncated"] += truncated or 0
            if state == "redirected":
                out["redirects"] += n
            elif state == "failed":
                out["failed"] += n
            elif state in ("queued", "fetching"):
                out["pending"] += n
            if reason and (state == "skipped" or state == "done"):
                out["skipped"][reason] = out["skipped"].get(reason, 0) + n
        out["skipped"] = dict(sorted(out["skipped"].items()))
        return out

    def failures(self) -> list[dict]:
        return [{"url": u, "reason": r, "attempts": a, "status": s} for u, r, a, s in self.db.execute(
            "SELECT url, reason, attempts, status FROM urls WHERE state='failed' ORDER BY id")]


# --------------------------------------------------------------------------------------------
# The crawler
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CrawlConfig:
    seeds: list[str]
    depth: int = 2
    max_pages: int = 100
    allow_domains: list[str] = dataclasses.field(default_factory=list)
    deny: list[str] = dataclasses.field(default_factory=list)
    delay: float = 1.0  # seconds between two requests to one host; robots.txt Crawl-delay can raise it
    timeout: float = 30.0
    max_bytes: int = DEFAULT_MAX_BYTES
    user_agent: str = DEFAULT_USER_AGENT
    retries: int = 3  # extra attempts after the first, for 5xx, 429, timeouts and network errors
    backoff: float = 2.0  # the n-th retry waits backoff * 2**(n-1) seconds (or Retry-After)

    # What a resumed crawl takes from the state file unless given again.
    STORED = ("seeds", "depth", "max_pages", "allow_domains", "deny", "delay", "timeout", "max_bytes",
              "user_agent", "retries", "backoff")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.STORED}


@dataclasses.dataclass
class _Host:
    origin: str
    delay: float
    ready_at: float  # monotonic time the next request may start
    robots: RobotsRules | None = None
    robots_error: str | None = None
    robots_retry_at: float = 0.0  # monotonic; an unreachable robots.txt is retried after it
    robots_failures: int = 0
    robots_retryable: bool = True


class Crawler:
    """A breadth-first crawl over a CrawlState: one request at a time, never two to one host
    closer than its delay, every outcome committed before the next request."""

    def __init__(self, config: CrawlConfig, state: CrawlState, queue_dir: Path | None = None, *,
                 send: Send | None = None, stop: threading.Event | None = None,
                 progress: Callable[[str], None] | None = None, fetcher: Fetcher | None = None):
        self.config = config
        self.state = state
        self.queue = QueueWriter(queue_dir, send)
        self.stop = stop or threading.Event()
        self.progress = progress or (lambda url: None)
        self.fetcher = fetcher or Fetcher(config.user_agent, config.timeout)
        self.scope = Scope(config.seeds, config.allow_domains, config.deny)
        self.hosts: dict[str, _Host] = {}
        self.requests = 0
        self._inflight: Row | None = None

    # -- entry points -------------------------------------------------------------------------

    def seed(self) -> None:
        """Put the seeds at depth 0 (no-op for ones the state already knows)."""
        with self.state.tx() as db:
            for url in self.config.seeds:
                self.state.add(db, url, 0, self.scope.check(url))

    def run(self) -> str:
        """Crawl until the frontier is empty, --max-pages is reached or `stop` is set. Returns
        why it stopped: 'finished', 'max-pages' or 'interrupted'."""
        while True:
            # Past the limit only URLs already counted (waiting for a retry) are still fetched.
            limit_reached = self.state.taken() >= self.config.max_pages
            row = self._next(counted_only=limit_reached)
            if self.stop.is_set():
                return "interrupted"
            if row is None:
                stopped = "max-pages" if limit_reached and self.state.pending() else "finished"
                self.state.finish(stopped)
                return stopped
            self._process(row)

    # -- scheduling ---------------------------------------------------------------------------

    def _next(self, counted_only: bool) -> Row | None:
        """The next URL: lowest depth first (BFS); within it the one whose host may be asked
        soonest, then discovery order. Retries waiting for their backoff never block others."""
        while not self.stop.is_set():
            rows = self.state.ready(time.time(), counted_only)
            if rows:
                shallowest = [r for r in rows if r.depth == rows[0].depth]
                return min(shallowest, key=lambda r: (self._host(origin_of(r.url)).ready_at, r.id))
            when = self.state.next_retry(counted_only)
            if when is None:
                return None
            self.stop.wait(max(0.0, when - time.time()))
        return None

    def _host(self, origin: str) -> _Host:
        host = self.hosts.get(origin)
        if host is None:
            status, text, fetched, last = self.state.host(origin)
            # The last request time is stored as wall-clock time so politeness survives a restart.
            wait = max(0.0, (last or 0.0) + self.config.delay - time.time())
            host = _Host(origin, self.config.delay, time.monotonic() + wait)
            if status is not None and fetched is not None and time.time() - fetched < ROBOTS_MAX_AGE:
                self._apply_robots(host, status, text or "")
            self.hosts[origin] = host
        return host

    def _apply_robots(self, host: _Host, status: int, text: str) -> None:
        # RFC 9309 2.3.1.3: an unavailable robots.txt (4xx) means no restrictions.
        if 200 <= status < 300:
            host.robots = RobotsRules.parse(text, self.config.user_agent)
        else:
            host.robots = RobotsRules.allowing_all()
        host.robots_error = None
        if host.robots.crawl_delay is not None and host.robots.crawl_delay > host.delay:
            host.ready_at += host.robots.crawl_delay - host.delay
            host.delay = host.robots.crawl_delay

    def _sleep_until(self, when: float) -> None:
        delay = when - time.monotonic()
        if delay > 0:
            self.stop.wait(delay)

    def _request(self, url: str, max_bytes: int, take: Callable[[str], bool]) -> Response:
        """One GET, no sooner than the host's delay after its previous request ended."""
        host = self._host(origin_of(url))
        self._sleep_until(host.ready_at)
        if self.stop.is_set():
            raise _Stopped
        self.progress(url)
        self.requests += 1
        try:
            return self.fetcher.get(url, max_bytes, take)
        finally:
            # Measured from the end, so the gap the server sees is at least the delay.
            host.ready_at = time.monotonic() + host.delay
            self.state.save_last_request(host.origin, time.time())

    # -- robots.txt ---------------------------------------------------------------------------

    def _robots(self, origin: str) -> RobotsRules:
        """The host's rules, fetched once (then cached in the state for 24 h). Raises FetchError
        (retryable) while robots.txt is unreachable: RFC 9309 2.3.1.4 says crawl nothing then."""
        host = self._host(origin)
        if host.robots is not None:
            return host.robots
        if host.robots_error is not None and time.monotonic() < host.robots_retry_at:
            raise FetchError(host.robots_error, host.robots_retryable)
        url = origin + "/robots.txt"
        try:
            for _ in range(MAX_REDIRECTS + 1):  # RFC 9309 2.3.1.2: follow at least five redirects
                resp = self._request(url, ROBOTS_MAX_BYTES, lambda media_type: True)
                location = resp.headers.get("Location") if 300 <= resp.status < 400 else None
                if location is None:
                    break
                url = normalize_url(location, url) or url
            else:
                resp = None
            if resp is None or 300 <= resp.status < 400:
                status, text = 404, ""  # a redirect loop: treated as unavailable, i.e. no rules
            elif resp.status == 429 or resp.status >= 500:
                raise FetchError(f"robots.txt unreachable: http {resp.status}", True,
                                 _retry_after(resp.headers))
            else:
                status = resp.status
                body = resp.body or b""
                text = _decode(body, _charset(body, resp.charset, False), resp.truncated)
        except FetchError as e:
            host.robots_failures += 1
            reason = e.reason if e.reason.startswith("robots.txt") else f"robots.txt unreachable: {e.reason}"
            host.robots_error, host.robots_retryable = reason, e.retryable
            host.robots_retry_at = time.monotonic() + self._backoff(host.robots_failures, e.retry_after)
            raise FetchError(reason, e.retryable, e.retry_after) from None
        self.state.save_robots(origin, status, text)
        self._apply_robots(host, status, text)
        log.info("robots.txt of %s: http %d, crawl delay %.3g s", origin, status, host.delay)
        return host.robots

    # -- one URL ------------------------------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        wait = self.config.backoff * 2 ** max(0, attempt - 1)
        return max(wait, retry_after or 0.0)

    def _process(self, row: Row) -> None:
        self._inflight = row
        try:
            self._follow(row)
        except _Stopped:
            self.state.requeue(self._inflight)  # not requested at all: simply pending again
        except KeyboardInterrupt:
            # We abandoned the request ourselves: give the URL back without counting an attempt.
            self.state.requeue(self._inflight)
            raise

    def _follow(self, row: Row) -> None:
        """Fetch row's URL, following up to MAX_REDIRECTS redirects, each target checked
        against scope, robots.txt and the visited set before it is requested."""
        first = row
        current = row
        redirects = 0
        while True:
            try:
                robots = self._robots(origin_of(current.url))
            except FetchError as e:
                self._failed_attempt(current, e, None)
                return
            if not robots.allowed(current.url):
                self._outcome(current, "skipped", "robots")
                return
            if current is first:
                self.state.mark_fetching(current)
            try:
                resp = self._request(current.url, self.config.max_bytes, TAKEN_TYPES.__contains__)
            except FetchError as e:
                self._failed_attempt(current, e, None)
                return
            status = resp.status
            if 300 <= status < 400 and status != 304:
                location = resp.headers.get("Location")
                target = normalize_url(location, current.url) if location else None
                if target is None:
                    self._outcome(current, "failed", f"http {status} without a usable Location",
                                  status=status)
                    return
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    self._outcome(current, "failed",
                                  f"too many redirects (more than {MAX_REDIRECTS}, from {first.url})",
                                  status=status)
                    return
                skip = self.scope.check(target)
                if skip == "off-scope" and first.depth == 0:
                    skip = self._widen_scope(target)
                log.info("redirect  %s -> %s (http %d)", current.url, target, status)
                nxt = self.state.redirect(current, target, status, skip)
                if nxt is None:
                    if skip:
                        log.info("skipped   %s (%s)", target, skip)
                    return
                current = self._inflight = nxt
                continue
            if 200 <= status < 300:
                if resp.body is None:
                    self._outcome(current, "skipped", "content-type", resp.media_type or "none", status)
                else:
                    self._take(current, resp)
            elif status == 429 or status >= 500:
                error = FetchError(f"http {status}", True, _retry_after(resp.headers))
                self._failed_attempt(current, error, status)
            else:
                self._outcome(current, "failed", f"http {status}", status=status)
            return

    def _widen_scope(self, target: str) -> str | None:
        """A seed redirecting to another host (http://example.org -> https://www.example.org)
        brings that host into scope: the target becomes a seed, stored for --resume."""
        self.config.seeds.append(target)
        self.scope.hosts.add(urllib.parse.urlsplit(target).hostname)
        with self.state.tx():
            self.state.set_meta("config", json.dumps(self.config.to_dict()))
        log.info("seed redirected to %s: its host is in scope", target)
        return self.scope.check(target)

    def _outcome(self, row: Row, state: str, reason: str | None, detail: str | None = None,
                 status: int | None = None) -> None:
        self.state.set_outcome(row, state, reason, detail, status)
        log.info("%-9s %s (%s%s)", state, row.url, reason, f": {detail}" if detail else "")

    def _failed_attempt(self, row: Row, error: FetchError, status: int | None) -> None:
        attempts = row.attempts + 1
        if error.retryable and attempts <= self.config.retries:
            wait = self._backoff(attempts, error.retry_after)
            self.state.retry_later(row, error.reason, time.time() + wait, status)
            log.info("retry     %s in %.3g s (%s, attempt %d)", row.url, wait, error.reason, attempts)
            return
        reason = error.reason + (f" (after {attempts} attempts)" if attempts > 1 else "")
        with self.state.tx() as db:
            db.execute("UPDATE urls SET attempts=? WHERE id=?", (attempts, row.id))
            self.state.set_outcome(row, "failed", reason, None, status, db)
        log.info("failed    %s (%s)", row.url, reason)

    def _take(self, row: Row, resp: Response) -> None:
        fetched_at = time.time()
        is_html = resp.media_type == "text/html"
        body = resp.body
        text = _decode(body, _charset(body, resp.charset, is_html), resp.truncated)
        if "\0" in text:
            # Binary data under a text type; the daemon would refuse it as binary anyway.
            self._outcome(row, "skipped", "binary", f"NUL in a {resp.media_type} body", resp.status)
            return
        # Queue files are UTF-8 (the queue contract); a page in another charset is transcoded.
        data = text.encode("utf-8")
        sha = hashlib.sha256(data).hexdigest()
        page = extract_links(text, row.url, self.config.user_agent) if is_html else PageLinks([])
        links: list[tuple[str, str | None]] = []
        if not page.nofollow and row.depth < self.config.depth:
            links = [(url, self.scope.check(url)) for url in page.links]
        name = None
        if page.noindex:
            reason = "noindex"
        elif self.state.seen_content(sha):
            reason = "duplicate"
        else:
            reason = None
            name = f"crawl-{sha[:16]}{TAKEN_TYPES[resp.media_type]}"
            if self.queue.already_queued(name):
                log.info("%s already in the queue (written before an interruption)", name)
            else:
                try:
                    self.queue.put(name, provenance_line(row.url, fetched_at) + data)
                except QueueError:
                    self.state.requeue(row)
                    raise
        self.state.record_page(row, resp.status, sha, name, reason, resp.truncated, links, row.depth + 1)
        log.info("%-9s %s%s%s", "queued" if name else reason, row.url, f" as {name}" if name else "",
                 " (cut at --max-bytes)" if resp.truncated else "")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line instead of usage + message
        raise _UsageError(message)


def _size(value: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(i?b)?\s*", value, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (bytes, or with k/M/G suffix)")
    return int(m.group(1)) * 1024 ** " kmg".index((m.group(2) or " ").lower())


def build_parser(prog: str = "cllm crawl") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Crawl web pages politely and resumably into cllmd's training queue.")
    p.add_argument("urls", nargs="*", metavar="URL", help="seed URLs (http or https); optional with --resume")
    p.add_argument("--depth", type=int, metavar="N", help="link depth from the seeds (default 2)")
    p.add_argument("--max-pages", type=int, metavar="N",
                   help="URLs to fetch at most, whatever their outcome (default 100)")
    p.add_argument("--allow-domain", action="append", metavar="DOMAIN",
                   help="also crawl DOMAIN and its subdomains (repeatable); default: only the seeds' hosts")
    p.add_argument("--deny", action="append", metavar="REGEX",
                   help="never fetch URLs this matches (re.search; repeatable)")
    p.add_argument("--delay", type=float, metavar="SECONDS",
                   help="seconds between requests to one host (default 1.0; robots.txt Crawl-delay may raise it)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="seconds a request may take (default 30)")
    p.add_argument("--max-bytes", type=_size, metavar="SIZE",
                   help="page size cap in bytes (k/M/G suffixes), the rest is cut (default 5M)")
    p.add_argument("--user-agent", metavar="UA",
                   help=f"User-Agent header and robots.txt agent (default {DEFAULT_USER_AGENT})")
    p.add_argument("--retries", type=int, metavar="N",
                   help="extra attempts for 5xx, 429, timeouts and network errors (default 3)")
    p.add_argument("--backoff", type=float, metavar="SECONDS",
                   help="seconds before the first retry, doubling each time (default 2)")
    p.add_argument("--state", type=Path, metavar="FILE",
                   help=f"crawl state (SQLite; default {default_state_file()})")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the crawl stored in the state file")
    group.add_argument("--restart", action="store_true",
                       help="discard an unfinished crawl in the state file and start anew")
    p.add_argument("--queue-dir", type=Path, metavar="DIR",
                   help="the daemon's queue root (holding incoming/); default: as the daemon resolves it")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout at the end")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line and no summary text")
    p.add_argument("--verbose", "-v", action="store_true", help="log every URL's outcome on stderr")
    return p


def _check(args: argparse.Namespace) -> None:
    """Argument errors argparse cannot see, each as one clear line."""
    for name, low, kind in (("depth", 0, "an integer >= 0"), ("max_pages", 1, "an integer >= 1"),
                            ("retries", 0, "an integer >= 0"), ("max_bytes", 1, "at least 1 byte")):
        value = getattr(args, name)
        if value is not None and value < low:
            raise _UsageError(f"--{name.replace('_', '-')} must be {kind}, got {value}")
    for name in ("delay", "backoff", "timeout"):
        value = getattr(args, name)
        bound = "> 0" if name == "timeout" else ">= 0"
        if value is not None and (not math.isfinite(value) or value < 0 or (name == "timeout" and value == 0)):
            raise _UsageError(f"--{name} must be a number of seconds {bound}, got {value}")
    for pattern in args.deny or ():
        try:
            re.compile(pattern)
        except re.error as e:
            raise _UsageError(f"bad --deny pattern {pattern!r}: {e}") from None
    for domain in args.allow_domain or ():
        if not re.fullmatch(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]", domain.strip(".")):
            raise _UsageError(f"bad --allow-domain {domain!r}: expected a host name such as example.org")
    agent = args.user_agent
    if agent is not None and (not agent.strip() or "\r" in agent or "\n" in agent):
        raise _UsageError("--user-agent must be a non-empty single line")


def _seed_urls(urls: list[str]) -> list[str]:
    seeds = []
    for raw in urls:
        url = normalize_url(raw)
        if url is None:
            hint = f" (did you mean https://{raw}?)" if "://" not in raw and raw.strip() else ""
            raise _UsageError(f"not an http(s) URL: {raw!r}{hint}")
        if url not in seeds:
            seeds.append(url)
    return seeds


class _ProgressLine:
    """The one-line progress display on a terminal (stderr), at most ten updates a second."""

    def __init__(self, stream, state: CrawlState):
        self.stream = stream
        self.state = state
        self.last = 0.0

    def __call__(self, url: str) -> None:
        now = time.monotonic()
        if now - self.last < 0.1:
            return
        self.last = now
        c = self.state.counts()
        skipped = sum(c["skipped"].values())
        detail = ", ".join(f"{k} {v}" for k, v in c["skipped"].items())
        width = shutil.get_terminal_size((100, 20)).columns - 1
        line = ""
        for shown in (f" ({detail})" if detail else "", ""):  # the reasons go first when space is short
            line = (f"fetched {c['fetched']}  queued {c['queued']}  skipped {skipped}{shown}  "
                    f"failed {c['failed']}  {url}")
            if len(line) <= width:
                break
        self.stream.write("\r" + line[:width] + "\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()


def _summary_text(s: dict) -> str:
    cut = f" ({s['truncated']} cut)" if s["truncated"] else ""
    reasons = ", ".join(f"{k} {v}" for k, v in s["skipped"].items())
    reasons = f" ({reasons})" if reasons else ""
    lines = [f"crawl {s['stopped']}: {s['fetched']} pages fetched, {s['queued']} queued{cut}, "
             f"{sum(s['skipped'].values())} skipped{reasons}, {s['failed']} failed, {s['pending']} pending"]
    lines += [f"  failed {f['url']}: {f['reason']}" for f in s["failures"][:20]]
    if len(s["failures"]) > 20:
        lines.append(f"  ... and {len(s['failures']) - 20} more (see --json)")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, send: Send | None = None) -> int:
    """`cllm crawl URL... [options]`. `send(name, data)` (the daemon's queue.add) is used when
    the queue directory cannot be written. Exit codes: 0 done, 1 nothing could be fetched,
    2 bad arguments or unusable state/queue, 130 interrupted (resume with --resume)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check(args)
        seeds = _seed_urls(args.urls)
        if not seeds and not args.resume:
            raise _UsageError("no URL to crawl (give seed URLs, or --resume)")
    except _UsageError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0

    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)

    state_path = args.state or default_state_file()
    queue_dir = args.queue_dir or default_queue_dir()
    try:
        state = CrawlState(state_path)
    except (StateError, OSError) as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args, seeds, state, queue_dir, send, parser.prog)
    finally:
        state.close()


def _run(args, seeds: list[str], state: CrawlState, queue_dir: Path, send: Send | None, prog: str) -> int:
    given = {"depth": args.depth, "max_pages": args.max_pages, "allow_domains": args.allow_domain,
             "deny": args.deny, "delay": args.delay, "timeout": args.timeout, "max_bytes": args.max_bytes,
             "user_agent": args.user_agent, "retries": args.retries, "backoff": args.backoff}
    given = {k: v for k, v in given.items() if v is not None}
    stored = state.config()
    if args.resume:
        if stored is None:
            print(f"{prog}: nothing to resume in {state.path} (start a crawl with seed URLs)",
                  file=sys.stderr)
            return 2
        config = CrawlConfig(**{**stored, **given})
        config.seeds = stored["seeds"] + [s for s in seeds if s not in stored["seeds"]]
    else:
        if stored is not None and state.status() == "running" and state.pending() and not args.restart:
            print(f"{prog}: {state.path} holds an unfinished crawl ({state.pending()} URLs pending): "
                  "pass --resume to continue it or --restart to discard it", file=sys.stderr)
            return 2
        config = CrawlConfig(seeds=seeds, **given)

    stop = threading.Event()
    interactive = sys.stderr.isatty() and not args.quiet
    progress = _ProgressLine(sys.stderr, state) if interactive else None
    try:
        crawler = Crawler(config, state, queue_dir, send=send, stop=stop, progress=progress)
    except QueueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2

    if args.resume:
        interrupted = state.resume(config.to_dict())
        if interrupted:
            log.info("%d URL(s) were in flight when the last run ended: retrying them", interrupted)
    else:
        state.start(config.to_dict())
    crawler.seed()

    def on_signal(signum, frame):
        # First signal: stop after the request in flight. Second: stop now.
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    started = time.monotonic()
    stopped, error = "interrupted", None
    try:
        stopped = crawler.run()
    except KeyboardInterrupt:
        stopped = "interrupted"
    except QueueError as e:
        stopped, error = "error", str(e)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if progress is not None:
            progress.close()

    summary = {"stopped": stopped, **state.counts(), "pages": state.taken(), "failures": state.failures(),
               "requests": crawler.requests, "elapsed": round(time.monotonic() - started, 3),
               "seeds": config.seeds, "state": str(state.path), "queue": crawler.queue.where}
    if error:
        summary["error"] = error
        print(f"{prog}: {error}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        print(_summary_text(summary))
    if stopped == "interrupted":
        return 130
    if error or summary["fetched"] == 0:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
