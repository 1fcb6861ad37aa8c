"""Where the trainer's tokens come from: the TokenSource protocol and two of its three kinds.

A TokenSource hands out training windows and fixed evaluation windows by split. Three kinds:
the data store (cllmd.datastore.DataStore, memory-mapped shards), TokenArraySource (tokens held
in two arrays, for offline training) and ReplayMix (the daemon's view of the store: new
documents mixed with replayed old ones).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

Batch = tuple[np.ndarray, np.ndarray]   # x, y int64 [B, T], y[:, t] = x[:, t+1] in the stream


@runtime_checkable
class TokenSource(Protocol):
    def num_tokens(self, split: str = "train") -> int:
        """Tokens in the split."""

    def has_window(self, block_size: int, split: str = "train") -> bool:
        """Whether the split holds at least one window of block_size + 1 tokens."""

    def sample_batch(self, rng: np.random.Generator, batch_size: int, block_size: int,
                     split: str = "train") -> Batch:
        """batch_size random windows of the split."""

    def eval_windows(self, count: int, block_size: int, split: str = "val",
                     seed: int = 1234) -> Batch:
        """A fixed sample (same seed, same windows), so evaluations compare across steps."""


@runtime_checkable
class DocumentSource(TokenSource, Protocol):
    """A source that knows where documents begin: one document per row (TrainConfig.padded)."""

    def padded_batch(self, rng: np.random.Generator, batch_size: int, block_size: int,
                     split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, y int64 [B, T] and a float32 loss mask [B, T]."""


class TokenArraySource:
    """`cllmd train` on a few files keeps their tokens in two arrays and splits them contiguously
    (the last val_fraction to validation, as nanoGPT does), so benchmark figures compare
    directly."""

    def __init__(self, tokens: np.ndarray, val_fraction: float = 0.1):
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        tokens = np.asarray(tokens)
        cut = int(len(tokens) * (1.0 - val_fraction))
        self.splits = {"train": tokens[:cut], "val": tokens[cut:]}

    def num_tokens(self, split: str = "train") -> int:
        return len(self.splits[split])

    def has_window(self, block_size: int, split: str = "train") -> bool:
        return len(self.splits[split]) >= block_size + 1

    def _windows(self, starts: np.ndarray, block_size: int, split: str) -> Batch:
        data = self.splits[split]
        rows = data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)  # (B, T+1)
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def sample_batch(self, rng: np.random.Generator, batch_size: int, block_size: int,
                     split: str = "train") -> Batch:
        if not self.has_window(block_size, split):
            raise ValueError(f"the {split} split has {len(self.splits[split])} tokens, "
                             f"fewer than one window of {block_size + 1}")
        starts = rng.integers(0, len(self.splits[split]) - block_size, size=batch_size)
        return self._windows(starts, block_size, split)

    def eval_windows(self, count: int, block_size: int, split: str = "val",
                     seed: int = 1234) -> Batch:
        if not self.has_window(block_size, split):
            split = "train"  # tiny corpora: evaluate on training text rather than not at all
        return self.sample_batch(np.random.default_rng(seed), count, block_size, split)


class ReplayMix:
    """The trainer's view of the data store: while new data is being learned, a share of every
    batch comes from the newest documents and the rest is replayed from everything, so earlier
    knowledge is not forgotten. Otherwise it samples the whole store uniformly."""

    def __init__(self, store: DocumentSource, replay_fraction: float):
        self.store = store
        self.replay_fraction = replay_fraction
        self.since = 0          # token offset of the newest data in the train stream; 0 = none

    def fresh_rows(self, batch_size: int) -> int:
        return max(1, batch_size - int(round(batch_size * self.replay_fraction)))

    def num_tokens(self, split: str = "train") -> int:
        return self.store.num_tokens(split)

    def has_window(self, block_size: int, split: str = "train") -> bool:
        return self.store.has_window(block_size, split)

    def sample_batch(self, rng: np.random.Generator, batch_size: int, block_size: int,
                     split: str = "train") -> Batch:
        if not self.since or split != "train":
            return self.store.sample_batch(rng, batch_size, block_size, split)
        fresh = self.fresh_rows(batch_size)
        x, y = self.store.sample_batch(rng, fresh, block_size, split, since=self.since)
        if fresh == batch_size:
            return x, y
        xr, yr = self.store.sample_batch(rng, batch_size - fresh, block_size, split)
        return np.concatenate([x, xr]), np.concatenate([y, yr])

    def eval_windows(self, count: int, block_size: int, split: str = "val",
                     seed: int = 1234) -> Batch:
        return self.store.eval_windows(count, block_size, split, seed)

    def padded_batch(self, rng: np.random.Generator, batch_size: int, block_size: int,
                     split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.store.padded_batch(rng, batch_size, block_size, split)
