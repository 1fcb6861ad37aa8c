"""Shared test setup: paths to the project and the shared data."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared benchmark corpus)")
    return path


@pytest.fixture
def curve_server(tmp_path):
    """A real Server on TCP with CURVE (and its local ipc socket), serving in a thread: yields
    an object with .server, .dir (the ipc socket's directory), .server_pub, .friend (public,
    secret: a key in the authorized directory) and .stranger (a key that is not)."""
    import shutil
    import tempfile
    import threading
    from types import SimpleNamespace

    import zmq
    import zmq.auth

    from cllmd.server import Server

    keys, authorized = tmp_path / "keys", tmp_path / "authorized"
    keys.mkdir()
    authorized.mkdir()
    server_pub, server_sec = zmq.curve_keypair()
    public_file, _ = zmq.auth.create_certificates(str(keys), "friend")
    shutil.copy(public_file, authorized)
    friend = zmq.auth.load_certificate(str(keys / "friend.key_secret"))
    d = tempfile.mkdtemp(prefix="cllmd-t", dir="/tmp")   # short: ipc paths are limited to 107 bytes
    server = Server(f"ipc://{d}/cllmd.sock", f"ipc://{d}/ev.sock", max_message_bytes=1 << 20,
                    tcp="tcp://127.0.0.1:*", events_tcp="tcp://127.0.0.1:*",
                    curve=(server_sec, server_pub, str(authorized)))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,))
    thread.start()
    try:
        yield SimpleNamespace(server=server, dir=d, server_pub=server_pub, friend=friend,
                              stranger=zmq.curve_keypair())
    finally:
        stop.set()
        thread.join(10)
        server.close()
        shutil.rmtree(d)
