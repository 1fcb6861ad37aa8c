"""The systemd unit, sysusers entry and default config; the unit run by a real systemd 252.

Here systemd is not PID 1, so the sandbox tests boot one as PID 1 of private PID, mount, UTS,
IPC, network and cgroup namespaces, with /etc and /var behind overlays and its own unit path.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "cllmd.service"
HTTP_UNIT = ROOT / "systemd" / "cllm-http.service"
TCP_DROPIN = ROOT / "systemd" / "cllmd-tcp.conf"
SYSUSERS = ROOT / "systemd" / "cllmd.sysusers"
DEFAULT_TOML = ROOT / "systemd" / "cllmd.toml"
INSTALL_SH = ROOT / "packaging" / "install.sh"
# The interpreter the Debian package's environment is made from (build-deb.sh's default).
DEB_PYTHON = "/usr/bin/python3.11"
STAGED_UNIT = Path("lib/systemd/system/cllmd.service")  # inside a --layout package stage
STAGED_HTTP_UNIT = Path("lib/systemd/system/cllm-http.service")

# A hang guard for waits on processes; never a measure of speed.
HANG_GUARD = 600


# --------------------------------------------------------------------------------------------
# Helpers


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found (Debian package {package}; .ci/run installs it)")
    return path


def need_root_namespaces() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: unshare(1) of a mount namespace to bind the staged /opt/cllmd")
    need_tool("unshare", "util-linux")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --mount is not permitted here: {probe.stderr.strip()}")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", HANG_GUARD)
    return subprocess.run(cmd, **kw)


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment; systemd keys may repeat, so not a dict."""
    entries, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(text: str, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit_entries(text) if s == section and k == key]


EXPOSURE_RX = re.compile(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?) (\w+)")


def exposure(unit: str | Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    need_tool("systemd-analyze", "systemd")
    r = run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
            env={**os.environ, **(env or {})})
    m = EXPOSURE_RX.search(r.stdout + r.stderr)
    assert m, f"no overall exposure in the output of systemd-analyze security:\n{r.stdout}{r.stderr}"
    return float(m.group(2)), m.group(3)


# --------------------------------------------------------------------------------------------
# The staged install: `install.sh --destdir STAGE --layout package` of this very tree, as the
# Debian package is built. Reused across modules and runs while the inputs are byte-identical.

STAGE_INPUTS = ("pyproject.toml", "cllmd", "kernels", "client", "systemd", "packaging",
                "docs/service.md", "docs/http.md")


