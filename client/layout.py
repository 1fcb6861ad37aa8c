"""Where cllmd's files live, and how a file enters its queue: the contract between the daemon
and its clients, imported by both (standard library only).

Directories: an explicit flag > systemd's *_DIRECTORY variables > the XDG base directories.
The queue: <state>/queue/{incoming,processing,done,failed}/; a file enters incoming/ by a rename
from a hidden temporary name (the daemon's inotify watch sees the rename, never a half-written
file), never replacing another file: a taken NAME becomes NAME-1.ext, NAME-2.ext, ...
"""
from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from cllm.durable import atomic_file

APP = "cllmd"
SOCKET_NAME = "cllmd.sock"
EVENTS_SOCKET_NAME = "cllmd-events.sock"
# Where a system service (packaging/, systemd/) keeps its directories; clients look there first.
SYSTEM_RUNTIME_DIR = Path("/run/cllmd")
SYSTEM_STATE_DIR = Path("/var/lib/cllmd")

QUEUE_DIR = "queue"         # <state>/queue
QUEUE_STATES = ("incoming", "processing", "done", "failed")
REASON_SUFFIX = ".reason"   # failed/NAME.reason says why NAME failed
NAME_MAX = 255              # bytes, Linux
# Files dropped into incoming/ are read by the daemon, which under systemd is another user of
# the queue's group.
QUEUE_FILE_MODE = 0o640


# What the daemon's preprocessing (cllmd.preprocess) reads, by extension; a name it does not
# know is judged by its content. Declared here, on the client side of the queue contract, so
# that `cllm queue add --help` lists it without importing the daemon.
FORMATS: dict[str, str] = {
    ".txt": "text", ".md": "text", ".rst": "text", ".text": "text",
    ".html": "html", ".htm": "html", ".xhtml": "html",
    ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".xml": "xml",
}
_FORMAT_NOTES = {
    "text": "plain text; also any other name whose content reads as prose",
    "html": "HTML, without navigation, headers, footers and sidebars; <main> when there is one",
    "json": "JSON: text/content/body fields, else the strings of two or more words",
    "jsonl": "JSON Lines, each line as for JSON",
    "csv": "CSV: the text columns", "tsv": "TSV: the text columns",
    "xml": "XML: the text nodes (a DOCTYPE is fine, entity declarations are refused)",
}


# HTML, XML, JSON, JSON Lines, CSV and TSV are parsed whole, so they may weigh this much at most
# (decompressed): a 32 MiB CSV, the worst, takes 453 MiB beyond the process's own size, 64 MiB
# ones 905 MiB (CSV) and 769 MiB (XML) (benchmarks/bench_preprocess_memory.py). Plain text
# streams up to the queue's size limit.
WHOLE_DOCUMENT_MAX_BYTES = 32 * 2**20


def formats_help() -> str:
    """The accepted formats, one line each, for help texts."""
    lines = []
    for fmt, note in _FORMAT_NOTES.items():
        exts = " ".join(e for e, f in FORMATS.items() if f == fmt)
        lines.append(f"  {exts:<22} {note}")
    lines.append("  any of them + .gz      gzip-compressed, up to the queue's size limit unpacked")
    lines.append(f"Plain text streams up to the queue's size limit; the formats parsed whole (all "
                 f"but text) up to {WHOLE_DOCUMENT_MAX_BYTES // 2**20} MiB.")
    lines.append("Refused with the reason: binary files, SVG, roff (man page) sources, data "
                 "without words.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- directories

def _systemd_dir(env: Mapping[str, str], var: str) -> Path | None:
    # systemd passes one path per StateDirectory= entry, ':'-separated; ours is the first.
    first = env.get(var, "").split(":", 1)[0]
    return Path(first) if first else None


def _xdg_dir(env: Mapping[str, str], var: str) -> Path | None:
    # The XDG spec says relative values are invalid and must be ignored.
    value = env.get(var, "")
    return Path(value) if value and os.path.isabs(value) else None


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or Path.home())


def xdg_state_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return _xdg_dir(env, "XDG_STATE_HOME") or _home(env) / ".local" / "state"


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """The daemon's state directory (model, checkpoints, data store, queue) when no flag names
    one: $STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/cllmd."""
    env = os.environ if env is None else env
    return _systemd_dir(env, "STATE_DIRECTORY") or xdg_state_home(env) / APP


def runtime_dir(env: Mapping[str, str] | None = None) -> Path:
    """The daemon's runtime directory (its sockets): $RUNTIME_DIRECTORY (systemd), else
    $XDG_RUNTIME_DIR/cllmd, else /tmp/cllmd-<uid> (without a login session)."""
    env = os.environ if env is None else env
    found = _systemd_dir(env, "RUNTIME_DIRECTORY")
    if found is None:
        xdg = _xdg_dir(env, "XDG_RUNTIME_DIR")
        found = xdg / APP if xdg else Path(f"/tmp/{APP}-{os.getuid()}")
    return found


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """$CACHE_DIRECTORY (systemd), else $XDG_CACHE_HOME/cllmd."""
    env = os.environ if env is None else env
    return _systemd_dir(env, "CACHE_DIRECTORY") or \
        (_xdg_dir(env, "XDG_CACHE_HOME") or _home(env) / ".cache") / APP


def configuration_dir(env: Mapping[str, str] | None = None) -> Path | None:
    env = os.environ if env is None else env
    return _systemd_dir(env, "CONFIGURATION_DIRECTORY")


def client_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """The clients' own state (chat history, crawl state): $XDG_STATE_HOME/cllm."""
    return xdg_state_home(env) / "cllm"


