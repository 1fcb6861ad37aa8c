"""AdamW over the model's flat parameter buffer, global-norm clipping and the learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cllmd.kernels.adamw import adamw_update


@dataclass(frozen=True)
class Schedule:
    """Linear warmup to lr, then cosine decay to min_lr until decay_end_step; min_lr afterwards.

    lr is the immutable base rate: the rate at a step is always computed from it, never
    from the previous step's rate (the original's warmup pinned itself at 1e-6 that way).
    The values are checked where they are set (TrainConfig, against the settings catalogue).
    """
    lr: float
    min_lr: float
    warmup: int
    decay_end_step: int   # the step at which the cosine reaches min_lr

    def __call__(self, step: int) -> float:
        """Rate for step (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if step >= self.decay_end_step:
            return self.min_lr
        ratio = (step - self.warmup) / max(1, self.decay_end_step - self.warmup)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.lr - self.min_lr)


def global_norm(grad_flat: np.ndarray) -> float:
    # BLAS dot in the working dtype: no float64 copy of the whole buffer; NaN/Inf propagate
    return math.sqrt(float(np.dot(grad_flat, grad_flat)))


def clip_by_global_norm(grad_flat: np.ndarray, max_norm: float) -> float:
    """Scales the gradient in place so its global L2 norm is at most max_norm; returns the norm before."""
    norm = global_norm(grad_flat)
    if max_norm > 0 and norm > max_norm:
        grad_flat *= grad_flat.dtype.type(max_norm / (norm + 1e-6))
    return norm


class AdamW:
    """AdamW with moments laid out like the parameters; decay only on 2-D weights.

    The parameter table is cut into contiguous segments of equal decay, and those into pieces
    of at most PIECE elements, so the numba kernel runs over a few long ranges that a thread
    pool can share (the update is element-wise: any split gives the same bits).
    """

    PIECE = 1 << 16

    def __init__(self, flat: np.ndarray, table, *, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8):
        self.flat = flat
        self.m = np.zeros_like(flat)
        self.v = np.zeros_like(flat)
        self.weight_decay = weight_decay
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.step_count = 0  # number of updates applied (Adam's t)
        self.segments: list[tuple[int, int, bool]] = []
        offset = 0
        for _, shape in table:
            n = math.prod(shape)
            decay = len(shape) == 2
            if self.segments and self.segments[-1][2] == decay and self.segments[-1][1] == offset:
                start, _, _ = self.segments.pop()
                self.segments.append((start, offset + n, decay))
            else:
                self.segments.append((offset, offset + n, decay))
            offset += n
        self.pieces = [(a, min(a + self.PIECE, end), decay) for start, end, decay in self.segments
                       for a in range(start, end, self.PIECE)]

    def step(self, grad_flat: np.ndarray, lr: float, grad_scale: float = 1.0, run=None) -> None:
        """One update with the gradient grad_scale * grad_flat. run: a callable that runs a list
        of callables and returns when all are done (a thread pool's run); None runs them here."""
        self.step_count += 1
        step = self.step_count

        def piece(a, b, decay):
            adamw_update(self.flat[a:b], grad_flat[a:b], self.m[a:b], self.v[a:b], lr, self.beta1, self.beta2,
                         self.eps, self.weight_decay if decay else 0.0, step, grad_scale)

        tasks = [lambda p=p: piece(*p) for p in self.pieces]
        if run is None:
            for task in tasks:
                task()
        else:
            run(tasks)

    def state(self) -> dict:
        return {"step_count": self.step_count, "weight_decay": self.weight_decay,
                "betas": [self.beta1, self.beta2], "eps": self.eps}

    def load_state(self, state: dict, m: np.ndarray, v: np.ndarray) -> None:
        self.step_count = int(state["step_count"])
        self.m[...] = m
        self.v[...] = v
