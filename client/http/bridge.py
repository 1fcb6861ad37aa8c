"""The daemon seen from the gateway's asyncio loop, through the blocking cllm client library.

Requests run on a pool of threads, one cllm Client per thread; each streamed generation runs on
a thread of its own pool and hands its pieces to the loop through an asyncio queue; one thread
follows the daemon's events. A zmq socket belongs to the thread that made it, as everywhere.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

from cllm.client import Client, ClientError, RequestError
from cllm.wire import EVENT_TOPICS

log = logging.getLogger(__name__)

MAX_STREAMS = 64          # generations driven at once; more wait for a thread
REQUEST_TIMEOUT_S = 10.0


class Bridge:
    """``socket``: the daemon's request endpoint as cllm.layout.find_socket takes it (None:
    the usual search). Call ``start()`` inside the running loop, ``await close()`` at the end."""

    def __init__(self, socket: str | None = None, *, max_streams: int = MAX_STREAMS):
        self.socket = socket
        self._requests = ThreadPoolExecutor(max_workers=8, thread_name_prefix="cllm-request")
        self._streams = ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="cllm-stream")
        self._local = threading.local()
        self._clients: list[Client] = []
        self._clients_lock = threading.Lock()
        self.streams: set[Stream] = set()   # generations being driven (touched on the loop only)
        self._stop = threading.Event()
        self._listeners: list[Callable[[str, dict], None]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._events_thread: threading.Thread | None = None

    # ---- plumbing ------------------------------------------------------------------------------

    def _client(self) -> Client:
        c = getattr(self._local, "client", None)
        if c is None:
            c = Client(self.socket, timeout=REQUEST_TIMEOUT_S, retries=1)
            self._local.client = c
            with self._clients_lock:
                self._clients.append(c)
        return c

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._events_thread = threading.Thread(target=self._follow_events, name="cllm-events",
                                               daemon=True)
        self._events_thread.start()

    async def close(self, timeout: float = 3.0) -> None:
        """Cancel the generations still running, then close every client once its thread is
        done with it (a zmq socket must not be closed under the thread using it)."""
        self._stop.set()
        for stream in list(self.streams):
            stream.cancel()
        if self._events_thread is not None:
            await self.loop.run_in_executor(None, self._events_thread.join, timeout)
        self._requests.shutdown(wait=False, cancel_futures=True)
        self._streams.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.streams:
            log.warning("%d generations still running at exit; their sockets are left to the OS",
                        len(self.streams))
            return
        with self._clients_lock:
            for c in self._clients:
                c.close()

    # ---- requests ------------------------------------------------------------------------------

    async def request(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """The op's result; raises cllm.client's RequestError / DaemonNotRunning / ClientError."""
        return await self.loop.run_in_executor(
            self._requests, lambda: self._client().request(op, timeout=timeout, **args))

    async def models(self) -> list[dict]:
        """The daemon's named models as [{name, parameters, context, active}], the active one
        first (models.list; a daemon from before named models has one, from model.info)."""
        try:
            listing = await self.request("models.list")
        except RequestError as e:
            if e.code != "unknown_op":
                raise
            info = await self.request("model.info")
            return [{"name": info["name"], "parameters": info.get("parameters"),
                     "context": (info.get("config") or {}).get("context"), "active": True}]
        models = [{"name": m["name"], "parameters": m.get("parameters"), "context": m.get("context"),
                   "active": m["name"] == listing.get("active")} for m in listing.get("models") or []]
        return sorted(models, key=lambda m: not m["active"])

    async def use(self, name: str) -> dict:
        """Make ``name`` the active model (model.use): training, the queue and generation follow."""
        return await self.request("model.use", name=name, timeout=120)

    # ---- generation ----------------------------------------------------------------------------

    def generate(self, prompt: str, opts: dict) -> "Stream":
        stream = Stream(self, prompt, opts)
        self.streams.add(stream)
        stream._future.add_done_callback(lambda _: self.streams.discard(stream))
        return stream

    # ---- events --------------------------------------------------------------------------------

    def on_event(self, listener: Callable[[str, dict], None]) -> None:
        """``listener(topic, payload)`` is called on the loop for every event of the daemon."""
        self._listeners.append(listener)

    def _deliver(self, topic: str, payload: dict) -> None:
        for listener in self._listeners:
            try:
                listener(topic, payload)
            except Exception:
                log.exception("an event listener failed on a %s event", topic)

    def _follow_events(self) -> None:
        # The SUB socket reconnects by itself when the daemon comes back; a Client that cannot
        # even be made (no socket yet) is retried.
        while not self._stop.is_set():
            try:
                client = Client(self.socket, timeout=REQUEST_TIMEOUT_S)
            except ClientError as e:
                log.debug("no events yet: %s", e)
                self._stop.wait(1.0)
                continue
            try:
                with client.subscribe(EVENT_TOPICS) as sub:
                    while not self._stop.is_set():
                        event = sub.recv(0.5)
                        if event is not None:
                            self.loop.call_soon_threadsafe(self._deliver, *event)
            finally:
                client.close()


class Stream:
    """One streamed generation. ``async for piece in stream`` yields the text pieces; then
    ``stats`` holds the done event's statistics and ``first_token_s`` the time to the first
    piece. ``cancel()`` (from the loop, e.g. when the HTTP client went away) stops it in the
    daemon: the driving thread sends `cancel` as soon as the next piece arrives, so at most one
    more token is made after the gateway noticed."""

    def __init__(self, bridge: Bridge, prompt: str, opts: dict):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self._loop = bridge.loop
        self.stats: dict | None = None
        self.first_token_s: float | None = None
        self.error: Exception | None = None
        self.pieces = 0
        self.started = time.perf_counter()
        self._future = bridge.loop.run_in_executor(bridge._streams, self._drive, bridge, prompt, opts)

    def _put(self, kind: str, value: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))

    def _drive(self, bridge: Bridge, prompt: str, opts: dict) -> None:
        try:
            if self._cancel.is_set():
                self._put("done", {"tokens_prompt": 0, "tokens_generated": 0, "stop_reason": "cancelled"})
                return
            gen = bridge._client().generate(prompt, **opts)
            try:
                for piece in gen:
                    self._put("token", piece)
                    if self._cancel.is_set():
                        stats = gen.cancel(wait=True) or {}
                        log.info("generation %s cancelled: the HTTP client went away; the daemon "
                                 "stopped after %s tokens with stop_reason %s", gen.id,
                                 stats.get("tokens_generated"), stats.get("stop_reason"))
                        break
            finally:
                gen.close()
            self._put("done", gen.stats or {})
        except (ClientError, RequestError) as e:
            self._put("error", e)
        except Exception as e:  # a bug here must still end the HTTP reply
            log.exception("generation driver failed")
            self._put("error", ClientError(f"the gateway failed: {e}"))

    def cancel(self) -> None:
        self._cancel.set()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        # Pieces that arrived together are joined into one: the HTTP side then writes one chunk
        # for them instead of one per token, when the daemon is faster than the client.
        pending: tuple | None = None
        while True:
            kind, value = pending or await self._queue.get()
            pending = None
            if kind == "token":
                if self.first_token_s is None:
                    self.first_token_s = time.perf_counter() - self.started
                self.pieces += 1
                while not self._queue.empty():
                    nxt = self._queue.get_nowait()
                    if nxt[0] != "token":
                        pending = nxt
                        break
                    value += nxt[1]
                    self.pieces += 1
                yield value
            elif kind == "done":
                self.stats = value
                return
            else:
                self.error = value
                raise value
