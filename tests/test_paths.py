"""Directory resolution (flag > systemd > XDG), derived paths and ensure()."""

import os
import stat
from pathlib import Path

import pytest

from cllmd.paths import Dirs, PathsError


def test_dirs_resolve_flags_beat_systemd_and_xdg(tmp_path):
    env = {"STATE_DIRECTORY": "/var/lib/cllmd", "RUNTIME_DIRECTORY": "/run/cllmd",
           "CACHE_DIRECTORY": "/var/cache/cllmd", "XDG_STATE_HOME": "/x/state",
           "XDG_RUNTIME_DIR": "/x/run", "XDG_CACHE_HOME": "/x/cache", "HOME": "/home/u"}
    conf = tmp_path / "my.toml"
    d = Dirs.resolve(state_dir=tmp_path / "s", runtime_dir=tmp_path / "r", cache_dir=tmp_path / "c",
                     config=conf, env=env)
    assert (d.state, d.runtime, d.cache, d.config_file) == (
        tmp_path / "s", tmp_path / "r", tmp_path / "c", conf)


def test_dirs_resolve_systemd_takes_first_of_list(tmp_path):
    env = {"STATE_DIRECTORY": "/var/lib/cllmd:/var/lib/other", "RUNTIME_DIRECTORY": "/run/cllmd",
           "CACHE_DIRECTORY": "/var/cache/cllmd:/x", "XDG_STATE_HOME": "/x/state", "HOME": "/h"}
    d = Dirs.resolve(env=env, system_config=tmp_path / "absent.toml")
    assert d.state == Path("/var/lib/cllmd")
    assert d.runtime == Path("/run/cllmd")
    assert d.cache == Path("/var/cache/cllmd")
    assert d.config_file is None


def test_dirs_resolve_xdg_and_home_defaults(tmp_path):
    env = {"XDG_STATE_HOME": "/x/state", "XDG_RUNTIME_DIR": "/run/user/7",
           "XDG_CACHE_HOME": "/x/cache", "HOME": "/home/u"}
    d = Dirs.resolve(env=env, system_config=tmp_path / "absent.toml")
    assert (d.state, d.runtime, d.cache) == (
        Path("/x/state/cllmd"), Path("/run/user/7/cllmd"), Path("/x/cache/cllmd"))
    # Unset or relative XDG values (invalid per the spec) fall back to the home defaults.
    d = Dirs.resolve(env={"HOME": "/home/u", "XDG_STATE_HOME": "rel/state"},
                     system_config=tmp_path / "absent.toml")
    assert d.state == Path("/home/u/.local/state/cllmd")
    assert d.cache == Path("/home/u/.cache/cllmd")
    assert d.runtime == Path(f"/tmp/cllmd-{os.getuid()}")


def test_dirs_resolve_config_order(tmp_path):
    system = tmp_path / "etc" / "cllmd.toml"
    confdir = tmp_path / "confdir"
    confdir.mkdir()
    env = {"HOME": str(tmp_path), "CONFIGURATION_DIRECTORY": f"{confdir}:/elsewhere"}
    # Nothing present anywhere: no configuration file.
    assert Dirs.resolve(env=env, system_config=system).config_file is None
    system.parent.mkdir()
    system.write_text("")
    assert Dirs.resolve(env=env, system_config=system).config_file == system
    (confdir / "cllmd.toml").write_text("")
    assert Dirs.resolve(env=env, system_config=system).config_file == confdir / "cllmd.toml"
    flag = tmp_path / "flag.toml"
    assert Dirs.resolve(config=flag, env=env, system_config=system).config_file == flag


def test_dirs_derived_paths():
    d = Dirs(state=Path("/s"), runtime=Path("/r"), cache=Path("/c"), config_file=None)
    assert d.socket == Path("/r/cllmd.sock")
    assert d.events_socket == Path("/r/cllmd-events.sock")
    assert d.socket_endpoint == "ipc:///r/cllmd.sock"
    assert d.events_endpoint == "ipc:///r/cllmd-events.sock"
    assert (d.queue, d.models, d.active_model_file, d.lock) == (
        Path("/s/queue"), Path("/s/models"), Path("/s/active-model"), Path("/s/cllmd.lock"))
    m = d.model_dir("gpt2")
    assert (m.model, m.checkpoints, m.checkpoint, m.data) == (
        Path("/s/models/gpt2/model.cllm"), Path("/s/models/gpt2/checkpoints"),
        Path("/s/models/gpt2/checkpoints/latest.cllm"), Path("/s/models/gpt2/data"))


def test_dirs_ensure_creates_with_mode_0750(tmp_path):
    old = os.umask(0o077)  # the mode must not depend on the caller's umask
    try:
        d = Dirs(state=tmp_path / "a" / "state", runtime=tmp_path / "run", cache=tmp_path / "cache",
                 config_file=None)
        d.ensure()
        d.ensure()  # idempotent
    finally:
        os.umask(old)
    for p in (d.state, d.runtime, d.cache):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o750, p
    for p in (d.queue, d.models):
        assert p.is_dir()


def test_dirs_ensure_refuses_writable_runtime_in_world_writable_parent(tmp_path):
    public = tmp_path / "public"
    public.mkdir()
    os.chmod(public, 0o1777)  # like /tmp
    planted = public / "cllmd-0"
    planted.mkdir()
    os.chmod(planted, 0o777)
    d = Dirs(state=tmp_path / "s", runtime=planted, cache=tmp_path / "c", config_file=None)
    with pytest.raises(PathsError, match="writable by group or others"):
        d.ensure()
    os.chmod(planted, 0o700)
    d.ensure()


def test_dirs_ensure_refuses_file_in_the_way(tmp_path):
    (tmp_path / "state").write_text("not a dir")
    d = Dirs(state=tmp_path / "state", runtime=tmp_path / "r", cache=tmp_path / "c",
             config_file=None)
    with pytest.raises(PathsError, match="state"):
        d.ensure()


def test_dirs_ensure_tightens_existing_directories_and_keeps_data_private(tmp_path):
    # Issue 11, F9: made by hand (umask 022) or by an older version, they were world-readable.
    d = Dirs(state=tmp_path / "state", runtime=tmp_path / "run", cache=tmp_path / "cache",
             config_file=None)
    md = d.model_dir("default")
    dirs = (d.state, d.runtime, d.cache, d.queue, d.models, md.root, md.checkpoints, md.data)
    for p in dirs:
        p.mkdir(parents=True, exist_ok=True)
        os.chmod(p, 0o755)
    d.ensure()
    md.ensure()
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(os.stat(p).st_mode) for p in dirs}
    assert modes == {"state": 0o750, "run": 0o750, "cache": 0o750, "state/queue": 0o750,
                     "state/models": 0o700, "state/models/default": 0o700,
                     "state/models/default/checkpoints": 0o700, "state/models/default/data": 0o700}
    os.chmod(md.data, 0o500)  # an administrator's tighter mode is never loosened
    md.ensure()
    assert stat.S_IMODE(os.stat(md.data).st_mode) == 0o500
    os.chmod(md.data, 0o700)
