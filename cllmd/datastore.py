"""The data store: append-only, memory-mapped token shards with a checksummed document index.

Tokens are appended crash-safely (shard fsync before index record), batches are random
windows read from the memory maps, so memory stays flat however large the corpus grows.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import re
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from cllm.durable import PRIVATE_FILE, atomic_write, fsync_dir, sweep_temps

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
FORMAT = "cllmd-datastore"
FORMAT_VERSION = 1
META_NAME = "meta.json"
INDEX_NAME = "index.jsonl"
LOCK_NAME = "lock"
PAD_ID = 0  # padded_batch fills with it; any id works since its targets are masked out
_SHARD_RE = re.compile(r"^(train|val)-(\d{5})\.bin$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_RECORD_FIELDS = ("sha256", "source", "split", "shard", "offset", "tokens", "time")


class DataStoreError(Exception):
    """The store on disk cannot be used as asked: foreign, corrupt, locked, closed or broken."""


@dataclass(frozen=True, slots=True)
class Document:
    """One stored document: `tokens` ids at `offset` (in tokens) of shard `shard` of `split`."""

    sha256: str
    source: str
    split: str
    shard: int
    offset: int
    tokens: int
    time: float


def split_of(sha256: str, val_every: int = 20) -> str:
    """The split of a document, a function of its hash alone: 1 in `val_every` goes to "val"."""
    return "val" if int(sha256[:8], 16) % val_every == 0 else "train"


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.bin"


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _crc_line(payload: bytes) -> bytes:
    # One index record: JSON (ASCII, so it holds no raw tab or newline), a tab, its crc32, "\n".
    return payload + b"\t" + f"{zlib.crc32(payload):08x}".encode() + b"\n"


def _parse_line(line: bytes) -> dict | None:
    """The record of one complete index line, or None when it is torn or fails its checksum."""
    if not line.endswith(b"\n"):
        return None
    payload, sep, crc = line[:-1].rpartition(b"\t")
    if not sep or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(payload):
            return None
        record = json.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class DataStore:
    """Append-only token store in `directory`: one contiguous token stream per split.

    Layout: `meta.json` (vocabulary size, token dtype, val_every; written atomically),
    `index.jsonl` (one crc-checked JSON record per document, append-only), `lock` (flock held
    while open, so a single process owns the store), and shards `train-00000.bin`,
    `val-00000.bin`, ... of raw little-endian token ids. A split starts a new shard when the
    next document would push its current shard past `shard_tokens`.

    Thread safety: appends are serialised by a lock; sampling may run concurrently from other
    threads and only ever reads tokens the index has committed.
    """

    def __init__(self, directory, vocab_size: int, *, val_every: int = 20,
                 shard_tokens: int = 64 * 2**20):
        self.directory = os.path.abspath(os.fspath(directory))
        self.vocab_size = _check_int("vocab_size", vocab_size, 2)
        if self.vocab_size > 2**32:
            raise ValueError(f"vocab_size must be <= 2**32, got {self.vocab_size}")
        self.val_every = _check_int("val_every", val_every, 2)
        self.shard_tokens = _check_int("shard_tokens", shard_tokens, 1)
        self.dtype = token_dtype(self.vocab_size)
        self._itemsize = self.dtype.itemsize

        self._append_lock = threading.Lock()  # one appender at a time, held across the I/O
        self._state_lock = threading.Lock()   # short: in-memory index and memmap cache
        self._closed = False
        self._broken: str | None = None       # set when a failed write could not be rolled back

        self._docs: list[Document] = []
        self._by_sha: dict[str, Document] = {}
        self._split_docs: dict[str, list[Document]] = {s: [] for s in SPLITS}
        self._eligible: dict[str, list[int]] = {s: [] for s in SPLITS}  # docs of >= 2 tokens
        self._lens: dict[str, list[int]] = {s: [] for s in SPLITS}  # committed tokens per shard
        self._maps: dict[tuple[str, int], np.memmap] = {}
        self._write_fds: dict[str, tuple[int, int]] = {}  # split -> (shard, fd) being appended

        os.makedirs(self.directory, exist_ok=True)
        self._lock_fd = self._acquire_lock()
        self._index_fd = -1
        try:
            self._open_meta()
            self._index_size = self._load_index()
            self._repair_shards()
        except BaseException:
            self.close()
            raise

    # ---- opening and repair -------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _acquire_lock(self) -> int:
        fd = os.open(self._path(LOCK_NAME), os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise DataStoreError(
                    f"data store {self.directory} is already open (lock held by pid {holder}); "
                    "share one DataStore instance instead of opening it twice") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _meta(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "vocab_size": self.vocab_size,
                "dtype": self.dtype.name, "val_every": self.val_every}

    def _open_meta(self) -> None:
        path = self._path(META_NAME)
        # Under the store's lock: a crash while creating the store (or replacing meta.json)
        # left its temporary file behind.
        sweep_temps(self.directory)
        legacy_tmp = path + ".tmp"  # the temporary name of versions before cllm.durable
        if os.path.exists(legacy_tmp):
            os.unlink(legacy_tmp)
        if not os.path.exists(path):
            leftovers = [n for n in os.listdir(self.directory)
                         if n == INDEX_NAME or _SHARD_RE.match(n)]
            if leftovers:
                raise DataStoreError(
                    f"data store {self.directory} holds {', '.join(sorted(leftovers))} "
                    f"but no {META_NAME}: refusing to guess its vocabulary")
            meta = self._meta()
            crc = f"{zlib.crc32(json.dumps(meta, sort_keys=True).encode()):08x}"
            atomic_write(path, json.dumps({"meta": meta, "crc32": crc}, sort_keys=True, indent=1) + "\n")
            logger.info("created data store %s (vocab %d, %s tokens)", self.directory,
                        self.vocab_size, self.dtype.name)
            return
        try:
            with open(path, encoding="ascii") as f:
                outer = json.load(f)
            meta = outer["meta"]
            body = json.dumps(meta, sort_keys=True)
            ok = outer["crc32"] == f"{zlib.crc32(body.encode()):08x}"
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise DataStoreError(f"{path} is corrupt (unreadable or checksum mismatch)")
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise DataStoreError(f"{path} is not a {FORMAT} version {FORMAT_VERSION} store: "
                                 f"format {meta.get('format')!r} version {meta.get('version')!r}")
        if meta.get("vocab_size") != self.vocab_size or meta.get("dtype") != self.dtype.name:
            raise DataStoreError(
                f"data store {self.directory} was made for vocab_size {meta.get('vocab_size')} "
                f"({meta.get('dtype')} tokens), not vocab_size {self.vocab_size} "
                f"({self.dtype.name}): use another directory for another tokenizer")
        if meta.get("val_every") != self.val_every:
            raise DataStoreError(
                f"data store {self.directory} splits 1 in {meta.get('val_every')} documents to "
                f"validation, not 1 in {self.val_every}: the split of a store never changes")

    def _load_index(self) -> int:
        """Read the index, truncating a torn or corrupt tail; returns its good size."""
        path = self._path(INDEX_NAME)
        created = not os.path.exists(path)
        fd = self._index_fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        if created:
            fsync_dir(self.directory)
        good = 0           # byte offset just past the last good record
        bad_at = None      # first torn/corrupt line
        with os.fdopen(os.dup(fd), "rb") as f:
            for number, line in enumerate(f, start=1):
                record = _parse_line(line)
                if bad_at is None:
                    if record is None:
                        bad_at = number
                        continue
                    self._add(self._document(record, path, number))
                    good += len(line)
                elif record is not None:
                    # A crash tears only the tail; a bad record followed by good ones is damage
                    # that truncating would turn into silent data loss.
                    raise DataStoreError(
                        f"{path} is corrupt at line {bad_at} (byte {good}) while later records "
                        "are intact: not a torn tail, refusing to repair automatically")
        size = os.fstat(fd).st_size
        if size > good:
            os.ftruncate(fd, good)
            os.fsync(fd)
            logger.warning("data store %s: dropped a torn index tail of %d bytes (from line %d); "
                           "%d documents remain", self.directory, size - good, bad_at,
                           len(self._docs))
        return good

    def _document(self, record: dict, path: str, number: int) -> Document:
        """A record checked against the index so far: it must extend its split's stream."""
        where = f"{path} line {number}"
        try:
            doc = Document(**{k: record[k] for k in _RECORD_FIELDS})
        except (KeyError, TypeError) as e:
            raise DataStoreError(f"{where}: malformed record ({e})") from None
        if (not isinstance(doc.sha256, str) or not _SHA_RE.match(doc.sha256)
                or doc.split not in SPLITS or not isinstance(doc.tokens, int) or doc.tokens < 1):
            raise DataStoreError(f"{where}: malformed record {record!r}")
        if doc.sha256 in self._by_sha:
            raise DataStoreError(f"{where}: document {doc.sha256} is indexed twice")
        expected = split_of(doc.sha256, self.val_every)
        if doc.split != expected:
            raise DataStoreError(f"{where}: document {doc.sha256} is in split {doc.split!r}, "
                                 f"but its hash puts it in {expected!r}")
        lens = self._lens[doc.split]
        extends = (lens and doc.shard == len(lens) - 1 and doc.offset == lens[-1])
        starts = (doc.shard == len(lens) and doc.offset == 0)
        if not (extends or starts):
            raise DataStoreError(f"{where}: document at shard {doc.shard} offset {doc.offset} "
                                 f"does not continue split {doc.split!r} "
                                 f"({len(lens)} shards, the last of "
                                 f"{lens[-1] if lens else 0} tokens)")
        return doc

    def _add(self, doc: Document) -> None:
        """Record a committed document in memory (callers hold the state lock or are __init__)."""
        lens = self._lens[doc.split]
        if doc.shard == len(lens):
            lens.append(0)
        lens[doc.shard] += doc.tokens
        self._docs.append(doc)
        self._by_sha[doc.sha256] = doc
        docs = self._split_docs[doc.split]
        if doc.tokens >= 2:
            self._eligible[doc.split].append(len(docs))
        docs.append(doc)

    def _repair_shards(self) -> None:
        """Cut every shard to the end its index records (a torn tail: written, never indexed)."""
        removed = False
        on_disk = {}
        for name in os.listdir(self.directory):
            m = _SHARD_RE.match(name)
            if m:
                on_disk[(m.group(1), int(m.group(2)))] = name
        for split in SPLITS:
            for shard, tokens in enumerate(self._lens[split]):
                if (split, shard) not in on_disk:
                    raise DataStoreError(f"data store {self.directory}: shard "
                                         f"{shard_name(split, shard)} is indexed but missing")
        for (split, shard), name in sorted(on_disk.items()):
            path = self._path(name)
            lens = self._lens[split]
            want = (lens[shard] if shard < len(lens) else 0) * self._itemsize
            have = os.path.getsize(path)
            if have < want:
                raise DataStoreError(f"{path} holds {have} bytes but the index records {want}: "
                                     "indexed tokens are missing")
            if want == 0:
                os.unlink(path)
                removed = True
                logger.warning("data store %s: removed %s, written but never indexed (%d bytes)",
                               self.directory, name, have)
            elif have > want:
                with open(path, "r+b") as f:
                    f.truncate(want)
                    f.flush()
                    os.fsync(f.fileno())
                logger.warning("data store %s: truncated %s from %d to %d bytes "
                               "(torn tail: tokens written but never indexed)",
                               self.directory, name, have, want)
        if removed:
            fsync_dir(self.directory)

    # ---- appending ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise DataStoreError(f"data store {self.directory} is closed")

    def _validate(self, tokens, source, sha256, empty_ok: bool = False) -> tuple[np.ndarray, str]:
        if not isinstance(source, str):
            raise TypeError(f"source must be a str, got {type(source).__name__}")
        if not isinstance(sha256, str) or not _SHA_RE.match(sha256.lower()):
            raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {arr.shape} ({source})")
        if arr.size == 0 and not empty_ok:
            raise ValueError(f"refusing an empty document ({source})")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"tokens must be integer ids, got dtype {arr.dtype} ({source})")
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi >= self.vocab_size:
            bad = int(np.flatnonzero((arr < 0) | (arr >= self.vocab_size))[0])
            raise ValueError(f"token id {int(arr[bad])} at position {bad} of {source} is outside "
                             f"the vocabulary [0, {self.vocab_size})")
        return arr.astype(self.dtype, copy=False), sha256.lower()

    def _shard_fd(self, split: str, shard: int) -> int:
        current = self._write_fds.get(split)
        if current and current[0] == shard:
            return current[1]
        if current:
            os.close(current[1])
            del self._write_fds[split]
        path = self._path(shard_name(split, shard))
        created = not os.path.exists(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        if created:
            fsync_dir(self.directory)  # the new name must survive too, not only its bytes
        self._write_fds[split] = (shard, fd)
        return fd

    def append(self, tokens: np.ndarray, *, source: str, sha256: str) -> Document:
        """Store one document; durable on disk when it returns.

        Idempotent on `sha256`: a hash already present returns the stored Document and writes
        nothing (the tokens given are then ignored). The caller appends the end-of-text id.
        """
        data, sha256 = self._validate(tokens, source, sha256)
        return self.append_stream([data], source=source, sha256=sha256, max_tokens=int(data.size))

    def append_stream(self, chunks: Iterable[np.ndarray], *, source: str, sha256: str,
                      max_tokens: int) -> Document:
        """append() of a document that arrives as consecutive id arrays (at most `max_tokens`
        in all: where it lands is chosen before the first arrives), each written as it comes.

        The index names the document only once every chunk is durable, as for append(): a
        crash or an error in between leaves a tail the index does not name, cut at the next
        open (or at once, for an error). Chunks are consumed under the append lock.
        """
        if not isinstance(sha256, str) or not _SHA_RE.match(sha256.lower()):
            raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
        sha256 = sha256.lower()
        max_tokens = _check_int("max_tokens", max_tokens, 1)
        with self._append_lock:
            self._check_open()
            if self._broken:
                raise DataStoreError(f"data store {self.directory} refuses appends after a failed "
                                     f"write ({self._broken}); reopen it to repair")
            existing = self._by_sha.get(sha256)
            if existing is not None:
                return existing
            split = split_of(sha256, self.val_every)
            lens = self._lens[split]
            if not lens:
                shard, offset = 0, 0
            elif lens[-1] + max_tokens > self.shard_tokens:
                shard, offset = len(lens), 0
            else:
                shard, offset = len(lens) - 1, lens[-1]
            fd = None
            n = 0
            try:
                # Order is the crash-safety contract: tokens durable before the index names them.
                fd = self._shard_fd(split, shard)
                for chunk in chunks:
                    data, _ = self._validate(chunk, source, sha256, empty_ok=True)
                    if n + data.size > max_tokens:
                        raise ValueError(f"{source}: more than the {max_tokens} tokens announced")
                    _pwrite_all(fd, np.ascontiguousarray(data).data, (offset + n) * self._itemsize)
                    n += int(data.size)
                if n == 0:
                    raise ValueError(f"refusing an empty document ({source})")
                os.fdatasync(fd)
                doc = Document(sha256=sha256, source=source, split=split, shard=shard,
                               offset=offset, tokens=n, time=time.time())
                payload = json.dumps({k: getattr(doc, k) for k in _RECORD_FIELDS},
                                     ensure_ascii=True, separators=(",", ":")).encode()
                line = _crc_line(payload)
                _pwrite_all(self._index_fd, line, self._index_size)
                os.fdatasync(self._index_fd)
            except BaseException as e:
                self._roll_back(fd, offset, e)
                raise
            self._index_size += len(line)
            with self._state_lock:
                self._add(doc)
            return doc

    def _roll_back(self, fd: int | None, offset: int, error: BaseException) -> None:
        """Undo a failed append so the files end where the index does (else refuse appends)."""
        try:
            os.ftruncate(self._index_fd, self._index_size)
            if fd is not None:
                os.ftruncate(fd, offset * self._itemsize)
        except OSError as e:
            self._broken = f"{error!r}, then rollback failed: {e!r}"
            logger.error("data store %s: %s", self.directory, self._broken)

    # ---- queries ------------------------------------------------------------------------

    def has(self, sha256: str) -> bool:
        return isinstance(sha256, str) and sha256.lower() in self._by_sha

    def get(self, sha256: str) -> Document | None:
        return self._by_sha.get(sha256.lower()) if isinstance(sha256, str) else None

    def documents(self, split: str | None = None) -> list[Document]:
        """Documents in append order, of one split or all."""
        with self._state_lock:
            if split is None:
                return list(self._docs)
            return list(self._split_docs[self._check_split(split)])

    def num_tokens(self, split: str = "train") -> int:
        with self._state_lock:
            return sum(self._lens[self._check_split(split)])

    def stats(self) -> dict:
        """Counts for status displays; bytes are what the store occupies on disk."""
        with self._state_lock:
            shard_bytes = sum(sum(v) for v in self._lens.values()) * self._itemsize
            return {
                "directory": self.directory,
                "vocab_size": self.vocab_size,
                "dtype": self.dtype.name,
                "documents": len(self._docs),
                "documents_per_split": {s: len(self._split_docs[s]) for s in SPLITS},
                "tokens": {s: sum(self._lens[s]) for s in SPLITS},
                "shards": {s: len(self._lens[s]) for s in SPLITS},
                "bytes": shard_bytes + self._index_size
                + os.path.getsize(self._path(META_NAME)),
            }

    def read(self, doc: Document) -> np.ndarray:
        """A document's tokens: a read-only view of the memory map, in the store's dtype."""
        if self._by_sha.get(doc.sha256) != doc:
            raise ValueError(f"{doc!r} is not a document of data store {self.directory}")
        with self._state_lock:
            mm = self._map(doc.split, doc.shard, doc.offset + doc.tokens)
        return mm[doc.offset:doc.offset + doc.tokens]

    @staticmethod
    def _check_split(split) -> str:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return split

    def _map(self, split: str, shard: int, need: int) -> np.memmap:
        """The cached read map of a shard, re-mapped when it must cover `need` tokens it lacks.

        Called with the state lock held; maps only committed tokens, so a concurrent append's
        unindexed bytes are never visible.
        """
        if self._closed:
            raise DataStoreError(f"data store {self.directory} is closed")
        mm = self._maps.get((split, shard))
        if mm is None or mm.shape[0] < need:
            length = self._lens[split][shard]
            mm = np.memmap(self._path(shard_name(split, shard)), dtype=self.dtype, mode="r",
                           shape=(length,))
            self._maps[(split, shard)] = mm
        return mm

    # ---- sampling -----------------------------------------------------------------------

    def has_window(self, block_size: int, split: str = "train") -> bool:
        """Whether some shard of the split holds block_size+1 tokens (one training window)."""
        _check_int("block_size", block_size, 1)
        with self._state_lock:
            return any(n > block_size for n in self._lens[self._check_split(split)])

    def _windows(self, rng: np.random.Generator, count: int, block_size: int, split: str,
                 count_name: str = "batch_size", since: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """`count` windows of block_size+1 tokens, uniform over all valid window starts.

        A shard of L tokens has L - block_size starts; drawing one integer over the sum of
        them and locating its shard picks shards in proportion to their starts, and a window
        never crosses a shard boundary. Consumes exactly one rng.integers call of `count`.
        `since` (a token offset in the split's stream, see num_tokens) admits only windows
        starting at or after it: the newest data; with no such window, all windows count.
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        count = _check_int(count_name, count, 1)
        block_size = _check_int("block_size", block_size, 1)
        self._check_split(split)
        self._check_open()
        with self._state_lock:
            lens = np.array(self._lens[split], dtype=np.int64)
        first = np.zeros_like(lens)                      # first admitted start per shard
        if since > 0:
            shard_offsets = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else lens
            first = np.clip(since - shard_offsets, 0, None)
            if int(np.maximum(lens - block_size - first, 0).sum()) == 0:
                first = np.zeros_like(lens)              # the new data is shorter than a window
        starts = np.maximum(lens - block_size - first, 0)  # valid window starts per shard
        total = int(starts.sum())
        if total == 0:
            raise ValueError(
                f"split {split!r} of data store {self.directory} has no window of "
                f"{block_size + 1} tokens yet (longest shard: {int(lens.max(initial=0))} tokens, "
                f"{len(lens)} shards); add data or use a smaller block_size")
        picks = rng.integers(0, total, size=count)
        ends = np.cumsum(starts)
        shards = np.searchsorted(ends, picks, side="right")  # shard whose range holds the pick
        positions = picks - (ends[shards] - starts[shards]) + first[shards]
        buf = np.empty((count, block_size + 1), dtype=np.int64)
        with self._state_lock:
            maps = {int(s): self._map(split, int(s), int(lens[s])) for s in np.unique(shards)}
        for row, (s, p) in enumerate(zip(shards.tolist(), positions.tolist())):
            buf[row] = maps[s][p:p + block_size + 1]   # a slice: only these pages are read
        for mm in maps.values():
            # Each read maps its neighbours too (fault-around), and those file pages would stay
            # counted in the process's RSS until they covered the whole store. Unmapping them
            # after the copy keeps memory flat; they stay in the page cache, so re-reading is
            # cheap (bench_memory.py: RSS on 100 MB of tokens 1.23x that on 1 MB, then 1.01x).
            mm._mmap.madvise(mmap.MADV_DONTNEED)
        return np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:])

    def sample_batch(self, rng: np.random.Generator, batch_size: int, block_size: int,
                     split: str = "train", since: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Random windows: x, y int64 [B, T] with y[:, t] = x[:, t+1] in the stream.

        Reproducible: the same rng state over the same store gives the same batch; the rng is
        the caller's, so its state can be checkpointed with the model. since > 0 samples only
        windows that start at or after that token offset of the split (the newest documents).
        """
        return self._windows(rng, batch_size, block_size, split, since=since)

    def eval_windows(self, count: int, block_size: int, split: str = "val",
                     seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
        """A fixed evaluation sample: x, y int64 [count, T] drawn with a fresh rng of `seed`.

        The same windows come back on every call while the split has not grown; once documents
        are added to the split the sample is drawn over the larger stream and changes.
        """
        return self._windows(np.random.default_rng(seed), count, block_size, split, "count")

    def padded_batch(self, rng: np.random.Generator, batch_size: int, block_size: int,
                     split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One document per row, padded: x, y int64 [B, T] and mask float32 [B, T].

        Rows are documents drawn uniformly from the split's documents of >= 2 tokens; a row
        holds the first n = min(tokens, T+1) tokens: x[:n-1] = doc[:n-1], y[:n-1] = doc[1:n],
        the rest PAD_ID. mask[t] = 1 where y[t] is a real next token, else 0, so weighting the
        per-position loss by the mask gives padding neither loss nor gradient (and causal
        attention keeps the real positions from seeing the pads after them).
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        batch_size = _check_int("batch_size", batch_size, 1)
        block_size = _check_int("block_size", block_size, 1)
        self._check_split(split)
        self._check_open()
        with self._state_lock:
            eligible = len(self._eligible[split])
        if eligible == 0:
            raise ValueError(f"split {split!r} of data store {self.directory} has no document "
                             "of at least 2 tokens yet")
        picks = rng.integers(0, eligible, size=batch_size)
        with self._state_lock:
            docs = [self._split_docs[split][self._eligible[split][i]] for i in picks.tolist()]
            maps = [self._map(d.split, d.shard, d.offset + d.tokens) for d in docs]
        x = np.full((batch_size, block_size), PAD_ID, dtype=np.int64)
        y = np.full((batch_size, block_size), PAD_ID, dtype=np.int64)
        mask = np.zeros((batch_size, block_size), dtype=np.float32)
        for row, (doc, mm) in enumerate(zip(docs, maps)):
            n = min(doc.tokens, block_size + 1)
            toks = mm[doc.offset:doc.offset + n]
            x[row, :n - 1] = toks[:-1]
            y[row, :n - 1] = toks[1:]
            mask[row, :n - 1] = 1.0
        return x, y, mask

    # ---- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Release files, maps and the lock; idempotent. Arrays already returned stay valid."""
        with self._append_lock:
            if self._closed:
                return
            self._closed = True
            with self._state_lock:
                self._maps.clear()
            for _, fd in self._write_fds.values():
                os.close(fd)
            self._write_fds.clear()
            if self._index_fd >= 0:
                os.close(self._index_fd)
                self._index_fd = -1
            if self._lock_fd >= 0:
                os.close(self._lock_fd)  # closing the descriptor releases the flock
                self._lock_fd = -1

    def __enter__(self) -> DataStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"DataStore({self.directory!r}, vocab_size={self.vocab_size}, "
                f"documents={len(self._docs)})")
