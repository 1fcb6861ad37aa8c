"""Tests for cllm.layout, the contract shared by the daemon and its clients: where the
directories are, and how a file enters the queue."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

from cllm import layout
from cllm.durable import is_temp
from cllmd.paths import Dirs


def test_layout_find_socket_order(tmp_path):
    system = tmp_path / "run-cllmd"
    uid = __import__("os").getuid()
    env = {}
    assert layout.find_socket(env=env, system_runtime_dir=str(system)) == \
        f"ipc:///tmp/cllmd-{uid}/cllmd.sock"
    env["XDG_RUNTIME_DIR"] = "/run/user/5"
    assert layout.find_socket(env=env, system_runtime_dir=str(system)) == \
        "ipc:///run/user/5/cllmd/cllmd.sock"
    system.mkdir()
    (system / "cllmd.sock").touch()
    assert layout.find_socket(env=env, system_runtime_dir=str(system)) == \
        f"ipc://{system}/cllmd.sock"
    env["RUNTIME_DIRECTORY"] = "/run/svc:/run/other"
    assert layout.find_socket(env=env, system_runtime_dir=str(system)) == \
        "ipc:///run/svc/cllmd.sock"
    env["CLLM_SOCKET"] = "tcp://10.0.0.1:5555"
    assert layout.find_socket(env=env, system_runtime_dir=str(system)) == "tcp://10.0.0.1:5555"
    assert layout.find_socket("rel/x.sock", env=env) == f"ipc://{Path('rel/x.sock').resolve()}"


def test_layout_runtime_dir_and_endpoints():
    uid = __import__("os").getuid()
    assert str(layout.runtime_dir({})) == f"/tmp/cllmd-{uid}"
    assert str(layout.runtime_dir({"XDG_RUNTIME_DIR": "/run/user/1"})) == "/run/user/1/cllmd"
    assert str(layout.runtime_dir({"RUNTIME_DIRECTORY": "/run/cllmd",
                                   "XDG_RUNTIME_DIR": "/x"})) == "/run/cllmd"
    assert layout.endpoints("/run/cllmd") == ("ipc:///run/cllmd/cllmd.sock",
                                            "ipc:///run/cllmd/cllmd-events.sock")
    assert layout.events_endpoint_for("ipc:///a/b/cllmd.sock") == "ipc:///a/b/cllmd-events.sock"
    assert layout.events_endpoint_for("tcp://h:1") is None


def test_layout_daemon_and_clients_resolve_the_same_directories(tmp_path):
    # cllmd.paths (the daemon), cllm.layout.find_socket / find_queue_dir (the clients) and the
    # numba cache of cllmd.kernels agree for every environment.
    absent = tmp_path / "no-system"
    envs = [{"HOME": str(tmp_path)},
            {"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "st"),
             "XDG_RUNTIME_DIR": str(tmp_path / "rt"), "XDG_CACHE_HOME": str(tmp_path / "ca")},
            {"HOME": str(tmp_path), "XDG_STATE_HOME": "relative/ignored"},
            {"HOME": str(tmp_path), "STATE_DIRECTORY": "/var/lib/x:/var/lib/y",
             "RUNTIME_DIRECTORY": "/run/x", "CACHE_DIRECTORY": "/var/cache/x"}]
    for env in envs:
        dirs = Dirs.resolve(env=env, system_config=absent)
        assert layout.find_socket(env=env, system_runtime_dir=absent) == dirs.socket_endpoint
        assert layout.find_queue_dir(env=env, system_state_dir=absent) == dirs.queue
        assert layout.cache_dir(env) == dirs.cache
    assert Dirs.resolve(env=envs[2], system_config=absent).state == tmp_path / ".local/state/cllmd"
    assert Dirs.resolve(env=envs[3], system_config=absent).state == Path("/var/lib/x")


def test_layout_find_queue_dir_prefers_a_writable_system_queue(tmp_path):
    system = tmp_path / "var-lib-cllmd"
    env = {"HOME": str(tmp_path)}
    assert layout.find_queue_dir(env, system) == tmp_path / ".local/state/cllmd/queue"
    (system / "queue").mkdir(parents=True)
    assert layout.find_queue_dir(env, system) == system / "queue"
    assert layout.find_queue_dir({**env, "STATE_DIRECTORY": "/s"}, system) == Path("/s/queue")


def test_layout_candidates_keep_the_extension_and_fit_the_file_system():
    assert list(zip(range(3), layout.candidates("notes.txt")))[2][1] == "notes-2.txt"
    assert next(iter(layout.candidates("README"))) == "README"
    assert [c for _, c in zip(range(2), layout.candidates(".bashrc"))] == [".bashrc", ".bashrc-1"]
    long = "é" * 200 + ".md"
    for _, c in zip(range(12), layout.candidates(long, 100)):
        assert len(c.encode()) <= 100 and c.endswith(".md")
    assert layout.sanitize_name("../a/b\nc") == "_a_b_c"  # no leading dot, no slash
    assert layout.sanitize_name("...") == "unnamed"


def test_layout_write_incoming_never_replaces_and_leaves_no_temporary(tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    assert layout.write_incoming(incoming, "notes.txt", b"one") == "notes.txt"
    assert layout.write_incoming(incoming, "notes.txt", b"two") == "notes-1.txt"
    assert layout.write_incoming(incoming, "README", b"three") == "README"
    assert layout.write_incoming(incoming, "README", b"four") == "README-1"
    assert sorted(os.listdir(incoming)) == ["README", "README-1", "notes-1.txt", "notes.txt"]
    assert (incoming / "notes.txt").read_bytes() == b"one"
    assert (incoming / "notes-1.txt").read_bytes() == b"two"
    # the daemon (another user of the queue's group) must be able to read it
    assert stat.S_IMODE(os.stat(incoming / "notes.txt").st_mode) == layout.QUEUE_FILE_MODE


def test_layout_concurrent_writers_of_one_name_each_get_their_own_file(tmp_path):
    # Real processes racing on the same name: every file arrives whole, none is replaced.
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from cllm.layout import write_incoming
        for i in range(20):
            write_incoming(Path({str(incoming)!r}), "same.txt", f"{{sys.argv[1]}}-{{i}}".encode())
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)]) for w in range(4)]
    assert all(p.wait() == 0 for p in procs)
    names = os.listdir(incoming)
    assert not [n for n in names if is_temp(n)]
    contents = sorted((incoming / n).read_text() for n in names)
    assert contents == sorted(f"{w}-{i}" for w in range(4) for i in range(20))
