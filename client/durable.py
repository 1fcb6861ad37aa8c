"""Durable writes: a file replaced whole or not at all, surviving a crash or a power cut.

The one idiom (temporary file in the same directory, fsync, rename, fsync of the directory),
shared by the daemon (model files, checkpoints, data store, queue, corpus, training plan) and the
client (queue writes, chat history). Standard library only, so the client can import it.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

# Temporary names: ".NAME.tmp-PID-HEX". A leading dot keeps them out of listings and of the
# queue's watch; the marker lets a sweep at start (under the state lock) find a crash's leftovers.
TEMP_MARK = ".tmp-"
# Files the daemon writes hold the model, its training data and the user's documents: readable
# by their owner only unless a caller says otherwise (issue 11, F9).
PRIVATE_FILE = 0o600


def fsync_dir(directory: os.PathLike | str) -> None:
    """fsync a directory so that a rename or a new name inside it survives a power loss."""
    fd = os.open(os.fspath(directory), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: os.PathLike | str) -> Path:
    """A fresh temporary name beside `path` (same directory, so the rename is atomic)."""
    path = Path(path)
    return path.parent / f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def is_temp(name: str) -> bool:
    """Whether a directory entry is a temporary file of this module."""
    return name.startswith(".") and TEMP_MARK in name


def sweep_temps(directory: os.PathLike | str) -> dict[str, int]:
    """Remove the temporary files a crash left in `directory`; returns {name: bytes freed}.

    Only for a directory no other process of ours writes into at the same time (the daemon
    holds its state lock when it calls this)."""
    removed: dict[str, int] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if is_temp(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                size = entry.stat(follow_symlinks=False).st_size
                os.unlink(entry.path)
                removed[entry.name] = size
    return removed


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str, mode: int = PRIVATE_FILE) -> Iterator[Path]:
    """Yield a temporary path for the caller to write (by name); on success it is fsynced and
    renamed over `path`, then the directory is fsynced. On an exception it is removed and
    `path` is left exactly as it was. For writers that only take a file name (readline)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: os.PathLike | str, mode: int = PRIVATE_FILE,
                commit: Callable[[Path, Path], Any] = os.replace) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces `path` only if the block completes (see atomic_path).

    `mode` is exact (not reduced by the umask): 0600 unless the caller says otherwise.
    `commit(tmp, path)` makes the fsynced file visible (default: rename over `path`; the queue
    passes a rename that never replaces another file)."""
    path = Path(path)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: os.PathLike | str, data: bytes | str | Callable[[IO[bytes]], Any],
                 mode: int = PRIVATE_FILE) -> None:
    """Atomically replace `path` with `data` (bytes, str as UTF-8, or what `data(file)` writes)."""
    with atomic_file(path, mode) as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)

