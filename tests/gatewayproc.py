"""A real cllm-http gateway as a subprocess in front of a real daemon (tests/daemonproc.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.daemonproc import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    def __init__(self, daemon_socket: Path, log_path: Path, *extra: str, token: str = "",
                 env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.log_path = log_path
        self.args = [sys.executable, "-m", "cllm.http.app", "--port", str(self.port),
                     "--socket", str(daemon_socket), *extra]
        self.env = dict(os.environ, **(env or {}))
        if token:
            self.env["CLLM_HTTP_TOKEN"] = token
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Gateway":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"cllm-http exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False
        wait_for(up, 30, "cllm-http to listen")
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def call(self, method: str, path: str, body=None, *, headers=None, raw: bytes | None = None,
             timeout: float = 60) -> tuple[int, dict, bytes]:
        """(status, headers, body bytes) of one request; never raises for an HTTP status."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={**self.headers(), "Content-Type": "application/json",
                                              **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def json(self, method: str, path: str, body=None, **kw) -> tuple[int, dict]:
        status, _, data = self.call(method, path, body, **kw)
        return status, json.loads(data)

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.log.close()
            return self.proc.returncode
        return None
