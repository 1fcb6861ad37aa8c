"""One daemon per state directory: the flock is checked against real second processes."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cllmd.lockfile import AlreadyRunning, StateLock

TRY_LOCK = textwrap.dedent("""
    import sys
    from cllmd.lockfile import AlreadyRunning, StateLock
    try:
        StateLock(sys.argv[1]).acquire()
    except AlreadyRunning as e:
        print(e)
        sys.exit(3)
    print("locked")
""")

HOLD_LOCK = textwrap.dedent("""
    import sys
    from cllmd.lockfile import StateLock
    lock = StateLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold until the parent closes our stdin or kills us
""")


def try_lock_in_child(state_dir):
    return subprocess.run([sys.executable, "-c", TRY_LOCK, str(state_dir)],
                          capture_output=True, text=True, timeout=60)


def test_statelock_second_process_refused_with_pid_and_dir(tmp_path):
    with StateLock(tmp_path) as lock:
        assert lock.held
        assert (tmp_path / "cllmd.lock").read_text() == f"{os.getpid()}\n"
        child = try_lock_in_child(tmp_path)
        assert child.returncode == 3, child.stderr
        assert child.stdout.strip() == (
            f"another cllmd (pid {os.getpid()}) is already using {tmp_path}")
    # Released: the next daemon may start.
    child = try_lock_in_child(tmp_path)
    assert (child.returncode, child.stdout.strip()) == (0, "locked")


def test_statelock_freed_when_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(AlreadyRunning) as e:
            StateLock(tmp_path).acquire()
        assert e.value.pid == holder.pid
        assert str(e.value) == f"another cllmd (pid {holder.pid}) is already using {tmp_path}"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # The kernel dropped the lock with the process; the stale pid in the file does not matter.
    lock = StateLock(tmp_path)
    lock.acquire()
    assert (tmp_path / "cllmd.lock").read_text() == f"{os.getpid()}\n"
    lock.release()
    assert not lock.held


def test_statelock_same_process_twice_refused(tmp_path):
    # flock belongs to the open file: a second StateLock in the same process conflicts too.
    with StateLock(tmp_path):
        with pytest.raises(AlreadyRunning, match="already using"):
            StateLock(tmp_path).acquire()
