"""The daemon's ZeroMQ socket loop: a ROUTER for requests and streamed replies, a PUB for events.

One thread owns every socket (``serve``). Quick handlers run inline on it; slow and streaming
handlers run on bounded worker pools and hand their replies back through a queue and a wake-up
pipe, so no other thread ever touches a socket. docs/protocol.md is the contract.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import socket as pysocket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import zmq

from cllmd import __version__
from cllmd.protocol import (
    BAD_REQUEST, BUSY, CANCELLED, INTERNAL, NOT_FOUND, OP_SPECS, PROTOCOL_VERSION, TOO_LARGE,
    UNAVAILABLE, UNKNOWN_OP, ArgsSpec, ProtocolError, Request, as_spec, encode,
    error_from_exception, make_event, parse_request, peek_envelope, peek_id, reply_error, reply_ok, stream_done,
    stream_token, validate_args,
)

log = logging.getLogger(__name__)

IPC_PATH_MAX = 107          # sizeof(sockaddr_un.sun_path) - 1
POLL_MS = 100               # loop turn when idle: bounds heartbeat and stop latency
BACKLOG_POLL_MS = 10        # loop turn while some client's queue is full
RECV_BATCH = 64             # messages taken from one socket per turn, for fairness
OUTBOX_BATCH = 256          # workers' replies and events sent per turn, likewise
# A frame larger than this is not decoded on the socket thread: its id and op are read (the
# rest skipped, allocating nothing) and a pool worker decodes and checks it. Ops served inline
# take small arguments only, so they refuse such a frame. Below it, decoding and checking take
# ~0.2 ms at most (2,700 ids): a ping waits behind one such frame of each other connection.
INLINE_DECODE_BYTES = 8 * 1024
MALFORMED_LOG_EVERY_S = 10  # malformed input is logged at most this often (fuzzers are loud)
# Messages libzmq queues for one peer before send says EAGAIN and the server's own backlog
# (counted in bytes, capped) takes over. libzmq's default of 1,000 would let one slow reader
# hold 1,000 replies of up to max_message_bytes each inside libzmq, out of any cap's reach.
SEND_HWM = 64
# Requests libzmq reads ahead from one connection before the socket thread takes them; beyond
# it libzmq stops reading that connection and the client's own queue holds what it sends
# (nothing is lost or refused). libzmq's default of 1,000 let a client that sends faster than
# the socket thread reads pile its frames up in the daemon: issue 11's attack (10,000 messages,
# among them 1-20 MiB tokenize requests, from 8 connections) peaked at 2.3x idle RSS, 1.3x
# with 8 (docs/benchmarks.md, "Reliability"). At most RECV_HWM x hard_max_bytes per connection.
RECV_HWM = 8
# Replies are sent without copy (pyzmq copies those under its copy_threshold, 64 KiB, anyway):
# libzmq keeps a reference to the frame's bytes instead of a second copy of a 16 MiB reply.


@dataclass
class Context:
    """What a handler knows about the request it serves.

    ``cancelled`` is set by a ``cancel`` request from the same client, by the client vanishing
    or stalling, and by server shutdown; long handlers check it between units of work.
    """
    request: Request
    client: bytes                     # the ZeroMQ routing identity of the requesting connection
    transport: str                    # "ipc" or "tcp"
    cancelled: threading.Event = field(default_factory=threading.Event)
    _route: int = field(default=0, repr=False)


@dataclass
class _Job:
    """A request handed to a pool. ``state`` goes queued -> running (a worker took it) or
    queued -> dropped (cancelled before any worker took it), under Server._claim_lock."""
    op: "_Op"
    req: Request
    ctx: Context
    client: tuple                     # (route, identity)
    envelope: list
    key: tuple                        # (route, identity, request id)
    pool: "_Pool"
    state: str = "queued"
    frame: memoryview | None = None   # still to decode (a large request, libzmq's buffer), by the worker
    nbytes: int = 0                   # the large request's frame size, held against its pool


@dataclass
class _Op:
    handler: Callable[[Request, Context], Any]
    spec: ArgsSpec | None
    stream: bool
    blocking: bool
    pool: str


class _Pool:
    """A fixed set of worker threads and a bounded number of accepted jobs, and of the bytes
    of their large request frames (each held whole, then decoded, while it runs or waits).

    ``accepted`` (running + waiting) and ``accepted_bytes`` are counted by the socket thread
    alone: incremented on submit, decremented when the job's "finished" notice comes back
    through the outbox (or when it is dropped before it started).
    """

    def __init__(self, name: str, workers: int, max_pending: int, run: Callable[[_Job], None],
                 max_bytes: int):
        if workers < 1:
            raise ValueError(f"pool {name!r}: workers must be >= 1, got {workers}")
        if max_pending < 0:
            raise ValueError(f"pool {name!r}: max_pending must be >= 0, got {max_pending}")
        self.name, self.workers, self.max_pending = name, workers, max_pending
        self.max_bytes = max_bytes
        self.accepted = 0
        self.accepted_bytes = 0
        self.running = 0
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._run = run
        self._threads = [threading.Thread(target=self._loop, name=f"cllmd-{name}-{i}",
                                          daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def full(self) -> bool:
        return self.accepted >= self.workers + self.max_pending

    def full_of_bytes(self, nbytes: int) -> bool:
        # one request always fits an idle pool, however large
        return self.accepted_bytes > 0 and self.accepted_bytes + nbytes > self.max_bytes

    def submit(self, job: _Job) -> None:
        self.accepted += 1
        self.accepted_bytes += job.nbytes
        self._jobs.put(job)

    def release(self, job: _Job) -> None:
        self.accepted -= 1
        self.accepted_bytes -= job.nbytes

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self.running += 1
            try:
                self._run(job)
            finally:
                with self._lock:
                    self.running -= 1

    def stats(self) -> dict:
        with self._lock:
            running = self.running
        return {"running": running, "waiting": max(0, self.accepted - running),
                "workers": self.workers, "max_pending": self.max_pending}

    def stop(self, timeout: float) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("worker %s still busy at shutdown; leaving it behind", t.name)


def _ipc_path(endpoint: str) -> str:
    if not endpoint.startswith("ipc://"):
        raise ValueError(f"expected an ipc:// endpoint, got {endpoint!r} (TCP goes through tcp=, "
                         f"and only with CURVE keys)")
    return endpoint[len("ipc://"):]


def _someone_listening(path: str) -> bool:
    s = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Server:
    """Serves registered operations on ZeroMQ; see docs/protocol.md.

    Construct (binds the sockets, so errors surface here), ``register`` the operations, then run
    ``serve(stop)`` on a dedicated thread; ``publish`` may be called from any thread;
    ``close()`` after ``serve`` has returned (or it stops it first).

    ``endpoint``/``events_endpoint``: ipc:// paths in an existing runtime directory (the files
    are made mode 0660). ``workers``/``max_pending``: the "default" pool (``add_pool`` for more).
    ``tcp``/``events_tcp``: optional TCP endpoints ("tcp://host:*" picks a port; see
    ``tcp_endpoint``), served only with ``curve=(secret_key, public_key, authorized_keys_dir)``
    (Z85 keys; the directory holds the clients' public ``*.key`` certificates).
    ``client_timeout``: seconds a client may leave its replies unread before its requests are
    cancelled. ``backlog_bytes``: bytes of unread replies the server holds for one client
    (beyond libzmq's SEND_HWM messages) before it drops them, cancels that client's requests and
    leaves it one ``cancelled`` error per dropped request; default 4 x ``max_message_bytes``.
    ``drain_timeout``: seconds running requests get to finish once ``stop`` is set.
    """

    def __init__(self, endpoint: str, events_endpoint: str, *, max_message_bytes: int,
                 workers: int = 2, max_pending: int = 8, tcp: str | None = None,
                 events_tcp: str | None = None,
                 curve: tuple[bytes | str, bytes | str, str] | None = None,
                 client_timeout: float = 10.0, drain_timeout: float = 2.0,
                 backlog_bytes: int | None = None):
        if max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be at least 1024, got {max_message_bytes}")
        if (tcp or events_tcp) and curve is None:
            raise ValueError("TCP needs CURVE keys: pass curve=(secret_key, public_key, "
                             "authorized_keys_dir); plain TCP is refused")
        self.max_message_bytes = max_message_bytes
        # Frames past the hard cap are cut off by libzmq itself (the peer is disconnected,
        # nothing is allocated); between the limit and the cap they get a too_large reply.
        self.hard_max_bytes = 2 * max_message_bytes + 64 * 1024
        self.client_timeout = client_timeout
        self.backlog_bytes = backlog_bytes if backlog_bytes is not None else 4 * max_message_bytes
        if self.backlog_bytes < max_message_bytes:
            raise ValueError(f"backlog_bytes ({self.backlog_bytes}) must hold at least one message "
                             f"of max_message_bytes ({max_message_bytes})")
        self.drain_timeout = drain_timeout

        self._ctx = zmq.Context()
        self._routers: list[tuple[zmq.Socket, str]] = []
        self._pubs: list[zmq.Socket] = []
        self._ipc_files: list[str] = []
        self._auth = None
        self.tcp_endpoint: str | None = None
        self.events_tcp_endpoint: str | None = None
        self._ops: dict[str, _Op] = {}
        self._pools: dict[str, _Pool] = {}
        self._active: dict[tuple, _Job] = {}           # (route, identity, id) -> job
        self._claim_lock = threading.Lock()
        self._backlog: dict[tuple, collections.deque] = {}   # (route, identity) -> frames
        self._stalled_since: dict[tuple, float] = {}
        self._backlog_size: dict[tuple, int] = {}          # (route, identity) -> bytes waiting
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._seq: dict[str, int] = {}                 # topic -> last sequence number
        self._seq_lock = threading.Lock()
        self._draining = False
        self.starting: str | None = None   # what the daemon is doing while it starts up
        self._closed = False
        self._stop_internal = threading.Event()
        self._serving = threading.Lock()
        self._malformed_count = 0
        self._malformed_logged_at = float("-inf")
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

        try:
            router = self._new_router()
            self._routers.append((router, "ipc"))
            self._bind_ipc(router, endpoint)
            pub = self._ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            self._pubs.append(pub)
            self._bind_ipc(pub, events_endpoint)
            if tcp or events_tcp:
                self._setup_curve(curve, tcp, events_tcp)
        except BaseException:
            self._close_sockets(linger=0)
            raise
        self.endpoint, self.events_endpoint = endpoint, events_endpoint
        self.add_pool("default", workers, max_pending)
        self.register("ping", self._op_ping)
        self.register("cancel", self._op_cancel)

    # ------------------------------------------------------------------ setup

    def _new_router(self) -> zmq.Socket:
        s = self._ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)   # unknown peer -> EHOSTUNREACH, full peer -> EAGAIN
        s.setsockopt(zmq.MAXMSGSIZE, self.hard_max_bytes)
        s.setsockopt(zmq.SNDHWM, SEND_HWM)
        s.setsockopt(zmq.RCVHWM, RECV_HWM)
        s.setsockopt(zmq.LINGER, 200)
        return s

    def _bind_ipc(self, sock: zmq.Socket, endpoint: str) -> None:
        path = _ipc_path(endpoint)
        abstract = path.startswith("@")
        if not abstract:
            if len(os.fsencode(path)) > IPC_PATH_MAX:
                raise ValueError(f"socket path {path!r} is longer than {IPC_PATH_MAX} bytes, the "
                                 f"limit of a unix socket address; use a shorter runtime directory")
            if not os.path.isdir(os.path.dirname(path) or "."):
                raise FileNotFoundError(f"runtime directory {os.path.dirname(path)!r} does not "
                                        f"exist (it is created by the caller)")
            # libzmq silently replaces an existing socket file: refuse if a live server owns it.
            if _someone_listening(path):
                raise RuntimeError(f"another process is already serving on {path}")
        sock.bind(endpoint)
        if not abstract:
            self._ipc_files.append(path)
            os.chmod(path, 0o660)   # the socket's group is the access control (DESIGN.md)

    def _setup_curve(self, curve: tuple, tcp: str | None, events_tcp: str | None) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        secret, public, authorized_dir = curve
        secret = secret.encode() if isinstance(secret, str) else secret
        public = public.encode() if isinstance(public, str) else public
        if len(secret) != 40 or len(public) != 40:
            raise ValueError("CURVE keys must be 40-character Z85 strings (zmq.curve_keypair())")
        if not os.path.isdir(authorized_dir):
            raise FileNotFoundError(f"authorized keys directory {authorized_dir!r} does not exist")
        self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger(__name__ + ".auth"))
        self._auth.start()
        self._auth.configure_curve(domain="*", location=authorized_dir)
        if not any(name.endswith(".key") for name in os.listdir(authorized_dir)):
            log.warning("no *.key files in %s: no TCP client can connect", authorized_dir)

        def curve_socket(kind: int) -> zmq.Socket:
            s = self._new_router() if kind == zmq.ROUTER else self._ctx.socket(kind)
            if kind == zmq.PUB:
                s.setsockopt(zmq.LINGER, 0)
            s.curve_secretkey = secret
            s.curve_publickey = public
            s.curve_server = True
            return s

        if tcp:
            router = curve_socket(zmq.ROUTER)
            self._routers.append((router, "tcp"))
            router.bind(tcp)
            self.tcp_endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        if events_tcp:
            pub = curve_socket(zmq.PUB)
            self._pubs.append(pub)
            pub.bind(events_tcp)
            self.events_tcp_endpoint = pub.getsockopt(zmq.LAST_ENDPOINT).decode()

    def add_pool(self, name: str, workers: int, max_pending: int, max_bytes: int | None = None) -> None:
        """A separate bounded pool, e.g. so generations cannot starve model.save. ``max_bytes``:
        the bytes of large request frames (over INLINE_DECODE_BYTES) it holds running or
        waiting, beyond which it answers ``busy``; default 2 x ``max_message_bytes``."""
        if name in self._pools:
            raise ValueError(f"pool {name!r} already exists")
        max_bytes = max_bytes if max_bytes is not None else 2 * self.max_message_bytes
        # copy-on-write: the socket thread may be reading the table while the daemon starts up
        self._pools = {**self._pools, name: _Pool(name, workers, max_pending, self._execute, max_bytes)}

    def register(self, op: str, handler: Callable[[Request, Context], Any], *,
                 args_spec: ArgsSpec | Mapping[str, Any] | None = None, stream: bool = False,
                 blocking: bool = False, pool: str = "default") -> None:
        """Serve ``op`` with ``handler(request, context)``; before ``serve`` or while it runs
        (the daemon serves ``ping`` while it starts, then registers the rest).

        Inline handlers (the default) run on the socket thread and must return within a
        millisecond or so. ``blocking=True`` runs on ``pool`` (full -> ``busy`` at once).
        ``stream=True`` handlers are generators run on ``pool``: each yielded dict (or str,
        meaning its text) becomes a token event, the returned dict becomes the done event; they
        must check ``context.cancelled`` between tokens and then return with stop_reason
        "cancelled". A request with ``stream: false`` gets one reply ``{text, **done stats}``.
        Raise ProtocolError(code, message) for an error reply with that code; any other
        exception becomes ``internal`` and is logged with its traceback.
        ``args_spec`` defaults to the op's entry in protocol.OP_SPECS (no check if none).
        """
        if op in self._ops and op in ("ping", "cancel"):
            raise ValueError(f"op {op!r} is built into the server")
        if pool not in self._pools:
            raise ValueError(f"no pool named {pool!r} (add_pool first)")
        spec = args_spec if args_spec is not None else OP_SPECS.get(op)
        self._ops = {**self._ops, op: _Op(handler, as_spec(spec) if spec is not None else None,
                                          stream, blocking or stream, pool)}

    def pool_stats(self) -> dict[str, dict]:
        """{pool name: {running, waiting, workers, max_pending}}, for status reports."""
        return {name: p.stats() for name, p in self._pools.items()}

    # ------------------------------------------------------------------ built-in ops

    def _op_ping(self, req: Request, ctx: Context) -> dict:
        reply = {"pong": True, "time": time.time(), "version": PROTOCOL_VERSION,
                 "daemon": f"cllmd {__version__}"}
        starting = self.starting
        if starting is not None:
            reply["starting"] = starting
        return reply

    def _op_cancel(self, req: Request, ctx: Context) -> dict:
        target = req.args["id"]
        job = self._active.get((ctx._route, ctx.client, target))
        if job is None:
            raise ProtocolError(NOT_FOUND, f"no request with id {target!r} in progress for "
                                           f"this client")
        self._cancel_job(job, f"{job.req.op} was cancelled before it started")
        return {"cancelled": True}

    def _cancel_job(self, job: _Job, message: str, code: str = CANCELLED) -> None:
        """Set the job's cancel event; a job no worker has taken yet is answered and dropped
        at once, so it neither waits for a worker nor holds a pool slot (socket thread only)."""
        job.ctx.cancelled.set()
        with self._claim_lock:
            dropped = job.state == "queued"
            if dropped:
                job.state = "dropped"
        if dropped:
            del self._active[job.key]
            job.pool.release(job)
            self._send(job.client, job.envelope,
                       self._encode_reply(reply_error(job.req.id, code, message)))

    # ------------------------------------------------------------------ any thread

    def publish(self, topic: str, payload: Mapping[str, Any]) -> None:
        """Send an event on the PUB socket(s); thread-safe (the socket thread does the send)."""
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"topic must be a non-empty str, got {topic!r}")
        with self._seq_lock:
            seq = self._seq[topic] = self._seq.get(topic, 0) + 1
        frame = encode(make_event(topic, payload, seq=seq, time=time.time()))
        if len(frame) > self.max_message_bytes:
            raise ProtocolError(TOO_LARGE, f"event {topic!r} of {len(frame)} bytes exceeds the "
                                           f"limit of {self.max_message_bytes} bytes")
        self._post(("pub", topic.encode("utf-8"), frame))

    def _post(self, item: tuple) -> None:
        self._outbox.put(item)
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w is None:
                return
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:   # the pipe is full: the socket thread is already woken
                pass

    def _encode_reply(self, msg: dict) -> bytes | memoryview:
        rid = msg.get("id")
        try:
            frame = encode(msg)
        except ProtocolError as e:
            log.error("reply to request %r cannot be encoded: %s", rid, e.message)
            return encode(reply_error(rid, INTERNAL, e.message))
        if len(frame) > self.max_message_bytes:
            log.warning("reply to request %r is %d bytes, over the limit", rid, len(frame))
            return encode(reply_error(rid, TOO_LARGE, f"reply of {len(frame)} bytes exceeds the "
                                                      f"limit of {self.max_message_bytes} bytes"))
        return frame

    # ------------------------------------------------------------------ worker threads

    def _execute(self, job: _Job) -> None:
        with self._claim_lock:
            if job.state == "dropped":      # already answered and accounted for
                return
            job.state = "running"
        op, req, ctx = job.op, job.req, job.ctx

        def send(msg: dict) -> None:
            self._post(("send", job.client, job.envelope, self._encode_reply(msg)))

        # The final reply goes with the "finished" notice, so the socket thread frees the job's
        # slot as it sends it: a client sending its next request on that reply finds it free.
        final = None
        try:
            if job.frame is not None:
                req = ctx.request = job.req = self._decode_large(job)
                job.frame = None
            if ctx.cancelled.is_set():
                final = reply_error(req.id, CANCELLED, f"{req.op} was cancelled before it started")
            elif op.stream:
                final = self._run_stream(op, req, ctx, send)
            else:
                final = reply_ok(req.id, op.handler(req, ctx))
        except ProtocolError as e:
            final = error_from_exception(req.id, e)
        except Exception as e:
            log.exception("handler for %s (request %r) failed", req.op, req.id)
            final = reply_error(req.id, INTERNAL, f"{type(e).__name__}: {e}")
        finally:
            self._post(("finished", job, None if final is None else self._encode_reply(final)))

    def _decode_large(self, job: _Job) -> Request:
        """On the worker: the whole request of a large frame, checked as the socket thread
        checks small ones (ProtocolError -> the error reply)."""
        try:
            req = parse_request(job.frame, self.max_message_bytes)
        except ProtocolError as e:
            self._post(("malformed", e.message))
            raise ProtocolError(e.code, e.message, **e.extra) from None
        if (req.id, req.op) != (job.req.id, job.req.op):   # a map with a key twice
            raise ProtocolError(BAD_REQUEST, "field 'id' or 'op' given twice")
        return Request(req.id, req.op, validate_args(job.op.spec, req.args, req.op))

    def _run_stream(self, op: _Op, req: Request, ctx: Context,
                    send: Callable[[dict], None]) -> dict:
        gen = op.handler(req, ctx)
        if not isinstance(gen, Iterator):
            raise TypeError(f"stream handler for {req.op} returned {type(gen).__name__}, "
                            f"not a generator")
        collect = req.args.get("stream", True) is False
        pieces: list[str] = []
        while True:
            try:
                item = next(gen)
            except StopIteration as stop:
                stats = stop.value or {}
                break
            if isinstance(item, str):
                item = {"text": item}
            elif not isinstance(item, Mapping):
                gen.close()
                raise TypeError(f"stream handler for {req.op} yielded {type(item).__name__}, "
                                f"expected a dict or str")
            text = item.get("text", "")
            if collect:
                pieces.append(text)
            else:
                extra = {k: v for k, v in item.items() if k not in ("v", "id", "event", "text")}
                send(stream_token(req.id, text, **extra))
        if not isinstance(stats, Mapping):
            raise TypeError(f"stream handler for {req.op} returned {type(stats).__name__}, "
                            f"expected a dict of stats")
        if collect:
            return reply_ok(req.id, {"text": "".join(pieces), **stats})
        return stream_done(req.id, stats)

    # ------------------------------------------------------------------ the socket thread

    def serve(self, stop: threading.Event, heartbeat: Callable[[], None] | None = None) -> None:
        """Run the socket loop until ``stop`` is set, then drain: in-flight requests are
        cancelled and given ``drain_timeout`` seconds to deliver their last messages."""
        if not self._serving.acquire(blocking=False):
            raise RuntimeError("serve() is already running")
        try:
            self._serve(stop, heartbeat)
        finally:
            self._serving.release()

    def _serve(self, stop: threading.Event, heartbeat: Callable[[], None] | None) -> None:
        if self._closed:
            raise RuntimeError("server is closed")
        poller = zmq.Poller()
        for sock, _ in self._routers:
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        drain_deadline, more = None, False
        log.info("serving on %s (events on %s)%s", self.endpoint, self.events_endpoint,
                 f", CURVE on {self.tcp_endpoint}" if self.tcp_endpoint else "")
        while True:
            if drain_deadline is None and (stop.is_set() or self._stop_internal.is_set()):
                self._draining = True
                drain_deadline = time.monotonic() + self.drain_timeout
                for job in list(self._active.values()):
                    self._cancel_job(job, "the daemon is shutting down", UNAVAILABLE)
            if drain_deadline is not None and (
                    (not self._active and self._outbox.empty() and not self._backlog)
                    or time.monotonic() > drain_deadline):
                break
            ready = dict(poller.poll(0 if more else BACKLOG_POLL_MS if self._backlog else POLL_MS))
            if heartbeat is not None:
                heartbeat()
            for route, (sock, transport) in enumerate(self._routers):
                if sock in ready:
                    self._receive(route, sock, transport)
            if self._wake_r in ready:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            more = self._drain_outbox()
            if self._backlog:
                self._flush_backlog()
        if self._active:
            log.warning("%d request(s) still running after the drain timeout", len(self._active))
        log.info("server loop stopped")

    def _receive(self, route: int, sock: zmq.Socket, transport: str) -> None:
        for _ in range(RECV_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            # a large frame stays in libzmq's buffer, read through a memoryview: copying it
            # took the socket thread 13-23 ms for 9-16 MiB under issue 11's attack (the pings
            # behind it waited), and held the frame twice meanwhile
            self._on_frames(route, transport, [f.bytes if len(f) <= INLINE_DECODE_BYTES else f.buffer
                                               for f in frames])

    def _on_frames(self, route: int, transport: str, frames: list[bytes | memoryview]) -> None:
        identity, body = frames[0], frames[1:]
        envelope: list[bytes] = []
        if len(body) >= 2 and body[0] == b"":   # a REQ socket's delimiter, echoed back
            envelope, body = [b""], body[1:]
        client = (route, identity)
        if len(body) != 1:
            self._malformed(f"{len(body)} frames instead of one")
            self._send(client, envelope, self._encode_reply(reply_error(
                None, BAD_REQUEST, f"a request is exactly one msgpack frame, got {len(body)}")))
            return
        if INLINE_DECODE_BYTES < len(body[0]) <= self.max_message_bytes:
            self._dispatch_large(route, transport, client, envelope, body[0])
            return
        try:
            req = parse_request(body[0], self.max_message_bytes)
        except ProtocolError as e:
            self._malformed(e.message)
            self._send(client, envelope, self._encode_reply(error_from_exception(e.request_id, e)))
            return
        self._dispatch(route, transport, client, envelope, req)

    def _dispatch_large(self, route: int, transport: str, client: tuple, envelope: list[bytes],
                        frame: memoryview) -> None:
        """A frame over INLINE_DECODE_BYTES: routed by its id and op alone (the socket thread's
        work does not grow with the frame's contents); a pool worker decodes the rest."""
        def refuse(rid, code: str, message: str) -> None:
            self._malformed(message)
            self._send(client, envelope, self._encode_reply(reply_error(rid, code, message)))

        try:
            rid, name = peek_envelope(frame)
        except ProtocolError as e:
            refuse(None, e.code, e.message)
            return
        if rid is None:
            refuse(None, BAD_REQUEST, f"a request of {len(frame)} bytes without a valid field 'id' "
                                      f"(a str of 1..256 characters or an integer)")
            return
        op = self._ops.get(name) if name is not None else None
        if op is None:
            refuse(rid, UNKNOWN_OP if name else BAD_REQUEST,
                   f"unknown op {name!r}" if name else "missing or invalid field 'op'")
        elif not op.blocking:
            refuse(rid, TOO_LARGE, f"a {name} request is at most {INLINE_DECODE_BYTES} bytes, "
                                   f"this one is {len(frame)}")
        else:
            self._dispatch(route, transport, client, envelope, Request(rid, name, {}), frame)

    def _malformed(self, what: str) -> None:
        self._malformed_count += 1
        now = time.monotonic()
        if now - self._malformed_logged_at >= MALFORMED_LOG_EVERY_S:
            log.warning("malformed request(s): %d since the last report; latest: %s",
                        self._malformed_count, what)
            self._malformed_count = 0
            self._malformed_logged_at = now

    def _dispatch(self, route: int, transport: str, client: tuple, envelope: list[bytes],
                  req: Request, frame: memoryview | None = None) -> None:
        """Answer or hand on a request; with `frame` (a large one, see _dispatch_large) only
        its id and op are known yet, and its pool's worker decodes and checks it."""
        def answer(msg: dict) -> None:
            self._send(client, envelope, self._encode_reply(msg))

        starting = self.starting
        if starting is not None and req.op not in ("ping", "cancel"):
            answer(reply_error(req.id, UNAVAILABLE, f"cllmd is starting: {starting}",
                               starting=starting))
            return
        op = self._ops.get(req.op)
        if op is None:
            answer(reply_error(req.id, UNKNOWN_OP, f"unknown op {req.op!r}"))
            return
        if frame is None:
            try:
                req = Request(req.id, req.op, validate_args(op.spec, req.args, req.op))
            except ProtocolError as e:
                answer(error_from_exception(req.id, e))
                return
        ctx = Context(req, client[1], transport, _route=route)
        if not op.blocking:
            try:
                answer(reply_ok(req.id, op.handler(req, ctx)))
            except ProtocolError as e:
                answer(error_from_exception(req.id, e))
            except Exception as e:
                log.exception("handler for %s (request %r) failed", req.op, req.id)
                answer(reply_error(req.id, INTERNAL, f"{type(e).__name__}: {e}"))
            return
        key = (route, client[1], req.id)
        pool = self._pools[op.pool]
        if self._draining:
            answer(reply_error(req.id, UNAVAILABLE, "the daemon is shutting down"))
        elif key in self._active:
            answer(reply_error(req.id, BAD_REQUEST, f"id {req.id!r} is already used by a request "
                                                    f"in progress"))
        elif pool.full():
            answer(reply_error(req.id, BUSY, f"{pool.accepted} requests running or waiting "
                                             f"({pool.workers} at once, {pool.max_pending} "
                                             f"waiting); retry later"))
        elif frame is not None and pool.full_of_bytes(len(frame)):
            answer(reply_error(req.id, BUSY, f"{pool.accepted_bytes} bytes of large requests running or "
                                             f"waiting for {req.op}'s workers, at most {pool.max_bytes} "
                                             f"with this one's {len(frame)}; retry later"))
        else:
            job = _Job(op, req, ctx, client, envelope, key, pool, frame=frame,
                       nbytes=len(frame) if frame is not None else 0)
            self._active[key] = job
            pool.submit(job)

    def _drain_outbox(self) -> bool:
        """Sends what the workers posted, OUTBOX_BATCH items at most (a burst of events must not
        keep the requests waiting); returns whether some are left for the next turn."""
        for _ in range(OUTBOX_BATCH):
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return False
            kind = item[0]
            if kind == "send":
                self._send(item[1], item[2], item[3])
            elif kind == "pub":
                for pub in self._pubs:
                    try:
                        pub.send_multipart([item[1], item[2]], zmq.NOBLOCK)
                    except zmq.Again:   # PUB drops for slow subscribers by design
                        pass
            elif kind == "finished":   # (finished, job, its final reply or None)
                job = item[1]
                self._active.pop(job.key, None)
                job.pool.release(job)
                if item[2] is not None:
                    self._send(job.client, job.envelope, item[2])
            elif kind == "malformed":
                self._malformed(item[1])
        return not self._outbox.empty()

    def _send(self, client: tuple, envelope: list[bytes], frame: bytes | memoryview) -> None:
        parts = [client[1], *envelope, frame]
        pending = self._backlog.get(client)
        if pending is not None:        # keep order behind what is already waiting
            pending.append(parts)
            self._backlog_size[client] += len(frame)
            if self._backlog_size[client] > self.backlog_bytes:
                self._overflow(client)
            return
        try:
            self._routers[client[0]][0].send_multipart(parts, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._backlog[client] = collections.deque([parts])
            self._backlog_size[client] = len(frame)
            self._stalled_since[client] = time.monotonic()
        except zmq.ZMQError as e:
            if e.errno == errno.EHOSTUNREACH:
                self._client_gone(client, "disconnected")
            else:
                log.error("send to client %s failed: %s", client[1].hex(), e)

    def _flush_backlog(self) -> None:
        now = time.monotonic()
        for client, pending in list(self._backlog.items()):
            sock = self._routers[client[0]][0]
            while pending:
                try:
                    sock.send_multipart(pending[0], zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                except zmq.ZMQError as e:
                    if e.errno == errno.EHOSTUNREACH:
                        self._client_gone(client, "disconnected")
                    pending.clear()
                    break
                self._backlog_size[client] -= len(pending.popleft()[-1])
                self._stalled_since[client] = now
            if not pending:
                self._forget_backlog(client)
            elif now - self._stalled_since[client] > self.client_timeout:
                log.warning("client %s has read nothing for %.0f s: dropping %d message(s)",
                            client[1].hex(), self.client_timeout, len(pending))
                self._forget_backlog(client)
                self._client_gone(client, "stalled")

    def _forget_backlog(self, client: tuple) -> None:
        del self._backlog[client]
        del self._stalled_since[client]
        del self._backlog_size[client]

    def _overflow(self, client: tuple) -> None:
        """A client reads slower than its replies come: drop what waits for it, cancel its
        requests, and leave it one small error per request whose replies were dropped."""
        pending, size = self._backlog[client], self._backlog_size[client]
        ids = list(dict.fromkeys(peek_id(parts[-1]) for parts in pending))
        log.warning("client %s left %d bytes of replies unread (limit %d): dropping %d message(s)"
                    " and cancelling its requests", client[1].hex(), size, self.backlog_bytes,
                    len(pending))
        envelope = pending[0][1:-1]
        pending.clear()
        self._backlog_size[client] = 0
        self._client_gone(client, "too slow")
        message = (f"replies were dropped: {size} bytes waited unread for this client, over the "
                   f"limit of {self.backlog_bytes}; the request was cancelled")
        answered = {peek_id(parts[-1]) for parts in pending}   # queued jobs cancelled just now
        for rid in (rid for rid in ids if rid not in answered):
            frame = self._encode_reply(reply_error(rid, CANCELLED, message))
            pending.append([client[1], *envelope, frame])
            self._backlog_size[client] += len(frame)

    def _client_gone(self, client: tuple, why: str) -> None:
        route, identity = client
        n = 0
        for (r, ident, _), job in list(self._active.items()):
            if r == route and ident == identity and not job.ctx.cancelled.is_set():
                self._cancel_job(job, f"client {why}")
                n += 1
        if n:
            log.info("client %s %s: cancelled %d request(s)", identity.hex(), why, n)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Stop serving (if needed), stop the workers, close the sockets, remove socket files."""
        if self._closed:
            return
        self._stop_internal.set()
        self._wake()
        with self._serving:            # waits for a running serve() to drain and return
            self._closed = True
        for job in self._active.values():
            job.ctx.cancelled.set()
        for pool in self._pools.values():
            pool.stop(timeout=self.drain_timeout)
        self._close_sockets()

    def _close_sockets(self, linger: int | None = None) -> None:
        # routers keep their LINGER (200 ms) on a normal close, to deliver the last replies
        for sock, _ in self._routers:
            sock.close(linger)
        for pub in self._pubs:
            pub.close(0)
        self._routers, self._pubs = [], []
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._ctx.term()
        for path in self._ipc_files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._ipc_files = []
        with self._wake_lock:
            if self._wake_w is not None:
                os.close(self._wake_w)
                os.close(self._wake_r)
                self._wake_w = self._wake_r = None
