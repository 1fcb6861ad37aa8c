"""The cllmd client library: requests with timeouts and Lazy-Pirate retries, streamed
generation with cancel, and the event subscription. Imports only pyzmq, msgpack and the
standard library (see docs/protocol.md for the wire contract).
"""
from __future__ import annotations

import errno
import itertools
import logging
import socket as pysocket
import time
import weakref
from typing import Any, Iterable, Iterator

import zmq
from zmq.utils.monitor import recv_monitor_message

from cllm.layout import events_endpoint_for, find_socket
from cllm.wire import (
    CANCELLED, IDEMPOTENT_OPS, ProtocolError, encode, make_request, parse_event, parse_reply,
)

log = logging.getLogger(__name__)

__all__ = ["Client", "ClientError", "DaemonNotRunning", "DaemonStarting", "RequestError",
           "Generation", "Subscription"]


class ClientError(Exception):
    """Base of everything this module raises."""


class DaemonNotRunning(ClientError):
    """No daemon at the socket (no file, nobody listening, or it went away mid-request)."""

    def __init__(self, endpoint: str, why: str | None = None):
        where = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else endpoint
        why = why or f"no socket at {where}"
        super().__init__(f"cllmd is not running ({why})")
        self.endpoint = endpoint


class RequestError(ClientError):
    """An error reply from the daemon (``code`` as in the protocol), or ``timeout`` when no
    reply came in time (a client-side code, never sent on the wire)."""

    def __init__(self, code: str, message: str, error: dict | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.error = error or {"code": code, "message": message}


class DaemonStarting(RequestError):
    """The daemon is up but still starting (loading its model, compiling kernels): the error
    ``unavailable`` with a ``starting`` field saying what it is doing. Try again shortly."""

    def __init__(self, code: str, message: str, error: dict | None = None):
        super().__init__(code, message, error)
        self.starting = (error or {}).get("starting")


def request_error(error: dict) -> RequestError:
    """The exception for an error reply's map."""
    kind = DaemonStarting if error.get("code") == "unavailable" and error.get("starting") else RequestError
    return kind(error["code"], error["message"], error)


TIMEOUT = "timeout"   # RequestError.code when no reply arrived


def _ipc_path(endpoint: str) -> str | None:
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        return endpoint[len("ipc://"):]
    return None


def _probe(endpoint: str) -> None:
    """Fail fast, before any ZeroMQ waiting, when an ipc socket has nobody behind it."""
    path = _ipc_path(endpoint)
    if path is None:
        return
    s = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
    except FileNotFoundError:
        raise DaemonNotRunning(endpoint) from None
    except ConnectionRefusedError:
        raise DaemonNotRunning(endpoint, f"nothing listening at {path}") from None
    except PermissionError:
        raise ClientError(f"permission denied on {path} (are you in the daemon's group, "
                          f"usually 'cllm'?)") from None
    except OSError as e:
        if e.errno in (errno.ENOTSOCK, errno.ENOTDIR):
            raise DaemonNotRunning(endpoint, f"{path} is not a socket") from None
        raise DaemonNotRunning(endpoint, f"cannot connect to {path}: {e.strerror}") from None
    finally:
        s.close()


# Every live connection of a context: zmq_ctx_term waits forever for a socket whose monitor is
# still enabled, so a context is only ever terminated after _close_all() closed them properly.
_CONNS: "weakref.WeakKeyDictionary[zmq.Context, weakref.WeakSet]" = weakref.WeakKeyDictionary()


def _close_all(ctx: zmq.Context) -> None:
    for conn in list(_CONNS.get(ctx, ())):
        conn.close()
    ctx.destroy(linger=0)


class _Conn:
    """One DEALER socket with a monitor, so a daemon that goes away is noticed at once."""

    def __init__(self, ctx: zmq.Context, endpoint: str, curve: tuple | None):
        _probe(endpoint)
        _CONNS.setdefault(ctx, weakref.WeakSet()).add(self)
        self.endpoint = endpoint
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            secret, public, server_public = (k.encode() if isinstance(k, str) else k
                                             for k in curve)
            self.sock.curve_secretkey = secret
            self.sock.curve_publickey = public
            self.sock.curve_serverkey = server_public
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self.handshaken = False
        self.sock.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)

    def send(self, msg: dict) -> None:
        try:
            self.sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:   # no connection to queue it on
            raise DaemonNotRunning(self.endpoint, f"cannot reach {self.endpoint}") from None

    def stale(self) -> bool:
        """Did the connection drop while idle? (The daemon restarted or stopped between two
        requests: better to start afresh, with a new probe, than to wait on a dead pipe.)"""
        try:
            return self._on_monitor() == "disconnected"
        except ClientError:
            return True

    def recv(self, deadline: float | None) -> bytes | None:
        """The next frame, or None at the deadline (monotonic seconds; None = no deadline)."""
        while True:
            if deadline is None:
                wait = None
            else:
                wait = max(0, int((deadline - time.monotonic()) * 1000))
            ready = dict(self.poller.poll(wait))
            if self.monitor in ready and self._on_monitor() == "disconnected":
                raise DaemonNotRunning(self.endpoint, f"it went away: connection to "
                                                      f"{self.endpoint} closed")
            if self.sock in ready:
                return self.sock.recv()
            if not ready and deadline is not None and time.monotonic() >= deadline:
                return None

    def _on_monitor(self) -> str | None:
        """Read pending connection events; "disconnected" once an established one dropped."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshaken = True
            elif event == zmq.EVENT_DISCONNECTED and self.handshaken:
                return "disconnected"
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise ClientError(f"{self.endpoint} refused our CURVE key (it is not among the "
                                  f"daemon's authorized keys)")
        return None

    def close(self) -> None:
        if self.sock.closed:
            return
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
        self.sock.close(0)


class Client:
    """A connection to cllmd. Not thread-safe: use one Client per thread.

    ``socket``: a path or an ipc:// / tcp:// endpoint, else found by ``cllm.layout.find_socket``.
    ``timeout``: seconds to wait for each reply; ``retries``: extra attempts for idempotent ops.
    ``events``: the events endpoint (defaults to cllmd-events.sock beside an ipc socket).
    ``curve``: (client secret key, client public key, server public key) for tcp:// endpoints.
    """

    def __init__(self, socket: str | None = None, *, timeout: float = 10.0, retries: int = 2,
                 events: str | None = None, curve: tuple | None = None):
        self.endpoint = find_socket(socket)
        self.events_endpoint = events or events_endpoint_for(self.endpoint)
        self.timeout = timeout
        self.retries = retries
        self.curve = curve
        self._ctx = zmq.Context()
        self._conn: _Conn | None = None
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ plumbing

    def _connection(self) -> _Conn:
        if self._conn is not None and self._conn.stale():
            self._reset()
        if self._conn is None:
            self._conn = _Conn(self._ctx, self.endpoint, self.curve)
        return self._conn

    def _reset(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _next_id(self) -> int:
        return next(self._ids)

    # ------------------------------------------------------------------ requests

    def request(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Send ``op`` with ``args``; return the result or raise RequestError / DaemonNotRunning.

        Idempotent ops (cllm.wire.IDEMPOTENT_OPS) are retried ``retries`` times after a
        timeout, each time on a fresh socket (Lazy Pirate). A streamed op (generate) is
        gathered into ``{text, **done stats}``.
        """
        timeout = self.timeout if timeout is None else timeout
        attempts = 1 + (self.retries if op in IDEMPOTENT_OPS else 0)
        for attempt in range(attempts):
            conn = self._connection()
            rid = self._next_id()
            try:
                conn.send(make_request(rid, op, args))
                result = self._await(conn, rid, time.monotonic() + timeout)
            except RequestError:
                raise
            except ClientError:   # the daemon went away or refused us: start afresh next time
                self._reset()
                raise
            if result is not _TIMED_OUT:
                return result
            log.debug("no reply to %s (attempt %d of %d)", op, attempt + 1, attempts)
            self._reset()   # a fresh socket: whatever the old one had queued is gone
        tries = f" ({attempts} attempts)" if attempts > 1 else ""
        raise RequestError(TIMEOUT, f"no reply from cllmd to {op!r} within {timeout:g} s{tries}")

    def _await(self, conn: _Conn, rid: int, deadline: float) -> Any:
        pieces: list[str] = []
        while True:
            frame = conn.recv(deadline)
            if frame is None:
                return _TIMED_OUT
            try:
                reply = parse_reply(frame)
            except ProtocolError as e:
                raise RequestError(e.code, f"malformed reply from cllmd: {e.message}") from None
            # An error with a nil id answers a request the daemon could not even read; with
            # one request in flight on this socket, that is ours.
            if reply.id != rid and not (reply.id is None and reply.kind == "error"):
                continue   # a late reply to an earlier attempt
            if reply.kind == "ok":
                return reply.body
            if reply.kind == "error":
                raise request_error(reply.body)
            if reply.kind == "token":
                pieces.append(reply.body.get("text", ""))
            elif reply.kind == "done":
                return {"text": "".join(pieces), **reply.body}

    def ping(self, timeout: float | None = None) -> float:
        """Round-trip time of a ``ping`` in seconds."""
        t0 = time.perf_counter()
        self.request("ping", timeout=timeout)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: str, *, timeout: float | None = None, **opts: Any) -> "Generation":
        """Start a streamed generation; iterate the result for text pieces (see Generation).

        ``opts`` are generate's arguments (max_tokens, temperature, top_k, top_p, min_p,
        repeat_penalty, repeat_last_n, seed, stop). ``timeout`` bounds the wait for each
        message (None: wait as long as the daemon is there).
        """
        opts.pop("stream", None)
        return Generation(self, prompt, opts, timeout)

    # ------------------------------------------------------------------ events

    def subscribe(self, topics: Iterable[str] | None = None,
                  timeout: float | None = None) -> "Subscription":
        """Events from the daemon's PUB socket: an iterator of (topic, payload).

        ``topics`` None means all. Iteration ends after ``timeout`` seconds without an event
        (None: never); ``Subscription.recv(timeout)`` returns None instead.
        """
        if self.events_endpoint is None:
            raise ClientError(f"no events endpoint known for {self.endpoint}; pass events=")
        return Subscription(self._ctx, self.events_endpoint, topics, timeout, self.curve)

    def close(self) -> None:
        """Close every socket of this client, its generations' and subscriptions' included."""
        self._reset()
        _close_all(self._ctx)

    def __del__(self) -> None:
        # A client dropped without close(): close its connections (monitors first) and the
        # context, rather than let the context's finalizer wait forever in term().
        ctx = getattr(self, "_ctx", None)
        if ctx is not None and not ctx.closed:
            _close_all(ctx)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_TIMED_OUT = object()


