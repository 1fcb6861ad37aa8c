"""Tests of cllmd.datastore on real files, with real subprocesses killed by SIGKILL."""
import hashlib
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest

from cllmd.datastore import (INDEX_NAME, DataStore, DataStoreError, Document, shard_name,
                             split_of)


def sha_in(split: str, i: int) -> str:
    """A unique 64-hex hash whose first 8 digits put the document in `split` (val_every 20)."""
    prefix = 20 * i if split == "val" else 20 * i + 1
    return f"{prefix:08x}" + hashlib.sha256(str(i).encode()).hexdigest()[8:]


def shard_tokens_on_disk(directory, split, shard, dtype):
    return np.fromfile(os.path.join(directory, shard_name(split, shard)), dtype=dtype)


def fill_distinct(store, total, rng, split="train", lo=50, hi=700):
    """Append docs whose tokens, over the whole store, are all distinct (a permutation)."""
    perm = rng.permutation(total)
    pos, i = 0, 0
    while pos < total:
        n = int(min(rng.integers(lo, hi), total - pos))
        store.append(perm[pos:pos + n], source=f"doc{i}", sha256=sha_in(split, 10_000 + i))
        pos += n
        i += 1


def check_windows_in_stream(directory, store, x, y, split="train"):
    """Each row is a slice of one shard (tokens distinct, so x[r, 0] locates it)."""
    check_batches_in_stream(directory, store, [(x, y)], split)


def check_batches_in_stream(directory, store, batches, split="train"):
    where = {}
    shards = []
    for s in range(store.stats()["shards"][split]):
        toks = shard_tokens_on_disk(directory, split, s, store.dtype)
        shards.append(toks)
        for p, t in enumerate(toks.tolist()):
            where[t] = (s, p)
    for x, y in batches:
        T = x.shape[1]
        for r in range(x.shape[0]):
            s, p = where[int(x[r, 0])]
            assert p + T + 1 <= len(shards[s]), "window crosses the end of its shard"
            np.testing.assert_array_equal(x[r], shards[s][p:p + T])
            np.testing.assert_array_equal(y[r], shards[s][p + 1:p + T + 1])


# ---- round trip, split, dtype -----------------------------------------------------------------

def test_datastore_round_trip_after_reopen(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, int(rng.integers(1, 300))) for _ in range(40)]
    shas = [hashlib.sha256(f"text {i}".encode()).hexdigest() for i in range(40)]
    with DataStore(tmp_path, 500, shard_tokens=1000) as store:
        stored = [store.append(d, source=f"file{i}.txt", sha256=s)
                  for i, (d, s) in enumerate(zip(docs, shas))]
        stats = store.stats()
    assert all(isinstance(d, Document) for d in stored)
    with DataStore(tmp_path, 500, shard_tokens=1000) as store:
        assert store.documents() == stored
        for doc, tokens in zip(stored, docs):
            assert store.get(doc.sha256) == doc and store.has(doc.sha256)
            np.testing.assert_array_equal(store.read(doc), tokens)
        assert store.stats() == stats
        assert stats["documents"] == 40
        assert stats["tokens"]["train"] + stats["tokens"]["val"] == sum(len(d) for d in docs)
        assert store.num_tokens("train") == stats["tokens"]["train"]
        assert stats["shards"]["train"] >= 3  # 1000-token shards rolled over
        on_disk = sum(os.path.getsize(tmp_path / n) for n in os.listdir(tmp_path) if n != "lock")
        assert stats["bytes"] == on_disk
        # Each split is one contiguous stream: the documents tile their shards in order.
        for split in ("train", "val"):
            ends = {}
            for doc in store.documents(split):
                assert doc.split == split
                assert doc.offset == ends.get(doc.shard, 0)
                assert doc.tokens <= 1000 or doc.offset == 0
                ends[doc.shard] = doc.offset + doc.tokens
        assert store.get("0" * 64) is None and not store.has("0" * 64)