def source_digest() -> str:
    h = hashlib.sha256(DEB_PYTHON.encode())
    for name in STAGE_INPUTS:
        top = ROOT / name
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for p in paths:
            if "__pycache__" in p.parts or p.suffix == ".pyc":
                continue
            h.update(str(p.relative_to(ROOT)).encode() + b"\0")
            h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def package_stage(cache_root: Path) -> Path:
    """The root of a package-layout stage of the current source tree (built once per change)."""
    if not Path(DEB_PYTHON).exists():
        pytest.skip(f"{DEB_PYTHON} not found (Debian package python3.11, with python3.11-venv)")
    cache_root.mkdir(parents=True, exist_ok=True)
    digest = source_digest()
    with open(cache_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entry = cache_root / digest
        if (entry / ".complete").exists():
            return entry / "root"
        for old in cache_root.iterdir():
            if old.is_dir():
                shutil.rmtree(old)
        r = run(["bash", str(INSTALL_SH), "--destdir", str(entry / "root"), "--layout", "package",
                 "--python", DEB_PYTHON])
        assert r.returncode == 0, f"install.sh --destdir failed:\n{r.stdout}\n{r.stderr}"
        (entry / ".complete").write_text(r.stdout)
        return entry / "root"


PRIVATE_IN_CONTAINERS = (Path("/tmp"), Path("/var/tmp"))   # the test containers mount their own


def _visible_in_containers(path: Path) -> bool:
    path = path.resolve()
    return not any(path == p or p in path.parents for p in PRIVATE_IN_CONTAINERS)


def stage_cache_root(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the staged install lives: pytest's cache, else the checkout, unless that is under
    /tmp or /var/tmp (a clone made there), which the test containers replace with their own: then
    the user's cache directory, and a skip with the reason when that is under /tmp too."""
    cache = getattr(config, "cache", None)
    candidates = ([Path(cache.mkdir("cllmd-package-stage"))] if cache is not None else []) + [
        Path(config.rootpath) / ".pytest-stage" / "cllmd-package-stage",
        Path("/var/cache/cllmd-test-stage"),   # not under /root or /home, which ProtectHome= hides
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cllmd-test-stage"]
    for root in candidates:
        if _visible_in_containers(root):
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if os.access(root, os.W_OK):
                return root
    pytest.skip(f"no place outside /tmp and /var/tmp for the staged install (tried "
                f"{', '.join(map(str, candidates))}): the test containers could not see it")


@pytest.fixture(scope="module")
def stage(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return package_stage(stage_cache_root(request.config, tmp_path_factory))


def serve_missing(stage_root: Path) -> str | None:
    """Why `cllmd serve` cannot run yet, or None when the daemon's command exists."""
    # The staged console script itself (its #! names the final path, so via the stage's python).
    r = run([str(stage_root / "opt/cllmd/bin/python"), str(stage_root / "opt/cllmd/bin/cllmd"),
             "serve", "--help"])
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"`cllmd serve` is not available in this tree yet (cllmd/cli.py): {last}"
    return None


# --------------------------------------------------------------------------------------------
# The unit file itself


def test_unit_declares_the_required_settings():
    text = UNIT.read_text()
    required = {
        "Type": "notify", "NotifyAccess": "main", "ExecReload": "/bin/kill -HUP $MAINPID",
        "User": "cllmd", "Group": "cllm", "RuntimeDirectory": "cllmd",
        "RuntimeDirectoryMode": "0750", "StateDirectory": "cllmd", "CacheDirectory": "cllmd",
        "ConfigurationDirectory": "cllmd", "Restart": "on-failure", "UMask": "0027",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "NoNewPrivileges": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
        "ProtectClock": "yes", "ProtectHostname": "yes", "RestrictAddressFamilies": "AF_UNIX",
        "RestrictNamespaces": "yes", "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes", "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "", "IPAddressDeny": "any",
        "Environment": "NUMBA_CACHE_DIR=/var/cache/cllmd/numba",
        "ExecStart": "/opt/cllmd/bin/cllmd serve",
    }
    for key, value in required.items():
        assert unit_values(text, key) == [value], f"{key}= should be exactly {value!r}"
    assert unit_values(text, "SystemCallFilter")[0] == "@system-service"
    assert int(unit_values(text, "WatchdogSec")[0]) > 0
    # A final checkpoint on stop must not be cut short by SIGKILL.
    assert int(unit_values(text, "TimeoutStopSec")[0]) >= 60
    # Numba's JIT maps executable memory: the unit must not forbid it, and must say why.
    assert unit_values(text, "MemoryDenyWriteExecute") == ["no"]
    assert "cannot allocate executable memory" in text and "test_systemd.py" in text


def test_tcp_dropin_only_opens_the_network():
    entries = unit_entries(TCP_DROPIN.read_text())
    service = {k: v for s, k, v in entries if s == "Service"}
    assert set(service) == {"PrivateNetwork", "RestrictAddressFamilies", "IPAddressAllow"}
    assert service["PrivateNetwork"] == "no"
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # The base unit keeps the inet families out.
    assert "AF_INET" not in " ".join(unit_values(UNIT.read_text(), "RestrictAddressFamilies"))


def test_unit_security_exposure_is_at_most_1(tmp_path):
    score, verdict = exposure(UNIT)
    units = tmp_path / "units"
    (units / "cllmd.service.d").mkdir(parents=True)
    shutil.copy(UNIT, units / "cllmd.service")
    shutil.copy(TCP_DROPIN, units / "cllmd.service.d" / "tcp.conf")
    tcp_score, tcp_verdict = exposure("cllmd.service", env={"SYSTEMD_UNIT_PATH": f"{units}:"})
    print(f"\nsystemd-analyze security --offline=true: cllmd.service {score} {verdict}; "
          f"with the TCP drop-in {tcp_score} {tcp_verdict}")
    assert score <= 1.0, f"cllmd.service exposure {score} {verdict}, must be <= 1.0"
    # TCP mode opens the host's network (PrivateNetwork 0.5, AF_INET/AF_INET6 0.3, an IP allow
    # list 0.1 in systemd's weights) and nothing else: it stays in systemd's "OK" band.
    assert tcp_score <= 2.0 and tcp_verdict in ("SAFE", "OK"), (
        f"cllmd.service + cllmd-tcp.conf exposure {tcp_score} {tcp_verdict}, must be OK or better")
    assert tcp_score - score <= 0.9 + 1e-9


def test_http_unit_security_exposure_is_at_most_1_5():
    score, verdict = exposure(HTTP_UNIT)
    print(f"\nsystemd-analyze security --offline=true: cllm-http.service {score} {verdict}")
    assert score <= 1.5, f"cllm-http.service exposure {score} {verdict}, must be <= 1.5"


def test_http_unit_declares_its_sandbox():
    text = HTTP_UNIT.read_text()
    required = {
        "ExecStart": "/opt/cllmd/bin/cllm-http --socket /run/cllmd/cllmd.sock",
        "DynamicUser": "yes", "SupplementaryGroups": "cllm", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes", "NoNewPrivileges": "yes",
        "MemoryDenyWriteExecute": "yes", "CapabilityBoundingSet": "", "IPAddressDeny": "any",
        "IPAddressAllow": "localhost", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "Environment": "CLLM_HTTP_HOST=127.0.0.1 CLLM_HTTP_PORT=11435",
    }
    for key, value in required.items():
        assert unit_values(text, key) == [value], f"{key}= should be exactly {value!r}"
    # the port in the unit is the gateway's default, documented in docs/http.md
    from cllm.http.app import DEFAULT_PORT
    assert DEFAULT_PORT == 11435 and "11435" in (ROOT / "docs" / "http.md").read_text()


# The unit ollama's install.sh writes (configure_systemd), for the comparison in docs/service.md.
OLLAMA_INSTALLER_UNIT = """\
[Unit]
Description=Ollama Service
After=network-online.target

[Service]
ExecStart=/usr/local/bin/ollama serve
User=ollama
Group=ollama
Restart=always
RestartSec=3
Environment="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

[Install]
WantedBy=default.target
"""


def test_unit_security_exposure_beats_the_ollama_installer_unit(tmp_path):
    ollama = tmp_path / "ollama.service"
    ollama.write_text(OLLAMA_INSTALLER_UNIT)
    theirs, their_verdict = exposure(ollama)
    ours, our_verdict = exposure(UNIT)
    print(f"\nexposure: cllmd.service {ours} {our_verdict}; "
          f"ollama installer's unit {theirs} {their_verdict}")
    assert ours < theirs


def test_unit_verify_passes_on_the_staged_install(stage, tmp_path):
    need_tool("systemd-analyze", "systemd")
    need_root_namespaces()
    unit = stage / STAGED_UNIT
    # The staged unit names /opt/cllmd/bin/cllmd: a private mount namespace puts the stage's
    # environment there, so verify checks the very files install.sh staged, and nothing else
    # on this machine is touched. The TCP drop-in is verified along with it.
    units = tmp_path / "units"
    (units / "cllmd.service.d").mkdir(parents=True)
    shutil.copy(unit, units / "cllmd.service")
    shutil.copy(stage / "opt/cllmd/share/cllmd/examples/cllmd-tcp.conf",
                units / "cllmd.service.d" / "tcp.conf")
    script = textwrap.dedent(f"""\
        set -e
        mount -t tmpfs -o mode=0755 tmpfs /opt
        mkdir /opt/cllmd
        mount --bind {stage}/opt/cllmd /opt/cllmd
        echo "== {unit}"
        systemd-analyze verify {unit}
        echo "== with the TCP drop-in"
        SYSTEMD_UNIT_PATH={units}: systemd-analyze verify cllmd.service
        echo "== {stage / STAGED_HTTP_UNIT}"
        systemd-analyze verify {stage / STAGED_HTTP_UNIT}
    """)
    r = run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script])
    print(r.stdout, r.stderr)
    assert r.returncode == 0, f"systemd-analyze verify failed:\n{r.stdout}{r.stderr}"
    # Warnings (an unknown key, a bad value) do not change the exit code: refuse them too.
    assert r.stderr.strip() == "", f"systemd-analyze verify warned:\n{r.stderr}"


def test_unit_verify_refuses_a_missing_execstart(tmp_path):
    need_tool("systemd-analyze", "systemd")
    need_root_namespaces()
    # The same check without the staged environment: an empty /opt must make verify fail,
    # or the test above would prove nothing.
    script = f"mount -t tmpfs tmpfs /opt && exec systemd-analyze verify {UNIT}"
    r = run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script])
    assert r.returncode != 0
    assert "/opt/cllmd/bin/cllmd is not executable" in r.stderr


