"""Tests for cllmd.retry: capped attempts, doubling waits, and the schedule of due files."""

import time

import pytest

from cllmd.retry import RetryPolicy, RetrySchedule


def test_retry_policy_doubles_up_to_the_cap_and_counts_attempts():
    p = RetryPolicy(3, backoff=0.5, max_backoff=1.5)
    assert [p.delay(a) for a in (1, 2, 3, 4)] == [0.5, 1.0, 1.5, 1.5]
    assert not p.exhausted(2) and p.exhausted(3)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(0)


def test_retry_schedule_gives_due_names_longest_waiting_first():
    s = RetrySchedule()
    assert s.due() == [] and s.next_deadline() is None
    s.schedule("late", 0.05)
    s.schedule("b", 0.0)
    s.schedule("a", 0.0)
    assert set(s.due()) == {"a", "b"}
    s.cancel("a")
    assert s.due() == ["b"]
    deadline = s.next_deadline()
    assert deadline is not None and deadline <= time.monotonic() + 0.05
    time.sleep(0.06)
    assert s.due() == ["b", "late"]