def test_split_is_stable_and_about_one_in_twenty(tmp_path):
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    splits = [split_of(s) for s in shas]
    assert splits == ["val" if int(s[:8], 16) % 20 == 0 else "train" for s in shas]
    assert 0.035 < splits.count("val") / len(splits) < 0.065
    # The store decides the same way, whatever else is in it and in whatever order.
    with DataStore(tmp_path / "a", 300) as a, DataStore(tmp_path / "b", 300) as b:
        for s in shas[:200]:
            a.append([1, 2], source="x", sha256=s)
        for s in reversed(shas[:200]):
            b.append([3], source="y", sha256=s)
        for s in shas[:200]:
            assert a.get(s).split == b.get(s).split == split_of(s)
    assert split_of(shas[0], 7) == ("val" if int(shas[0][:8], 16) % 7 == 0 else "train")


@pytest.mark.parametrize("vocab, dtype", [(256, np.uint16), (65536, np.uint16),
                                          (65537, np.uint32), (200_000, np.uint32)])
def test_datastore_dtype_follows_vocab_size(tmp_path, vocab, dtype):
    tokens = np.array([0, 1, vocab - 1, vocab // 2])
    with DataStore(tmp_path, vocab) as store:
        doc = store.append(tokens, source="s", sha256=sha_in("train", 1))
        assert store.dtype == np.dtype(dtype)
    path = tmp_path / shard_name("train", 0)
    assert os.path.getsize(path) == 4 * np.dtype(dtype).itemsize
    np.testing.assert_array_equal(np.fromfile(path, dtype=dtype), tokens)
    with DataStore(tmp_path, vocab) as store:
        np.testing.assert_array_equal(store.read(doc), tokens)


# ---- sampling -------------------------------------------------------------------------------

def test_sample_batch_reproducible_and_equals_stored_tokens(tmp_path):
    with DataStore(tmp_path, 100_000, shard_tokens=3000) as store:
        fill_distinct(store, 20_000, np.random.default_rng(1))
        assert store.stats()["shards"]["train"] >= 6
        x1, y1 = store.sample_batch(np.random.default_rng(7), 64, 32)
        x2, y2 = store.sample_batch(np.random.default_rng(7), 64, 32)
        x3, _ = store.sample_batch(np.random.default_rng(8), 64, 32)
        assert x1.dtype == y1.dtype == np.int64 and x1.shape == y1.shape == (64, 32)
        assert x1.flags.c_contiguous and y1.flags.c_contiguous
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
        assert not np.array_equal(x1, x3)
        np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])
        check_windows_in_stream(tmp_path, store, x1, y1)
        # Windows as long as a whole shard allows, and never across a shard boundary.
        x, y = store.sample_batch(np.random.default_rng(9), 200, 2000)
        check_windows_in_stream(tmp_path, store, x, y)
    # A reopened store gives the same batch for the same rng state (resume continues exactly).
    rng = np.random.default_rng(7)
    with DataStore(tmp_path, 100_000, shard_tokens=3000) as store:
        x4, y4 = store.sample_batch(rng, 64, 32)
    np.testing.assert_array_equal(x4, x1)


