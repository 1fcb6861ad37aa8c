"""packaging/install.sh (staged with --destdir, then --uninstall) and the Debian package."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

try:  # tests/ is a package when it has an __init__.py, a plain directory otherwise
    from .test_systemd import DEB_PYTHON, package_stage, stage_cache_root
except ImportError:
    from test_systemd import DEB_PYTHON, package_stage, stage_cache_root

ROOT = Path(__file__).resolve().parent.parent
INSTALL_SH = ROOT / "packaging" / "install.sh"
BUILD_DEB = ROOT / "packaging" / "build-deb.sh"
DEBIAN = ROOT / "packaging" / "debian"
COMMANDS = ("cllmd", "cllm", "cllm-status", "cllm-http")
HANG_GUARD = 600


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", HANG_GUARD)
    return subprocess.run([str(c) for c in cmd], **kw)


def install(*args) -> subprocess.CompletedProcess:
    r = run(["bash", INSTALL_SH, *args])
    assert r.returncode == 0, f"install.sh {' '.join(map(str, args))} failed:\n{r.stdout}\n{r.stderr}"
    return r


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, mode and content (or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def populate(stage: Path) -> None:
    # What a real system has before the install: other commands, other configs and units.
    for rel, text in {"usr/local/bin/other-tool": "#!/bin/sh\n",
                      "usr/local/lib/systemd/system/other.service": "[Service]\nExecStart=/bin/true\n",
                      "etc/other.conf": "x = 1\n", "opt/other/keep": "keep\n"}.items():
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage / rel).write_text(text)


def need_python() -> None:
    if not Path(DEB_PYTHON).exists():
        pytest.skip(f"{DEB_PYTHON} not found (Debian package python3.11, with python3.11-venv)")


# --------------------------------------------------------------------------------------------
# install.sh


def test_install_rejects_bad_arguments(tmp_path):
    for args, message in ((["--layout", "rpm"], "--layout must be"),
                          (["--prefix", "relative/dir"], "--prefix must be an absolute path"),
                          (["--prefix", "/home/me/cllmd"], "ProtectHome=yes"),
                          (["--python", "/nonexistent/python3"], "not found"),
                          (["--purge"], "--purge only goes with --uninstall"),
                          (["--frobnicate"], "unknown argument: --frobnicate")):
        r = run(["bash", INSTALL_SH, "--destdir", tmp_path / "s", *args])
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
    r = run(["bash", INSTALL_SH, "--uninstall", "--destdir", tmp_path / "empty"])
    assert r.returncode != 0 and "no cllmd install found" in r.stderr


def test_install_then_uninstall_leaves_the_stage_as_found(tmp_path):
    need_python()
    stage = tmp_path / "stage"
    populate(stage)
    # State left by an earlier install: the model and the queue outlive an uninstall.
    (stage / "var/lib/cllmd/queue/done").mkdir(parents=True)
    (stage / "var/lib/cllmd/model.cllm").write_bytes(b"weights")
    before = snapshot(stage)

    out = install("--destdir", stage, "--python", DEB_PYTHON).stdout
    assert "usermod -aG cllm" in out and "nothing outside it was touched" in out
    venv = stage / "opt/cllmd"
    for cmd in COMMANDS:
        link = stage / "usr/local/bin" / cmd
        assert os.readlink(link) == f"/opt/cllmd/bin/{cmd}"
        # The scripts name the final interpreter, not the stage.
        assert (venv / "bin" / cmd).read_text().splitlines()[0] == "#!/opt/cllmd/bin/python"
    assert "/opt/cllmd" in (venv / "pyvenv.cfg").read_text()
    leaked = run(["grep", "-rlIF", str(stage), venv]).stdout
    assert leaked == "", f"files naming the stage:\n{leaked}"
    for name in ("cllmd.service", "cllm-http.service"):
        unit = (stage / "usr/local/lib/systemd/system" / name).read_text()
        assert unit == (ROOT / "systemd" / name).read_text()
    assert (stage / "usr/local/lib/sysusers.d/cllmd.conf").read_text() == \
        (ROOT / "systemd/cllmd.sysusers").read_text()
    assert (stage / "etc/cllmd/cllmd.toml").read_text() == (ROOT / "systemd/cllmd.toml").read_text()
    # A real environment of this tree, with its dependencies, on the system's python.
    r = run([venv / "bin/python", "-I", "-c",
             "import sys, cllmd, cllm, numba, numpy, zmq, msgpack; "
             "print(sys.version_info[:2], cllmd.__file__)"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert str(venv / "lib/python3.11/site-packages/cllmd") in r.stdout
    # Not an editable install: the service must not depend on this source tree.
    assert str(ROOT) not in r.stdout

    out = install("--uninstall", "--destdir", stage).stdout
    assert "removed /opt/cllmd" in out and "kept /var/lib/cllmd" in out
    assert snapshot(stage) == before


def test_install_keeps_a_config_the_admin_changed_until_purge(tmp_path):
    need_python()
    stage = tmp_path / "stage"
    populate(stage)
    before = snapshot(stage)
    config = stage / "etc/cllmd/cllmd.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[train]\nlr = 3e-4\n")

    out = install("--destdir", stage, "--python", DEB_PYTHON).stdout
    assert "kept /etc/cllmd/cllmd.toml: it was changed" in out
    assert config.read_text() == "[train]\nlr = 3e-4\n"
    shipped = stage / "opt/cllmd/share/cllmd/cllmd.toml"
    assert shipped.read_text() == (ROOT / "systemd/cllmd.toml").read_text()

    # An upgrade in place (the same command again) keeps it too.
    out = install("--destdir", stage, "--python", DEB_PYTHON).stdout
    assert "kept /etc/cllmd/cllmd.toml" in out

    # --purge deletes the state, the cache and the configuration as well; nothing else.
    for d in ("var/lib/cllmd/queue/incoming", "var/cache/cllmd/numba"):
        (stage / d).mkdir(parents=True)
    (stage / "var/lib/cllmd/model.cllm").write_bytes(b"weights")
    out = install("--uninstall", "--purge", "--destdir", stage).stdout
    assert "purged /var/lib/cllmd" in out and "purged /etc/cllmd" in out
    for d in ("var/lib/cllmd", "var/cache/cllmd", "etc/cllmd"):
        assert not (stage / d).exists()
    after = {k: v for k, v in snapshot(stage).items()
             if k not in ("var", "var/lib", "var/cache")}
    assert after == before


def test_install_refuses_to_replace_a_foreign_command(tmp_path):
    need_python()
    stage = tmp_path / "stage"
    (stage / "usr/local/bin").mkdir(parents=True)
    (stage / "usr/local/bin/cllm").write_text("#!/bin/sh\necho someone else's\n")
    r = run(["bash", INSTALL_SH, "--destdir", stage, "--python", DEB_PYTHON])
    assert r.returncode != 0
    assert "/usr/local/bin/cllm exists and is not a link into /opt/cllmd" in r.stderr
    assert (stage / "usr/local/bin/cllm").read_text() == "#!/bin/sh\necho someone else's\n"
    # Refused before any work: nothing was staged.
    assert not (stage / "opt").exists()


# --------------------------------------------------------------------------------------------
# The Debian package


@pytest.fixture(scope="module")
def deb(request, tmp_path_factory) -> Path:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not found (Debian package dpkg)")
    stage = package_stage(stage_cache_root(request.config, tmp_path_factory))
    out = tmp_path_factory.mktemp("deb")
    # gzip -1: the package holds ~300 MB of environment; xz (the default) takes minutes on
    # 2 cores, and zstd is refused by lintian and Debian's archive.
    r = run(["bash", BUILD_DEB, "--from-stage", stage, "--out", out, "--compress", "gzip",
             "--level", "1"])
    assert r.returncode == 0, f"build-deb.sh failed:\n{r.stdout}\n{r.stderr}"
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.parent == out
    return path


def test_deb_is_named_by_version_and_architecture(deb):
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    import tomllib
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert deb.name == f"cllmd_{version}-1_{arch}.deb"


def test_deb_control_fields(deb):
    fields = {}
    for name in ("Package", "Version", "Architecture", "Depends", "Maintainer", "Installed-Size",
                 "Description"):
        r = run(["dpkg-deb", "--field", deb, name])
        assert r.returncode == 0, r.stderr
        fields[name] = r.stdout.strip()
    assert fields["Package"] == "cllmd"
    assert fields["Depends"].startswith("python3.11, python3 (>= 3.11), ")
    assert "init-system-helpers" in fields["Depends"]
    assert int(fields["Installed-Size"]) > 10_000  # KiB: the environment is in it
    info = run(["dpkg-deb", "-I", deb]).stdout
    for script in ("postinst", "prerm", "postrm", "conffiles"):
        assert script in info
    ctrl = Path(run(["mktemp", "-d"]).stdout.strip())
    try:
        assert run(["dpkg-deb", "-e", deb, ctrl]).returncode == 0
        assert (ctrl / "conffiles").read_text().split() == ["/etc/cllmd/cllmd.toml"]
        for script in ("postinst", "prerm", "postrm"):
            assert os.access(ctrl / script, os.X_OK)
            assert run(["sh", "-n", ctrl / script]).returncode == 0
        postinst = (ctrl / "postinst").read_text()
        assert "systemd-sysusers cllmd.conf" in postinst and "deb-systemd-helper enable" in postinst
    finally:
        shutil.rmtree(ctrl)


def test_deb_contents_have_the_install_layout(deb):
    listing = run(["dpkg-deb", "-c", deb]).stdout.splitlines()
    entries = {}
    for line in listing:
        parts = line.split()
        # perms owner size date time path [-> target]
        path = parts[5].removeprefix(".")
        entries[path] = (parts[0], parts[1], parts[7] if len(parts) > 7 and parts[6] == "->" else None)
    for path in ("/lib/systemd/system/cllmd.service", "/lib/systemd/system/cllm-http.service",
                 "/opt/cllmd/share/doc/cllmd/http.md", "/usr/lib/sysusers.d/cllmd.conf",
                 "/etc/cllmd/cllmd.toml", "/opt/cllmd/bin/python3.11", "/opt/cllmd/pyvenv.cfg",
                 "/opt/cllmd/share/cllmd/examples/cllmd-tcp.conf",
                 "/usr/share/doc/cllmd/copyright", "/usr/share/doc/cllmd/changelog.Debian.gz"):
        assert path in entries, f"{path} not in the package"
    for cmd in COMMANDS:
        perms, owner, _ = entries[f"/opt/cllmd/bin/{cmd}"]
        assert perms == "-rwxr-xr-x" and owner == "root/root"
        assert entries[f"/usr/bin/{cmd}"][2] == f"/opt/cllmd/bin/{cmd}"
    assert entries["/opt/cllmd/bin/python3.11"][2] == DEB_PYTHON
    assert any(p.startswith("/opt/cllmd/lib/python3.11/site-packages/numba/") for p in entries)
    assert any(p.startswith("/opt/cllmd/lib/python3.11/site-packages/cllmd/") for p in entries)
    # Debian ships no byte code (postinst compiles it) and nothing in /usr/local.
    assert not [p for p in entries if "__pycache__" in p or p.endswith(".pyc")]
    assert not [p for p in entries if p.startswith("/usr/local")]
    assert all(owner == "root/root" for _, owner, _ in entries.values())


def test_deb_lintian_finds_no_errors(deb):
    if shutil.which("lintian") is None:
        pytest.skip("lintian not installed (optional: apt-get install lintian)")
    r = run(["lintian", "--no-tag-display-limit", deb])
    errors = [l for l in r.stdout.splitlines() if l.startswith("E:")]
    print(r.stdout)
    # A venv in /opt carries upstream binaries lintian has opinions about (embedded libraries,
    # unstripped or statically linked objects); those are the wheels' and are listed, not fatal.
    tolerated = ("embedded-library", "unstripped-binary-or-object", "statically-linked-binary",
                 "shared-library-lacks-prerequisites", "binary-or-shlib-defines-rpath",
                 "library-not-linked-against-libc", "dir-or-file-in-opt",
                 "shared-library-lacks-version", "arch-dependent-file-not-in-arch-specific-directory")
    fatal = [l for l in errors if not any(t in l for t in tolerated)]
    assert not fatal, "\n".join(fatal)
