"""Writing a file into the training queue the way the queue contract says (client side).

Shared by `cllm queue add` and `cllm crawl`: the daemon's own writer lives in
cllmd.trainqueue, which the client may not import (it must stay numpy-free).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

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


def formats_help() -> str:
    """The accepted formats, one line each, for help texts."""
    lines = []
    for fmt, note in _FORMAT_NOTES.items():
        exts = " ".join(e for e, f in FORMATS.items() if f == fmt)
        lines.append(f"  {exts:<22} {note}")
    lines.append("  any of them + .gz      gzip-compressed, up to the queue's size limit unpacked")
    lines.append("Refused with the reason: binary files, SVG, roff (man page) sources, data "
                 "without words.")
    return "\n".join(lines)


def _queue_candidates(name: str):
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    else:
        ext = "." + ext
    yield name
    for i in range(1, 10_000):
        yield f"{stem}-{i}{ext}"


_RENAME_NOREPLACE = 1   # linux/fs.h


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """rename(2) that never replaces dst: renameat2(RENAME_NOREPLACE) where the C library has it,
    else a check just before a plain rename. False when dst exists."""
    global _renameat2
    if _renameat2 is None:
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2 = fn
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2:
        import ctypes
        at_fdcwd = -100
        if _renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
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


_renameat2 = None


def write_incoming(incoming: Path, name: str, data: bytes) -> str:
    """The queue contract: write incoming/.NAME.part, fsync, rename it to NAME (the daemon's
    inotify watch sees the rename), never replacing another file; then fsync the directory.
    Returns the name used (NAME, or NAME-1.ext, ... when taken)."""
    part = incoming / f".{name}.part"
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:   # another writer of the same name right now
        part = incoming / f".{name}.{os.getpid()}.part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for cand in _queue_candidates(name):
            if _rename_noreplace(part, incoming / cand):
                break
        else:
            raise OSError(errno.EEXIST, f"no free name for {name} in {incoming}")
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    dfd = os.open(incoming, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)   # the rename itself durable
    finally:
        os.close(dfd)
    return cand
