"""When the queue tries a file again: attempts are capped, the wait between them doubles.

A file whose ingestion fails for a passing reason (the store unavailable, a full disk) waits in
processing/ and is tried again later; after `max_attempts` it goes to failed/ with the reason.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff: float = 1.0        # seconds before the 2nd attempt, doubling after
    max_backoff: float = 300.0

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be positive")

    def exhausted(self, attempts: int) -> bool:
        return attempts >= self.max_attempts

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1))

    @property
    def after_unexpected(self) -> float:
        # Moving or bookkeeping failed (disk full...): come back later rather than spin on it.
        return self.max_backoff / 5


class RetrySchedule:
    """Which files wait for another attempt, and when (monotonic seconds). Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._at: dict[str, float] = {}

    def schedule(self, name: str, delay: float) -> None:
        with self._lock:
            self._at[name] = time.monotonic() + delay

    def cancel(self, name: str) -> None:
        with self._lock:
            self._at.pop(name, None)

    def due(self) -> list[str]:
        """The names whose time has come, the longest waiting first."""
        now = time.monotonic()
        with self._lock:
            return [n for t, n in sorted((t, n) for n, t in self._at.items() if t <= now)]

    def next_deadline(self) -> float | None:
        with self._lock:
            return min(self._at.values(), default=None)