def test_sysusers_creates_cllmd_in_group_cllm(tmp_path):
    need_tool("systemd-sysusers", "systemd")
    (tmp_path / "etc").mkdir()
    r = run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)])
    assert r.returncode == 0, r.stderr
    groups = {l.split(":")[0]: l.split(":") for l in (tmp_path / "etc/group").read_text().splitlines()}
    users = {l.split(":")[0]: l.split(":") for l in (tmp_path / "etc/passwd").read_text().splitlines()}
    assert "cllm" in groups and "cllmd" in users
    name, _, uid, gid, _gecos, home, shell = users["cllmd"]
    assert gid == groups["cllm"][2], "cllmd's primary group must be cllm"
    assert int(uid) < 1000, "a system user"
    assert (home, shell) == ("/var/lib/cllmd", "/usr/sbin/nologin")


def test_default_config_matches_the_settings_schema(tmp_path):
    try:
        from cllmd.settings import SCHEMA, load_settings, render_default_toml
    except ImportError as e:
        pytest.skip(f"cllmd.settings does not provide the schema yet: {e}")
    text = DEFAULT_TOML.read_text()
    assert text == render_default_toml(), (
        "systemd/cllmd.toml is out of date with cllmd/settings.py; regenerate it with\n"
        "  .venv/bin/python -c 'from cllmd.settings import render_default_toml as r; "
        "print(r(), end=\"\")' > systemd/cllmd.toml")
    # Every key is there, commented out; uncommented, the file gives exactly the defaults.
    for key in SCHEMA:
        assert re.search(rf"^#{re.escape(key.split('.', 1)[1])} = ", text, re.M), key
    assert tomllib.loads(text) == {s: {} for s in {k.split(".")[0] for k in SCHEMA}}
    uncommented = re.sub(r"^#(\w+ = )", r"\1", text, flags=re.M)
    assert sum(len(t) for t in tomllib.loads(uncommented).values()) == len(SCHEMA)
    config = tmp_path / "cllmd.toml"
    config.write_text(uncommented)
    assert load_settings(config) == load_settings(None)


# --------------------------------------------------------------------------------------------
# Numba and MemoryDenyWriteExecute, without systemd: the kernel's own W^X switch.

PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def test_numba_needs_write_execute_memory_prctl_mdwe():
    # Linux >= 6.3 has prctl(PR_SET_MDWE), the kernel's version of what systemd's
    # MemoryDenyWriteExecute= does with seccomp (systemd >= 257 uses the prctl itself).
    code = textwrap.dedent(f"""\
        import ctypes, sys
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
            print("NO-MDWE errno", ctypes.get_errno()); sys.exit(3)
        from numba import njit
        print(njit(lambda x: x + 1)(1))
    """)
    r = run([sys.executable, "-c", code])
    if r.returncode == 3:
        pytest.skip(f"prctl(PR_SET_MDWE) unsupported on Linux {os.uname().release} (needs >= 6.3): "
                    f"{r.stdout.strip()}")
    assert r.returncode != 0, "numba ran under PR_SET_MDWE: then MemoryDenyWriteExecute=yes may be fine"
    assert "cannot allocate executable memory" in r.stderr