def find_queue_dir(env: Mapping[str, str] | None = None,
                   system_state_dir: Path = SYSTEM_STATE_DIR) -> Path:
    """The queue root as a client finds it: $STATE_DIRECTORY/queue, else the system service's
    /var/lib/cllmd/queue when it exists and is writable, else the user daemon's."""
    env = os.environ if env is None else env
    if _systemd_dir(env, "STATE_DIRECTORY") is None:
        system = Path(system_state_dir) / QUEUE_DIR
        if system.is_dir() and os.access(system, os.W_OK | os.X_OK):
            return system
    return state_dir(env) / QUEUE_DIR


def find_socket(socket: str | None = None, env: Mapping[str, str] | None = None,
                system_runtime_dir: str | Path = SYSTEM_RUNTIME_DIR) -> str:
    """The daemon's request endpoint as a client finds it (first match wins):

    1. ``socket`` (an argument, e.g. ``--socket``), 2. ``$CLLM_SOCKET``,
    3. ``$RUNTIME_DIRECTORY/cllmd.sock``, 4. ``/run/cllmd/cllmd.sock`` if it exists,
    5. ``$XDG_RUNTIME_DIR/cllmd/cllmd.sock``, 6. ``/tmp/cllmd-<uid>/cllmd.sock``.
    A plain path is returned as ``ipc://<path>``; ``ipc://`` and ``tcp://`` endpoints pass through.
    """
    env = os.environ if env is None else env
    chosen = socket or env.get("CLLM_SOCKET")
    if not chosen:
        system = Path(system_runtime_dir) / SOCKET_NAME
        if _systemd_dir(env, "RUNTIME_DIRECTORY") is None and system.exists():
            chosen = str(system)
        else:
            chosen = str(runtime_dir(env) / SOCKET_NAME)
    if "://" in chosen:
        return chosen
    return "ipc://" + os.path.abspath(chosen)


def endpoints(runtime: str | Path) -> tuple[str, str]:
    """(request endpoint, events endpoint) of a daemon whose runtime directory is given."""
    return (f"ipc://{Path(runtime) / SOCKET_NAME}", f"ipc://{Path(runtime) / EVENTS_SOCKET_NAME}")


def events_endpoint_for(endpoint: str) -> str | None:
    """The events socket beside an ipc request socket; None for tcp (it must be given)."""
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        return "ipc://" + os.path.join(os.path.dirname(endpoint[len("ipc://"):]),
                                       EVENTS_SOCKET_NAME)
    return None


# --------------------------------------------------------------------------- queue names

def split_ext(name: str) -> tuple[str, str]:
    """("notes", ".txt") for notes.txt; no extension for dot-files or over-long "extensions"."""
    dot = name.rfind(".")
    return (name[:dot], name[dot:]) if dot > 0 and len(name) - dot <= 16 else (name, "")


def _fit(stem: str, tail: str, max_bytes: int) -> str:
    # Shorten the stem (never the extension or suffix) until the name fits in max_bytes.
    while len((stem + tail).encode("utf-8", "surrogateescape")) > max_bytes and stem:
        stem = stem[:-1]
    return stem + tail


def candidates(name: str, max_bytes: int = NAME_MAX) -> Iterator[str]:
    """NAME, then NAME-1.ext, NAME-2.ext, ... each short enough for the file system."""
    stem, ext = split_ext(name)
    yield _fit(stem, ext, max_bytes)
    i = 1
    while True:
        yield _fit(stem, f"-{i}{ext}", max_bytes)
        i += 1


def sanitize_name(name: str) -> str:
    """A safe single file name for the queue: no '/', no control characters, no leading '.'."""
    clean = "".join("_" if c == "/" or ord(c) < 32 or c == "\x7f" else c for c in name)
    clean = clean.lstrip(". ").rstrip()
    if not clean:
        clean = "unnamed"
    stem, ext = split_ext(clean)
    # Room for ".reason", a "-N" suffix and a temporary name's prefix and suffix.
    return _fit(stem, ext, 200)


def portable_name(name: str) -> str:
    """`name` (as os.listdir gives it) made safe to show, log and send: bytes that are not
    UTF-8 become U+FFFD, control characters (a newline...) "_". Unchanged for a normal name."""
    text = os.fsencode(name).decode("utf-8", "replace")
    return "".join("_" if ord(c) < 32 or c == "\x7f" else c for c in text)


# --------------------------------------------------------------------------- entering the queue

_RENAME_NOREPLACE = 1   # linux/fs.h
_renameat2 = None


def rename_noreplace(src: Path, dst: Path) -> bool:
    """rename(2) that never replaces dst: renameat2(RENAME_NOREPLACE) where the C library has it,
    else a check just before a plain rename. False when dst exists."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            _renameat2 = fn
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2:
        at_fdcwd = -100
        if _renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst),
                      _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.ENOSYS, errno.EINVAL):   # EINVAL: the file system cannot do it
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        return False
    os.rename(src, dst)
    return True


def place(src: Path, directory: Path, name: str) -> str:
    """Rename `src` into `directory` under the first free candidate of `name`, never replacing
    a file; returns the name used. The caller fsyncs the directory."""
    for cand in candidates(name):
        if rename_noreplace(src, directory / cand):
            return cand
    raise AssertionError("unreachable: candidates() never ends")


def write_incoming(incoming: Path, name: str, data: bytes) -> str:
    """The queue contract: write `data` to a hidden temporary file in incoming/, fsync it,
    rename it to NAME (or NAME-1.ext, ... when taken), fsync the directory. `name` should come
    from sanitize_name(). Returns the name used."""
    incoming = Path(incoming)
    placed: list[str] = []
    with atomic_file(incoming / name, QUEUE_FILE_MODE,
                     commit=lambda tmp, _: placed.append(place(tmp, incoming, name))) as f:
        f.write(data)
    return placed[0]