def test_sample_batch_picks_shards_in_proportion_to_window_starts(tmp_path):
    with DataStore(tmp_path, 1000, shard_tokens=1000) as store:
        # Shards of 1000, 300 and 800 tokens; a token's hundreds digit names its shard.
        for i, (n, base) in enumerate([(1000, 0), (300, 300), (800, 600)]):
            store.append(base + np.arange(n) % 100, source=f"s{i}", sha256=sha_in("train", i))
        assert [d.shard for d in store.documents()] == [0, 1, 2]
        rng = np.random.default_rng(3)
        for block, expected in [(99, [901, 201, 701]), (400, [600, 0, 400])]:
            x, _ = store.sample_batch(rng, 20_000, block)
            counts = np.bincount(x[:, 0] // 300, minlength=3)
            np.testing.assert_allclose(counts / counts.sum(), np.array(expected) / sum(expected),
                                       atol=0.015)
            if expected[1] == 0:
                assert counts[1] == 0  # a shard shorter than a window is never sampled


def _resident_bytes(path):
    """Resident bytes of this process's mappings of `path` (from /proc/self/smaps), or None."""
    rss, found, current = 0, False, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if len(head) >= 5 and "-" in head[0] and ":" not in head[0]:
                current = head[-1] == path  # a mapping header: range perms offset dev inode path
                found |= current
            elif current and head[0] == "Rss:":
                rss += int(head[1]) * 1024
    return rss if found else None


def test_sample_batch_reads_only_windows(tmp_path):
    """A sample of a 16 MiB shard touches its windows, not the shard (flat memory)."""
    n = 4 * 2**20
    vocab = 70_000  # uint32 tokens: a 16 MiB shard
    with DataStore(tmp_path, vocab) as store:
        rng = np.random.default_rng(0)
        for i in range(4):
            store.append(rng.integers(0, vocab, n // 4), source=f"big{i}",
                         sha256=sha_in("train", i))
    path = str(tmp_path / shard_name("train", 0))
    assert os.path.getsize(path) == 4 * n
    with DataStore(tmp_path, vocab) as store:
        # Resident pages of the shard's mapping after one window. The page cache may map a
        # large folio (up to 2 MiB) per fault, so a window costs at most two of them.
        x, y = store.sample_batch(np.random.default_rng(1), 1, 64)
        rss = _resident_bytes(path)
        assert rss is not None and rss <= 2 * 2**21 < 4 * n, rss
        maps = list(store._maps.values())
        assert len(maps) == 1 and isinstance(maps[0], np.memmap)
        tracemalloc.start()
        try:
            x, y = store.sample_batch(np.random.default_rng(2), 8, 64)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Reading the shard would allocate 16 MiB (32 MiB as int64); the windows take 4 KiB.
        assert peak < 256 * 1024, peak
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_eval_windows_fixed_until_split_grows(tmp_path):
    with DataStore(tmp_path, 100_000, shard_tokens=4000) as store:
        fill_distinct(store, 5000, np.random.default_rng(2), split="val")
        x1, y1 = store.eval_windows(16, 20)
        x2, y2 = store.eval_windows(16, 20)
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
        xs, _ = store.sample_batch(np.random.default_rng(1234), 16, 20, split="val")
        np.testing.assert_array_equal(x1, xs)
        check_windows_in_stream(tmp_path, store, x1, y1, split="val")
        assert not np.array_equal(store.eval_windows(16, 20, seed=1)[0], x1)
        store.append(np.arange(90_000, 93_000), source="more", sha256=sha_in("val", 99_999))
        x3, y3 = store.eval_windows(16, 20)
        check_windows_in_stream(tmp_path, store, x3, y3, split="val")
        with pytest.raises(ValueError, match="no window"):
            store.eval_windows(4, 20, split="train")


def test_padded_batch_mask_and_alignment(tmp_path):
    lengths = [1, 2, 5, 9, 10, 30]
    T = 9
    with DataStore(tmp_path, 1000) as store:
        # Document k holds 100k+1, 100k+2, ...: no zeros, and x[r, 0] // 100 names it.
        for k, n in enumerate(lengths):
            store.append(100 * k + 1 + np.arange(n), source=f"d{k}", sha256=sha_in("train", k))
        x, y, mask = store.padded_batch(np.random.default_rng(0), 64, T)
        x2, y2, mask2 = store.padded_batch(np.random.default_rng(0), 64, T)
    assert x.shape == y.shape == mask.shape == (64, T)
    assert x.dtype == y.dtype == np.int64 and mask.dtype == np.float32
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(mask, mask2)
    seen = set()
    for r in range(64):
        k = int(x[r, 0]) // 100
        seen.add(k)
        doc = 100 * k + 1 + np.arange(lengths[k])
        n = min(lengths[k], T + 1)  # tokens the row holds; n - 1 real targets
        np.testing.assert_array_equal(x[r, :n - 1], doc[:n - 1])
        np.testing.assert_array_equal(y[r, :n - 1], doc[1:n])
        np.testing.assert_array_equal(x[r, 1:n - 1], y[r, :n - 2])  # y is x shifted by one
        np.testing.assert_array_equal(mask[r, :n - 1], 1.0)
        np.testing.assert_array_equal(mask[r, n - 1:], 0.0)
        np.testing.assert_array_equal(x[r, n - 1:], 0)  # padding
        np.testing.assert_array_equal(y[r, n - 1:], 0)
    assert seen == {1, 2, 3, 4, 5}  # the 1-token document has no target and is never drawn
    # The mask counts exactly the document's real next-token targets.
    for r in range(64):
        k = int(x[r, 0]) // 100
        assert mask[r].sum() == min(lengths[k], T + 1) - 1


def test_padded_batch_needs_a_document_of_two_tokens(tmp_path):
    with DataStore(tmp_path, 300) as store:
        with pytest.raises(ValueError, match="at least 2 tokens"):
            store.padded_batch(np.random.default_rng(0), 2, 8)
        store.append([5], source="one", sha256=sha_in("train", 0))
        with pytest.raises(ValueError, match="at least 2 tokens"):
            store.padded_batch(np.random.default_rng(0), 2, 8)


def test_sampling_runs_concurrently_with_appends(tmp_path):
    total = 30_000
    perm = np.random.default_rng(5).permutation(total)
    with DataStore(tmp_path, 100_000, shard_tokens=2000) as store:
        store.append(perm[:500], source="seed", sha256=sha_in("train", 0))
        chunks = np.array_split(perm[500:], 60)
        errors, batches = [], []
        done = threading.Event()

        def writer(part):
            try:
                for i in range(part, 60, 2):
                    store.append(chunks[i], source=f"c{i}", sha256=sha_in("train", 1 + i))
            except Exception as e:  # reported by the assertion below
                errors.append(e)

        def reader():
            rng = np.random.default_rng(0)
            try:
                while not done.is_set():
                    batches.append(store.sample_batch(rng, 4, 48))
                    store.padded_batch(rng, 2, 48)
            except Exception as e:
                errors.append(e)

        writers = [threading.Thread(target=writer, args=(p,)) for p in (0, 1)]
        r = threading.Thread(target=reader)
        r.start()
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        done.set()
        r.join()
        assert errors == []
        assert store.num_tokens() == total and len(store.documents()) == 61
        assert batches
        check_batches_in_stream(tmp_path, store, batches)
    with DataStore(tmp_path, 100_000, shard_tokens=2000) as store:
        assert store.num_tokens() == total


# ---- idempotence and crash safety ------------------------------------------------------------

def test_append_duplicate_is_not_stored_twice(tmp_path):
    with DataStore(tmp_path, 300) as store:
        first = store.append([1, 2, 3], source="a.txt", sha256=sha_in("train", 1))
        size = os.path.getsize(tmp_path / INDEX_NAME)
        again = store.append([9, 9], source="copy-of-a.txt", sha256=sha_in("train", 1).upper())
        assert again == first
        assert store.num_tokens() == 3 and len(store.documents()) == 1
        assert os.path.getsize(tmp_path / INDEX_NAME) == size
        assert os.path.getsize(tmp_path / shard_name("train", 0)) == 3 * 2


def test_open_truncates_torn_shard_tail(tmp_path, caplog):
    with DataStore(tmp_path, 300) as store:
        docs = [store.append(np.arange(i, i + 10 * (i + 1)), source=f"d{i}",
                             sha256=sha_in("train", i)) for i in range(3)]
        docs.append(store.append([7, 8, 9], source="v", sha256=sha_in("val", 1)))
    shard = tmp_path / shard_name("train", 0)
    good = os.path.getsize(shard)
    with open(shard, "ab") as f:
        f.write(b"\x01\x02\x03\x04\x05\x06\x07")  # tokens written but never indexed, torn mid-id
    (tmp_path / shard_name("train", 1)).write_bytes(b"\x00" * 10)  # a new shard, never indexed
    with caplog.at_level(logging.WARNING, logger="cllmd.datastore"):
        store = DataStore(tmp_path, 300)
    assert "truncated train-00000.bin" in caplog.text
    assert "removed train-00001.bin" in caplog.text
    assert os.path.getsize(shard) == good
    assert not (tmp_path / shard_name("train", 1)).exists()
    assert store.documents() == docs
    new = store.append([4, 5], source="after", sha256=sha_in("train", 50))
    assert new.offset == good // 2
    np.testing.assert_array_equal(store.read(new), [4, 5])
    store.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cllmd.datastore"):
        with DataStore(tmp_path, 300) as store:
            assert store.documents() == docs + [new]
    assert caplog.text == ""


def test_open_drops_torn_index_tail(tmp_path, caplog):
    with DataStore(tmp_path, 300) as store:
        docs = [store.append(np.full(5 + i, i), source=f"d{i}", sha256=sha_in("train", i))
                for i in range(4)]
    index = tmp_path / INDEX_NAME
    lines = index.read_bytes().splitlines(keepends=True)
    assert len(lines) == 4
    # The crash came while the 4th record was half written: its tokens are in the shard.
    index.write_bytes(b"".join(lines[:3]) + lines[3][:len(lines[3]) // 2])
    with caplog.at_level(logging.WARNING, logger="cllmd.datastore"):
        store = DataStore(tmp_path, 300)
    assert "torn index tail" in caplog.text and "truncated train-00000.bin" in caplog.text
    assert store.documents() == docs[:3]
    assert index.read_bytes() == b"".join(lines[:3])
    assert os.path.getsize(tmp_path / shard_name("train", 0)) == 2 * (5 + 6 + 7)
    assert not store.has(docs[3].sha256)
    redo = store.append(np.full(8, 3), source="d3", sha256=docs[3].sha256)
    assert (redo.shard, redo.offset, redo.tokens) == (docs[3].shard, docs[3].offset, 8)
    store.close()
    with DataStore(tmp_path, 300) as store:
        assert [d.sha256 for d in store.documents()] == [d.sha256 for d in docs]
        np.testing.assert_array_equal(store.read(store.documents()[3]), np.full(8, 3))


def test_open_drops_garbage_index_tail(tmp_path, caplog):
    with DataStore(tmp_path, 300) as store:
        docs = [store.append([i, i + 1], source=f"d{i}", sha256=sha_in("train", i))
                for i in range(2)]
    index = tmp_path / INDEX_NAME
    good = index.read_bytes()
    with open(index, "ab") as f:
        f.write(b"\x00\xffgarbage\n" + b'{"sha256":"00"}\t00000000\n' + b'{"sha256":"1')
    with caplog.at_level(logging.WARNING, logger="cllmd.datastore"):
        with DataStore(tmp_path, 300) as store:
            assert store.documents() == docs
    assert "torn index tail" in caplog.text
    assert index.read_bytes() == good


def test_open_refuses_damage_that_is_not_a_torn_tail(tmp_path):
    with DataStore(tmp_path, 300) as store:
        for i in range(3):
            store.append([1, 2, 3], source=f"d{i}", sha256=sha_in("train", i))
    index = tmp_path / INDEX_NAME
    good = index.read_bytes()
    # A flipped byte in the first record, with intact records after it.
    damaged = good.replace(b'"source":"d0"', b'"source":"dX"', 1)
    index.write_bytes(damaged)
    with pytest.raises(DataStoreError, match="corrupt at line 1"):
        DataStore(tmp_path, 300)
    assert index.read_bytes() == damaged  # left as found, nothing truncated
    # Indexed tokens missing from a shard.
    index.write_bytes(good)
    shard = tmp_path / shard_name("train", 0)
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataStoreError, match="indexed tokens are missing"):
        DataStore(tmp_path, 300)
    shard.write_bytes(data)
    with DataStore(tmp_path, 300) as store:
        assert len(store.documents()) == 3


_DOC_CODE = """
import hashlib
import numpy as np

def make_doc(i):
    rng = np.random.default_rng(i)
    tokens = rng.integers(0, 70_000, int(rng.integers(1, 4000)))
    return tokens, hashlib.sha256(f"doc{i}".encode()).hexdigest()
"""
_namespace: dict = {}
exec(_DOC_CODE, _namespace)
make_doc = _namespace["make_doc"]

_CHILD = _DOC_CODE + """
import sys
from cllmd.datastore import DataStore

store = DataStore(sys.argv[1], 70_000, shard_tokens=20_000)
new = 0
i = 0
while True:
    tokens, sha = make_doc(i)
    fresh = not store.has(sha)
    store.append(tokens, source=f"doc{i}", sha256=sha)
    new += fresh
    if fresh and new == 3:
        print("ready", flush=True)
    i += 1
"""


def test_append_survives_sigkill_at_any_moment(tmp_path):
    directory = str(tmp_path / "store")
    pause = random.Random(11)
    stored = 0
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, directory],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = child.stdout.readline()
        if line != "ready\n":
            child.kill()
            pytest.fail(f"child did not start: {child.communicate()[1]}")
        threading.Event().wait(pause.uniform(0.0, 0.04))
        child.send_signal(signal.SIGKILL)
        child.communicate()
        assert child.returncode == -signal.SIGKILL
        with DataStore(directory, 70_000, shard_tokens=20_000) as store:
            docs = store.documents()
            # A prefix of the sequence the child appended, every document intact.
            assert [d.source for d in docs] == [f"doc{i}" for i in range(len(docs))]
            assert len(docs) >= stored + 3
            for i, doc in enumerate(docs):
                tokens, sha = make_doc(i)
                assert doc.sha256 == sha
                np.testing.assert_array_equal(store.read(doc), tokens)
            for split in ("train", "val"):
                for s, n in enumerate(_shard_lengths(docs, split)):
                    assert os.path.getsize(os.path.join(directory, shard_name(split, s))) == 4 * n
            stored = len(docs)
    assert stored >= 12


def _shard_lengths(docs, split):
    lengths = []
    for d in docs:
        if d.split == split:
            if d.shard == len(lengths):
                lengths.append(0)
            lengths[d.shard] += d.tokens
    return lengths


# ---- refusals ---------------------------------------------------------------------------------

def test_append_rejects_bad_input(tmp_path):
    with DataStore(tmp_path, 300) as store:
        sha = sha_in("train", 1)
        with pytest.raises(ValueError, match=r"token id 300 at position 1 of f\.txt"):
            store.append([1, 300, 2], source="f.txt", sha256=sha)
        with pytest.raises(ValueError, match="token id -1"):
            store.append([-1], source="f.txt", sha256=sha)
        with pytest.raises(ValueError, match="empty document"):
            store.append(np.array([], dtype=np.int64), source="f.txt", sha256=sha)
        with pytest.raises(TypeError, match="integer ids"):
            store.append(np.array([1.0, 2.0]), source="f.txt", sha256=sha)
        with pytest.raises(ValueError, match="1-D"):
            store.append(np.ones((2, 2), dtype=np.int64), source="f.txt", sha256=sha)
        with pytest.raises(ValueError, match="64 hex digits"):
            store.append([1], source="f.txt", sha256="abc")
        with pytest.raises(TypeError, match="source"):
            store.append([1], source=None, sha256=sha)
        assert store.documents() == [] and store.stats()["bytes"] > 0
        assert not os.path.exists(tmp_path / shard_name("train", 0))
        foreign = Document(sha256=sha, source="f.txt", split="train", shard=0, offset=0,
                           tokens=1, time=0.0)
        with pytest.raises(ValueError, match="is not a document of data store"):
            store.read(foreign)


def test_sample_batch_rejects_bad_arguments(tmp_path):
    with DataStore(tmp_path, 300) as store:
        rng = np.random.default_rng(0)
        with pytest.raises(ValueError, match=r"no window of 9 tokens yet"):
            store.sample_batch(rng, 2, 8)
        store.append(np.arange(9), source="a", sha256=sha_in("train", 1))
        assert store.has_window(8) and not store.has_window(9)
        assert not store.has_window(1, split="val")
        store.sample_batch(rng, 2, 8)
        with pytest.raises(ValueError, match="no window of 10 tokens"):
            store.sample_batch(rng, 2, 9)
        with pytest.raises(ValueError, match="split must be one of"):
            store.sample_batch(rng, 2, 8, split="test")
        with pytest.raises(ValueError, match="block_size must be >= 1"):
            store.sample_batch(rng, 2, 0)
        with pytest.raises(ValueError, match="batch_size must be >= 1"):
            store.sample_batch(rng, 0, 4)
        with pytest.raises(TypeError, match="numpy.random.Generator"):
            store.sample_batch(np.random.RandomState(0), 2, 4)
    with pytest.raises(DataStoreError, match="is closed"):
        store.sample_batch(rng, 2, 4)
    with pytest.raises(DataStoreError, match="is closed"):
        store.append([1], source="late", sha256=sha_in("train", 2))


def test_open_refuses_a_store_of_another_vocabulary(tmp_path):
    with DataStore(tmp_path, 300) as store:
        store.append([1, 2], source="a", sha256=sha_in("train", 1))
    with pytest.raises(DataStoreError, match=rf"{tmp_path}.*vocab_size 300 \(uint16"):
        DataStore(tmp_path, 70_000)
    with pytest.raises(DataStoreError, match="vocab_size 300"):
        DataStore(tmp_path, 301)
    with pytest.raises(DataStoreError, match="1 in 20"):
        DataStore(tmp_path, 300, val_every=10)
    with pytest.raises(ValueError, match="vocab_size must be >= 2"):
        DataStore(tmp_path / "new", 1)
    (tmp_path / "meta.json").write_text('{"meta": {"vocab_size": 300}, "crc32": "00000000"}')
    with pytest.raises(DataStoreError, match="meta.json is corrupt"):
        DataStore(tmp_path, 300)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(DataStoreError, match="no meta.json"):
        DataStore(tmp_path, 300)


def test_open_refuses_a_second_opener(tmp_path):
    store = DataStore(tmp_path, 300)
    with pytest.raises(DataStoreError, match=rf"{tmp_path} is already open .*pid {os.getpid()}"):
        DataStore(tmp_path, 300)
    store.close()
    store.close()
    DataStore(tmp_path, 300).close()


def test_datastore_since_samples_only_the_newest_tokens(tmp_path):
    import hashlib
    store = DataStore(tmp_path / "s", vocab_size=1000, shard_tokens=500)
    docs = []
    for i in range(12):  # several shards; token values tell the documents apart
        tokens = np.full(120, i, dtype=np.int64)
        sha = hashlib.sha256(b"doc%d" % i).hexdigest()
        docs.append(store.append(tokens, source=f"d{i}", sha256=sha))
    train = [d for d in docs if d.split == "train"]
    since = store.num_tokens("train") - 2 * 120          # the last two train documents
    newest = {int(store.read(d)[0]) for d in train[-2:]}
    x, y = store.sample_batch(np.random.default_rng(0), 64, 16, since=since)
    assert set(np.unique(x).tolist()) <= newest
    x_all, _ = store.sample_batch(np.random.default_rng(0), 256, 16)
    assert len(set(np.unique(x_all).tolist())) > 2
    # a region shorter than one window falls back to all windows rather than failing
    x_tiny, _ = store.sample_batch(np.random.default_rng(0), 8, 16, since=store.num_tokens("train") - 3)
    assert x_tiny.shape == (8, 16)
    store.close()


def test_append_stream_writes_chunks_as_one_document(tmp_path):
    with DataStore(tmp_path / "s", vocab_size=300, shard_tokens=1000) as ds:
        ds.append(np.arange(600) % 300, source="first", sha256=sha_in("train", 1))
        chunks = [np.arange(i, i + 50) % 300 for i in range(0, 300, 50)] + [np.zeros(0, np.int64)]
        doc = ds.append_stream(iter(chunks), source="streamed", sha256=sha_in("train", 2),
                               max_tokens=450)
        # where it lands is chosen from the bound: 600 + 450 > 1000 starts a new shard
        assert (doc.shard, doc.offset, doc.tokens) == (1, 0, 300)
        np.testing.assert_array_equal(ds.read(doc), np.arange(300) % 300)
        again = ds.append_stream(iter([np.ones(5, np.int64)]), source="x", sha256=sha_in("train", 2),
                                 max_tokens=5)
        assert again == doc   # idempotent on the hash: nothing consumed, nothing written
    with DataStore(tmp_path / "s", vocab_size=300, shard_tokens=1000) as ds:
        assert [d.tokens for d in ds.documents()] == [600, 300]


@pytest.mark.parametrize("failure", ["raises", "too many", "bad id", "empty"])
def test_append_stream_failing_midway_stores_nothing(tmp_path, failure):
    def chunks():
        yield np.arange(100)
        if failure == "raises":
            raise RuntimeError("the text changed")
        yield {"too many": np.arange(200), "bad id": np.array([1, 999]),
               "empty": np.zeros(0, np.int64)}[failure]

    with DataStore(tmp_path / "s", vocab_size=300) as ds:
        ds.append(np.arange(10), source="kept", sha256=sha_in("train", 1))
        gen = chunks() if failure != "empty" else iter([np.zeros(0, np.int64)])
        with pytest.raises((RuntimeError, ValueError)):
            ds.append_stream(gen, source="lost", sha256=sha_in("train", 2), max_tokens=250)
        assert [d.source for d in ds.documents()] == ["kept"]
        assert len(shard_tokens_on_disk(ds.directory, "train", 0, ds.dtype)) == 10   # rolled back
        doc = ds.append_stream(iter([np.arange(7)]), source="next", sha256=sha_in("train", 3),
                               max_tokens=7)
        assert (doc.offset, doc.tokens) == (10, 7)