class Generation:
    """A streamed ``generate``: iterate for text pieces; afterwards ``stats`` holds the done
    event's statistics (tokens_prompt, tokens_generated, seconds, tokens_per_second,
    stop_reason) and ``text`` the whole text. ``cancel()`` stops it in the daemon.

    It has its own socket, so requests on the Client may interleave with it.
    """

    def __init__(self, client: Client, prompt: str, opts: dict, timeout: float | None):
        self.id = client._next_id()
        self.timeout = timeout
        self.text = ""
        self.stats: dict | None = None
        self._cancel_id: int | None = None
        self._client = client
        self._conn: _Conn | None = _Conn(client._ctx, client.endpoint, client.curve)
        try:
            self._conn.send(make_request(self.id, "generate",
                                         {"prompt": prompt, **opts, "stream": True}))
        except BaseException:
            self._finish()
            raise

    @property
    def done(self) -> bool:
        return self._conn is None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while self._conn is not None:
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            try:
                frame = self._conn.recv(deadline)
            except ClientError:
                self._finish()
                raise
            if frame is None:
                self._finish()
                raise RequestError(TIMEOUT, f"no message from cllmd for {self.timeout:g} s "
                                            f"during generation")
            try:
                reply = parse_reply(frame)
            except ProtocolError as e:
                self._finish()
                raise RequestError(e.code, f"malformed message from cllmd: {e.message}") from None
            if reply.id == self._cancel_id:
                continue   # the cancel's own reply (ok, or not_found when already finished)
            if reply.id != self.id:
                continue
            if reply.kind == "token":
                piece = reply.body.get("text", "")
                self.text += piece
                return piece
            if reply.kind == "done":
                self.stats = reply.body
                self._finish()
            elif reply.kind == "error":
                self._finish()
                if reply.body["code"] == CANCELLED and self._cancel_id is not None:
                    # cancelled while still waiting for a worker: nothing was generated
                    self.stats = {"tokens_generated": 0, "stop_reason": "cancelled"}
                else:
                    raise request_error(reply.body)
            elif reply.kind == "ok":   # a daemon that ignored stream: true
                self.stats = dict(reply.body) if isinstance(reply.body, dict) else {}
                piece = self.stats.pop("text", "")
                self.text += piece
                self._finish()
                if piece:
                    return piece
        raise StopIteration

    def cancel(self, wait: bool = True) -> dict | None:
        """Ask the daemon to stop this generation; with ``wait``, read on until the done event
        (dropping the pieces still in flight) and return the stats."""
        if self._conn is None:
            return self.stats
        if self._cancel_id is None:
            self._cancel_id = self._client._next_id()
            self._conn.send(make_request(self._cancel_id, "cancel", {"id": self.id}))
        if wait:
            for _ in self:
                pass
        return self.stats

    def close(self) -> None:
        """Cancel if still running and release the socket, without waiting."""
        if self._conn is not None:
            try:
                self.cancel(wait=False)
            finally:
                self._finish()

    def _finish(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Subscription:
    """A SUB socket on the daemon's events; reconnects by itself when the daemon comes back."""

    def __init__(self, ctx: zmq.Context, endpoint: str, topics: Iterable[str] | None,
                 timeout: float | None, curve: tuple | None):
        self.endpoint = endpoint
        self.timeout = timeout
        self.topics = None if topics is None else set(topics)
        self._sock = ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            secret, public, server_public = (k.encode() if isinstance(k, str) else k
                                             for k in curve)
            self._sock.curve_secretkey = secret
            self._sock.curve_publickey = public
            self._sock.curve_serverkey = server_public
        for topic in (self.topics if self.topics is not None else [""]):
            self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8"))
        self._sock.connect(endpoint)

    def recv(self, timeout: float | None = None) -> tuple[str, dict] | None:
        """The next event, or None after ``timeout`` seconds (None: wait for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(wait):
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            frames = self._sock.recv_multipart()
            try:
                topic, payload = parse_event(frames)
            except ProtocolError as e:
                log.warning("ignoring a malformed event: %s", e.message)
                continue
            # SUBSCRIBE matches prefixes; the protocol's topics are whole names
            if self.topics is None or topic in self.topics:
                return topic, payload

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        while True:
            event = self.recv(self.timeout)
            if event is None:
                return
            yield event

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