# --------------------------------------------------------------------------------------------
# A real systemd 252, as PID 1 of its own namespaces, running the staged unit.

CONTAINER_TARGET = "cllmd-test.target"
HARNESS_TARGETS = {
    # The unit's default dependencies, empty: nothing of the host's boot (tmpfiles, sysctl,
    # modules, journald) may run, since the container shares the host's kernel and file system.
    "sysinit.target": "", "basic.target": "", "shutdown.target": "", "network.target": "",
    CONTAINER_TARGET: "",
}

PROBE = r'''
"""Runs as the unit's ExecStart, with its sandbox: checks what cllmd needs, prints JSON lines."""
import json, os, signal, socket, sys, threading, time

def notify(msg):
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(msg.encode())

def emit(event, **kw):
    print(json.dumps({"event": event, **kw}), flush=True)

report = {}
def attempt(name, fn):
    try:
        report[name] = {"ok": True, "value": fn()}
    except BaseException as e:
        report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}

report["env"] = {k: os.environ.get(k) for k in (
    "STATE_DIRECTORY", "RUNTIME_DIRECTORY", "CACHE_DIRECTORY", "CONFIGURATION_DIRECTORY",
    "NUMBA_CACHE_DIR", "WATCHDOG_USEC", "NOTIFY_SOCKET")}
report["ids"] = {"uid": os.getuid(), "gid": os.getgid(), "umask": oct(os.umask(0o027))}

def jit():
    import numpy as np
    from numba import njit
    @njit(cache=True, nogil=True)
    def axpy(a, x, y):
        out = np.empty_like(x)
        for i in range(x.shape[0]):
            out[i] = a * x[i] + y[i]
        return out
    r = axpy(2.0, np.arange(4.0), np.ones(4))
    st = axpy.stats
    return {"result": r.tolist(), "cache_hits": sum(st.cache_hits.values()),
            "cache_misses": sum(st.cache_misses.values()),
            "cache_files": sorted(f for _, _, fs in os.walk(os.environ["NUMBA_CACHE_DIR"])
                                  for f in fs)}
attempt("numba", jit)
if not report["numba"]["ok"]:
    emit("failed", report=report)
    sys.exit(1)

def blas_threads():
    import numpy as np
    results = []
    def work(seed):
        a = np.random.default_rng(seed).standard_normal((256, 256))
        results.append(float(np.abs(a @ np.linalg.inv(a) - np.eye(256)).max()))
    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return max(results)
attempt("blas_threads", blas_threads)

def stats():
    import psutil
    p = psutil.Process()
    return {"mem_total": psutil.virtual_memory().total, "rss": p.memory_info().rss,
            "cpus": psutil.cpu_count(), "cpu": psutil.cpu_percent(interval=None)}
attempt("psutil", stats)

def watch():
    import inotify_simple
    ino = inotify_simple.INotify()
    ino.add_watch(os.environ["STATE_DIRECTORY"], inotify_simple.flags.CLOSE_WRITE)
    with open(os.path.join(os.environ["STATE_DIRECTORY"], "probe.txt"), "w") as f:
        f.write("x")
    return [e.name for e in ino.read(timeout=5000)]
attempt("inotify", watch)

def write(path):
    def fn():
        with open(path, "w") as f:
            f.write("probe")
        os.unlink(path)
        return path
    return fn
attempt("write_state", write(os.path.join(os.environ["STATE_DIRECTORY"], "w")))
attempt("write_cache", write(os.path.join(os.environ["CACHE_DIRECTORY"], "w")))
attempt("write_tmp", write("/tmp/w"))
attempt("write_opt", write("/opt/cllmd/w"))
attempt("write_etc", write("/etc/cllmd/w"))
attempt("write_var_lib", write("/var/lib/w"))
attempt("list_home", lambda: os.listdir("/root"))

import zmq
ctx = zmq.Context()
sock_path = os.path.join(os.environ["RUNTIME_DIRECTORY"], "probe.sock")
router = ctx.socket(zmq.ROUTER)  # kept open: the test connects to it while we run
def ipc():
    router.bind("ipc://" + sock_path)
    created = os.stat(sock_path).st_mode & 0o777
    # UMask=0027 leaves the socket 0750; the daemon opens it to the group (connect needs w).
    os.chmod(sock_path, 0o660)
    return {"created_mode": oct(created), "mode": oct(os.stat(sock_path).st_mode & 0o777),
            "dir_mode": oct(os.stat(os.environ["RUNTIME_DIRECTORY"]).st_mode & 0o777)}
attempt("zmq_ipc", ipc)
def tcp():
    # In a child: libzmq does not raise here, it aborts the whole process (an assertion).
    import subprocess
    code = "import zmq; zmq.Context().socket(zmq.ROUTER).bind('tcp://127.0.0.1:*')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return {"returncode": r.returncode, "stderr": r.stderr.strip()[-300:]}
attempt("zmq_tcp", tcp)
attempt("inet_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())

signals = []
signal.signal(signal.SIGHUP, lambda n, f: signals.append("HUP"))
signal.signal(signal.SIGUSR1, lambda n, f: signals.append("USR1"))
signal.signal(signal.SIGTERM, lambda n, f: signals.append("TERM"))

notify("READY=1\nSTATUS=probe ready")
emit("ready", report=report)
period = int(os.environ.get("WATCHDOG_USEC", "0")) / 2e6 or 1.0
pings = 0
while True:
    notify("WATCHDOG=1")
    pings += 1
    while signals:
        sig = signals.pop(0)
        if sig == "TERM":
            notify("STOPPING=1")
            emit("stopping", pings=pings)
            sys.exit(0)
        emit("signal", name=sig)
    time.sleep(min(period, 0.2))
'''


