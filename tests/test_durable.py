"""Tests for cllm.durable: whole-or-nothing replacement, modes, and the sweep of crash leftovers."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from cllm.durable import (atomic_file, atomic_path, atomic_write, fsync_dir, is_temp,
                          sweep_temps, temp_path)


def test_durable_atomic_file_exception_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(path) as f:
            f.write(b"new partial contents" * 1000)
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["state.bin"]


def test_durable_atomic_write_replaces_content(tmp_path):
    path = tmp_path / "index.json"
    atomic_write(path, b"one")
    assert path.read_bytes() == b"one"
    atomic_write(path, lambda f: f.write(b"two"))
    assert path.read_bytes() == b"two"
    atomic_write(path, "dré")
    assert path.read_text(encoding="utf-8") == "dré"
    assert os.listdir(tmp_path) == ["index.json"]


def test_durable_modes_are_exact_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "private", b"x")
        atomic_write(tmp_path / "shared", b"x", mode=0o640)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "shared").st_mode) == 0o640


def test_durable_atomic_path_for_writers_that_take_a_name(tmp_path):
    path = tmp_path / "history"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and is_temp(tmp.name)
        tmp.write_text("line\n")
    assert path.read_text() == "line\n"
    with pytest.raises(OSError):
        with atomic_path(path) as tmp:
            tmp.write_text("partial")
            raise OSError("disk full")
    assert path.read_text() == "line\n" and os.listdir(tmp_path) == ["history"]


def test_durable_sweep_removes_a_killed_writers_temp_file_only(tmp_path):
    # A real crash: a child process killed by SIGKILL in the middle of atomic_write.
    target = tmp_path / "checkpoint.cllm"
    target.write_bytes(b"previous")
    (tmp_path / ".hidden-but-not-ours").write_bytes(b"keep")
    code = textwrap.dedent(f"""
        import os, signal
        from cllm.durable import atomic_write
        def write(f):
            f.write(b"half" * 1000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write({str(target)!r}, write)
    """)
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    left = [n for n in os.listdir(tmp_path) if is_temp(n)]
    assert len(left) == 1
    assert sweep_temps(tmp_path) == {left[0]: 4000}
    assert sorted(os.listdir(tmp_path)) == [".hidden-but-not-ours", "checkpoint.cllm"]
    assert target.read_bytes() == b"previous"
    assert sweep_temps(tmp_path / "absent") == {}


def test_durable_temp_names_are_fresh_and_recognised(tmp_path):
    a, b = temp_path(tmp_path / "x"), temp_path(tmp_path / "x")
    assert a != b and is_temp(a.name) and not is_temp("x") and not is_temp(".x.part")
    fsync_dir(tmp_path)  # a directory can be fsynced
