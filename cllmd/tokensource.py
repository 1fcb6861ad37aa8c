"""An in-memory token source with the data store's sampling interface, for offline training.

`cllmd train` on a few files keeps their tokens in two arrays and splits them contiguously
(the last val_fraction to validation, as nanoGPT does), so benchmark figures compare directly.
"""
from __future__ import annotations

import numpy as np


class TokenArraySource:
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

    def _windows(self, starts: np.ndarray, block_size: int, split: str):
        data = self.splits[split]
        rows = data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)  # (B, T+1)
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def sample_batch(self, rng: np.random.Generator, batch_size: int, block_size: int, split: str = "train"):
        if not self.has_window(block_size, split):
            raise ValueError(f"the {split} split has {len(self.splits[split])} tokens, "
                             f"fewer than one window of {block_size + 1}")
        starts = rng.integers(0, len(self.splits[split]) - block_size, size=batch_size)
        return self._windows(starts, block_size, split)

    def eval_windows(self, count: int, block_size: int, split: str = "val", seed: int = 1234):
        """A fixed sample (same seed, same windows) so evaluations compare across steps."""
        if not self.has_window(block_size, split):
            split = "train"  # tiny corpora: evaluate on training text rather than not at all
        return self.sample_batch(np.random.default_rng(seed), count, block_size, split)