class SystemdContainer:
    """systemd as PID 1 of fresh namespaces, seeing the staged /opt/cllmd and overlays of /etc
    and /var; units come from `units/`, stdout of the services lands in `logs/`."""

    def __init__(self, work: Path, stage_root: Path):
        self.work, self.stage_root = work, stage_root
        self.units, self.logs, self.probe = work / "units", work / "logs", work / "probe"
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # systemd's pid, as this namespace sees it
        self.cgroups: list[Path] = []

    # -- lifecycle
    def boot(self) -> None:
        for d in (self.units, self.logs, self.probe):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
            d.chmod(0o755)
        for name, body in HARNESS_TARGETS.items():
            (self.units / name).write_text(
                f"[Unit]\nDescription={name} (empty: cllmd test harness)\n{body}")
        (self.probe / "probe.py").write_text(PROBE)
        (self.probe / "probe.py").chmod(0o644)
        self.cgroups = self._make_cgroups()
        boot = self.work / "boot.sh"
        boot.write_text(self._boot_script())
        pre = self.work / "pre.sh"
        # Into cgroups of our own first, so that systemd's cgroups stay beneath them and can
        # be removed afterwards; then the namespaces.
        pre.write_text("".join(f"echo $$ > {cg}/cgroup.procs\n" for cg in self.cgroups)
                       + "exec unshare --pid --fork --mount-proc --mount --uts --ipc --net "
                       f"--cgroup --propagation private bash {boot}\n")
        self.proc = subprocess.Popen(["bash", str(pre)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.pid = self._systemd_pid()
            if self.pid is not None:
                state = self.sh("systemctl is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        log = (self.work / "systemd.log").read_text(errors="replace") if (self.work / "systemd.log").exists() else ""
        self.shutdown()
        pytest.skip("systemd 252 could not be booted in a PID+mount namespace here: "
                    + (log.strip().splitlines() or ["no log"])[-1])

    def shutdown(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)  # PID 1 of the namespace: takes all with it
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for cg in self.cgroups:
            for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                cg.rmdir()
            except OSError:
                pass

    def _systemd_pid(self) -> int | None:
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        for child in children:
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
            except OSError:
                continue
        return None

    def _make_cgroups(self) -> list[Path]:
        # One directory per mounted hierarchy, beside our own cgroup in it.
        mounts = {}
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fstype, _src, opts = right.split(" ", 2)
            if fstype == "cgroup2":
                mounts["0:"] = left.split()[4]
            elif fstype == "cgroup":
                for opt in opts.split(","):
                    mounts.setdefault(opt, left.split()[4])
        made = []
        tag = f"cllmd-test-{os.getpid()}-{time.monotonic_ns()}"
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hid, controllers, path = line.split(":", 2)
            key = "0:" if hid == "0" else controllers.split(",")[0]
            mount = mounts.get(key)
            if mount is None:
                continue
            cg = Path(mount + path.rstrip("/")) / tag
            try:
                cg.mkdir()
            except OSError:
                continue
            made.append(cg)
        return made

    def _boot_script(self) -> str:
        w, st = self.work, self.stage_root
        return textwrap.dedent(f"""\
            set -euo pipefail
            exec 3>>{w}/systemd.log
            # The cgroup file systems mounted before the cgroup namespace show the host's root;
            # without them systemd mounts its own, rooted at our cgroup (see boot()).
            umount -R /sys/fs/cgroup
            for d in etc var; do
                mkdir -p {w}/ov/$d/upper {w}/ov/$d/work
                mount -t overlay overlay -o lowerdir=/$d,upperdir={w}/ov/$d/upper,workdir={w}/ov/$d/work /$d
            done
            mount -t tmpfs -o mode=0755 tmpfs /opt
            mkdir /opt/cllmd
            mount --bind {st}/opt/cllmd /opt/cllmd
            mount -o remount,bind,ro /opt/cllmd
            mount -t tmpfs -o mode=0755 tmpfs /run
            mkdir -p /run/cllmd-test/units /run/cllmd-test/logs /run/cllmd-test/probe
            mount --bind {self.units} /run/cllmd-test/units
            mount --bind {self.logs} /run/cllmd-test/logs
            mount --bind -o ro {self.probe} /run/cllmd-test/probe
            mount -t tmpfs -o mode=1777 tmpfs /tmp
            mount -t tmpfs -o mode=1777 tmpfs /var/tmp
            export container=cllmd-test SYSTEMD_UNIT_PATH=/run/cllmd-test/units
            exec /lib/systemd/systemd --system --unit={CONTAINER_TARGET} --log-target=console \\
                </dev/null >&3 2>&3
        """)

    # -- inside
    def sh(self, script: str, check: bool = True, timeout: float = HANG_GUARD) -> subprocess.CompletedProcess:
        r = run(["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "-i", "-n", "-C",
                 "bash", "-c", script], timeout=timeout)
        if check:
            assert r.returncode == 0, f"in the container: {script}\n{r.stdout}{r.stderr}"
        return r

    def install_unit(self, name: str, text: str, dropins: dict[str, str]) -> None:
        (self.units / name).write_text(text)
        ddir = self.units / f"{name}.d"
        shutil.rmtree(ddir, ignore_errors=True)
        ddir.mkdir()
        for fname, body in dropins.items():
            (ddir / fname).write_text(body)
        self.sh("systemctl daemon-reload")

    def log_events(self, name: str) -> list[dict]:
        path = self.logs / f"{name}.log"
        out = []
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def log_text(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_event(self, name: str, pred, what: str) -> dict:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for e in self.log_events(name):
                if pred(e):
                    return e
            time.sleep(0.05)
        raise AssertionError(f"{name}: no {what} in its log:\n{self.log_text(name)}")

    def wait_unit(self, unit: str, states: tuple[str, ...], within: float) -> str:
        """Poll ActiveState until it is one of `states`; the last state seen after `within` s."""
        deadline = time.monotonic() + within
        while True:
            state = self.show(unit, "ActiveState")["ActiveState"]
            if state in states or time.monotonic() > deadline:
                return state
            time.sleep(0.2)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        r = self.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def output_dropin(name: str) -> str:
    # The only harness change to a unit: where its output goes (there is no journald here).
    return (f"[Service]\nStandardOutput=append:/run/cllmd-test/logs/{name}.log\n"
            "StandardError=inherit\n")


@pytest.fixture(scope="module")
def container(stage, tmp_path_factory):
    if sys.platform != "linux":
        pytest.skip("Linux only")
    need_root_namespaces()
    need_tool("nsenter", "util-linux")
    if not Path("/lib/systemd/systemd").exists():
        pytest.skip("/lib/systemd/systemd not found (Debian package systemd)")
    c = SystemdContainer(tmp_path_factory.mktemp("systemd-container"), stage)
    try:
        c.boot()
        sysusers = stage / "usr/lib/sysusers.d/cllmd.conf"
        c.sh(f"systemd-sysusers {sysusers}")
        # What install.sh and the package put in /etc: the default configuration.
        c.sh(f"cp -a {stage}/etc/cllmd /etc/")
        # A member of cllm and an outsider, to try the socket's access control.
        c.sh("useradd --system --no-create-home --groups cllm cllm-member && "
             "useradd --system --no-create-home outsider")
        yield c
    finally:
        c.shutdown()


def probe_unit(stage_root: Path, name: str, extra: str = "") -> tuple[str, dict[str, str]]:
    text = (stage_root / STAGED_UNIT).read_text()
    dropins = {
        "00-output.conf": output_dropin(name),
        "10-probe.conf": ("[Service]\nExecStart=\n"
                          "ExecStart=/opt/cllmd/bin/python /run/cllmd-test/probe/probe.py\n"
                          "TimeoutStartSec=300\n" + extra),
    }
    return text, dropins


def connect_as(c: SystemdContainer, user: str, path: str) -> subprocess.CompletedProcess:
    code = (f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({path!r}); "
            "print('connected')")
    return c.sh(f"setpriv --reuid={user} --regid={user} --init-groups /usr/bin/python3 -c \"{code}\"",
                check=False)


def test_sandbox_refuses_numba_with_memory_deny_write_execute(container, stage):
    name = "cllmd-probe-mdwe"
    text, dropins = probe_unit(stage, name, extra="MemoryDenyWriteExecute=yes\n")
    container.install_unit(f"{name}.service", text, dropins)
    try:
        r = container.sh(f"systemctl start {name}.service", check=False)
        assert r.returncode != 0, "numba started under MemoryDenyWriteExecute=yes"
        failed = container.wait_event(name, lambda e: e["event"] == "failed", "failure report")
        assert "cannot allocate executable memory" in failed["report"]["numba"]["error"]
        print("\nMemoryDenyWriteExecute=yes:", failed["report"]["numba"]["error"])
    finally:
        # Restart=on-failure would start it again every RestartSec=, and each of its exits
        # removes the RuntimeDirectory= it shares with the later units (/run/cllmd)
        container.sh(f"systemctl stop {name}.service; systemctl reset-failed {name}.service", check=False)


def test_sandbox_libzmq_aborts_without_the_resources_syscalls(container, stage):
    # Why the unit does not add ~@resources to its SystemCallFilter=: libzmq's I/O thread calls
    # pthread_setschedparam() when it starts and aborts the process on EPERM.
    name = "cllmd-probe-resources"
    text, dropins = probe_unit(stage, name, extra="SystemCallFilter=~@resources\n")
    container.install_unit(f"{name}.service", text, dropins)
    r = container.sh(f"systemctl start {name}.service", check=False)
    assert r.returncode != 0, "libzmq started without the @resources system calls"
    assert container.show(f"{name}.service", "ExecMainStatus")["ExecMainStatus"] == str(signal.SIGABRT)
    assert "Operation not permitted (src/thread.cpp" in container.log_text(name)
    container.sh(f"systemctl reset-failed {name}.service; systemctl stop {name}.service", check=False)


def test_sandbox_runs_what_cllmd_needs(container, stage):
    """The unit exactly as shipped (ExecStart aside): JIT and its cache, BLAS threads, psutil,
    inotify, IPC sockets for the group only, no inet, writes only in its own directories."""
    name = "cllmd-probe"
    text, dropins = probe_unit(stage, name)
    container.install_unit(f"{name}.service", text, dropins)
    container.sh(f"systemctl start {name}.service")
    ready = container.wait_event(name, lambda e: e["event"] == "ready", "ready report")["report"]

    env = ready["env"]
    assert env["STATE_DIRECTORY"] == "/var/lib/cllmd"
    assert env["RUNTIME_DIRECTORY"] == "/run/cllmd"
    assert env["CACHE_DIRECTORY"] == "/var/cache/cllmd"
    assert env["CONFIGURATION_DIRECTORY"] == "/etc/cllmd"
    assert env["NUMBA_CACHE_DIR"] == "/var/cache/cllmd/numba"
    assert int(env["WATCHDOG_USEC"]) > 0 and env["NOTIFY_SOCKET"]
    assert ready["ids"]["umask"] == "0o27"

    assert ready["numba"]["ok"] and ready["numba"]["value"]["result"] == [1.0, 3.0, 5.0, 7.0]
    assert any(f.endswith(".nbi") for f in ready["numba"]["value"]["cache_files"]), ready["numba"]
    for check in ("blas_threads", "psutil", "inotify", "write_state", "write_cache", "write_tmp",
                  "zmq_ipc"):
        assert ready[check]["ok"], f"{check}: {ready[check]}"
    assert ready["blas_threads"]["value"] < 1e-6
    assert ready["psutil"]["value"]["mem_total"] > 0
    assert ready["inotify"]["value"] == ["probe.txt"]
    # ProtectSystem=strict, ProtectHome=yes: nothing writable outside its directories.
    for check in ("write_opt", "write_etc", "write_var_lib"):
        assert not ready[check]["ok"] and "Read-only file system" in ready[check]["error"], ready[check]
    assert not ready["list_home"]["ok"] or ready["list_home"]["value"] == []
    # RestrictAddressFamilies=AF_UNIX: no TCP, neither through zmq nor a plain socket.
    assert not ready["inet_socket"]["ok"]
    assert ready["zmq_tcp"]["value"]["returncode"] != 0, ready["zmq_tcp"]
    assert "Address family not supported" in ready["zmq_tcp"]["value"]["stderr"]
    assert "Address family not supported" in ready["inet_socket"]["error"]

    # The runtime directory is the access control: cllm members connect, others may not.
    ipc = ready["zmq_ipc"]["value"]
    assert ipc["dir_mode"] == "0o750" and ipc["mode"] == "0o660"
    owner = container.sh("stat -c '%U:%G %a' /run/cllmd /run/cllmd/probe.sock").stdout.split("\n")
    assert owner[0] == "cllmd:cllm 750" and owner[1] == "cllmd:cllm 660", owner
    member = connect_as(container, "cllm-member", "/run/cllmd/probe.sock")
    assert member.returncode == 0 and "connected" in member.stdout, member.stderr
    outsider = connect_as(container, "outsider", "/run/cllmd/probe.sock")
    assert outsider.returncode != 0 and "PermissionError" in outsider.stderr

    # ExecReload= and SIGUSR1 reach the daemon through the sandbox.
    container.sh(f"systemctl reload {name}.service")
    container.wait_event(name, lambda e: e.get("name") == "HUP", "SIGHUP")
    container.sh(f"systemctl kill -s USR1 --kill-who=main {name}.service")
    container.wait_event(name, lambda e: e.get("name") == "USR1", "SIGUSR1")

    container.sh(f"systemctl stop {name}.service")
    stopping = container.wait_event(name, lambda e: e["event"] == "stopping", "stop")
    assert stopping["pings"] >= 1
    shown = container.show(f"{name}.service", "Result", "ExecMainStatus", "ActiveState")
    assert shown == {"Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive"}

    # The second start loads the kernel from numba's cache in CacheDirectory=.
    (container.logs / f"{name}.log").unlink()
    container.sh(f"systemctl start {name}.service")
    again = container.wait_event(name, lambda e: e["event"] == "ready", "ready report")["report"]
    assert again["numba"]["value"]["cache_hits"] >= 1, again["numba"]
    container.sh(f"systemctl stop {name}.service")


def test_service_runs_the_daemon_under_the_sandbox(container, stage):
    why = serve_missing(stage)
    if why:
        pytest.skip(why)
    # The shipped unit, untouched but for where its output goes.
    container.install_unit("cllmd.service", (stage / STAGED_UNIT).read_text(),
                           {"00-output.conf": output_dropin("cllmd")})
    # --no-block and a bounded wait: a daemon that never says READY=1 fails here with its log,
    # instead of holding systemctl for the unit's whole TimeoutStartSec=.
    container.sh("systemctl start --no-block cllmd.service")
    state = container.wait_unit("cllmd.service", ("active", "failed", "inactive"), within=300)
    try:
        assert state == "active", f"cllmd.service is {state}:\n{container.log_text('cllmd')[-5000:]}"
        listing = container.sh("stat -c '%n %U:%G %a' /run/cllmd /run/cllmd/*.sock").stdout
        lines = dict(l.split(" ", 1) for l in listing.splitlines())
        assert lines["/run/cllmd"] == "cllmd:cllm 750"
        assert lines.get("/run/cllmd/cllmd.sock", "").startswith("cllmd:cllm 66"), listing
        member = connect_as(container, "cllm-member", "/run/cllmd/cllmd.sock")
        assert member.returncode == 0, member.stderr
        outsider = connect_as(container, "outsider", "/run/cllmd/cllmd.sock")
        assert outsider.returncode != 0
        container.sh("systemctl reload cllmd.service")
        # the daemon sends RELOADING=1, rereads its configuration, then READY=1: "reloading"
        # in between is expected, so wait for the unit to settle rather than sample it once
        state = container.wait_unit("cllmd.service", ("active", "failed", "inactive"), within=60)
        assert state == "active", container.log_text("cllmd")[-5000:]
    finally:
        container.sh("systemctl stop cllmd.service", check=False)
    shown = container.show("cllmd.service", "Result", "ExecMainStatus")
    assert shown == {"Result": "success", "ExecMainStatus": "0"}, container.log_text("cllmd")


HEALTH_PROBE = """
import json, sys, time, urllib.error, urllib.request
deadline = time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen("http://127.0.0.1:11435" + sys.argv[1], timeout=10) as r:
            print(r.status, r.read().decode())
            break
    except (urllib.error.URLError, ConnectionError) as e:
        if time.monotonic() > deadline:
            raise SystemExit(f"no answer from the gateway: {e}")
        time.sleep(0.5)
"""


def test_service_runs_the_gateway_under_the_sandbox(container, stage):
    why = serve_missing(stage)
    if why:
        pytest.skip(why)
    # Both shipped units, untouched but for where their output goes.
    container.install_unit("cllmd.service", (stage / STAGED_UNIT).read_text(),
                           {"00-output.conf": output_dropin("cllmd")})
    container.install_unit("cllm-http.service", (stage / STAGED_HTTP_UNIT).read_text(),
                           {"00-output.conf": output_dropin("cllm-http")})
    def get(path: str) -> subprocess.CompletedProcess:   # /tmp is the container's own: no file
        return container.sh(f"python3 - {path} <<'EOF'\n{HEALTH_PROBE}\nEOF", check=False)
    container.sh("systemctl start --no-block cllmd.service")
    try:
        state = container.wait_unit("cllmd.service", ("active", "failed", "inactive"), within=300)
        assert state == "active", f"cllmd.service is {state}:\n{container.log_text('cllmd')[-5000:]}"
        container.sh("systemctl start cllm-http.service")
        state = container.wait_unit("cllm-http.service", ("active", "failed", "inactive"), within=60)
        assert state == "active", f"cllm-http.service is {state}:\n{container.log_text('cllm-http')}"
        # from the host side of the gateway's loopback: the transient user in group cllm
        # reached the daemon's socket, the port answers, the models come from the daemon
        health = get("/health")
        assert health.returncode == 0 and health.stdout.startswith("200 "), (
            health.stdout + health.stderr + container.log_text("cllm-http"))
        assert json.loads(health.stdout.split(" ", 1)[1])["status"] in ("ready", "training", "paused")
        models = get("/v1/models").stdout
        assert json.loads(models.split(" ", 1)[1])["data"][0]["object"] == "model"
        user = container.show("cllm-http.service", "DynamicUser", "SupplementaryGroups")
        assert user == {"DynamicUser": "yes", "SupplementaryGroups": "cllm"}
    finally:
        container.sh("systemctl stop cllm-http.service cllmd.service", check=False)
    shown = container.show("cllm-http.service", "Result")
    assert shown == {"Result": "success"}, container.log_text("cllm-http")


# --------------------------------------------------------------------------------------------
# The daemon started exactly as ExecStart= would, with the environment systemd gives it.


def test_daemon_runs_as_execstart_with_the_systemd_environment(stage, tmp_path):
    why = serve_missing(stage)
    if why:
        pytest.skip(why)
    exec_start = unit_values((stage / STAGED_UNIT).read_text(), "ExecStart")[0].split()
    assert exec_start[0] == "/opt/cllmd/bin/cllmd"
    argv = [str(stage / exec_start[0].lstrip("/"))] + exec_start[1:]
    dirs = {k: tmp_path / k.lower() for k in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY",
                                               "CACHE_DIRECTORY", "CONFIGURATION_DIRECTORY")}
    for d in dirs.values():
        d.mkdir(mode=0o750)
    notify_path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(300)  # a hang guard: READY=1 or a test failure, not a wait forever
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           **{k: str(v) for k, v in dirs.items()},
           "NUMBA_CACHE_DIR": str(dirs["CACHE_DIRECTORY"] / "numba"),
           "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "2000000"}
    proc = subprocess.Popen(_with_stage_python(stage, argv), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        while not any(m.startswith("READY=1") or "\nREADY=1" in m for m in seen):
            seen.append(sock.recv(4096).decode())
        while not any("WATCHDOG=1" in m for m in seen):
            seen.append(sock.recv(4096).decode())
        socks = sorted(dirs["RUNTIME_DIRECTORY"].glob("*.sock"))
        assert socks, f"no sockets in $RUNTIME_DIRECTORY: {list(dirs['RUNTIME_DIRECTORY'].iterdir())}"
        for s in socks:
            mode = s.stat().st_mode & 0o777
            assert mode & 0o060 == 0o060 and mode & 0o007 == 0, f"{s.name}: mode {oct(mode)}"
        proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in seen):
            seen.append(sock.recv(4096).decode())
        assert proc.wait(timeout=HANG_GUARD) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


def _with_stage_python(stage_root: Path, argv: list[str]) -> list[str]:
    # The staged script's #! names /opt/cllmd/bin/python, which exists only once installed:
    # run the same script with the stage's interpreter instead.
    return [str(stage_root / "opt/cllmd/bin/python")] + argv
