"""The dashboard's side of the server: the page's files, its live feed (one SSE stream per open
page, fed by the daemon's events and by `stats` polls while a page is open, since train events
are sent between steps and the spheres' states are seen only while steps run), the curves'
history since the gateway started, and the training controls."""
from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from pathlib import Path
from typing import Any

from aiohttp import web

from cllm.catalogue import SETTINGS
from cllm.client import ClientError, RequestError
from cllm.http.openai_api import invalid, parse_body

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
HISTORY = 4000            # curve points kept (per curve)
POLL_S = 0.5              # stats polls while a page is open
RECENT_FILES = 12
# The training settings the page's controls change: the catalogue's, with their bounds.
CONTROLS = ("lr", "batch_size", "grad_clip", "warmup", "threads")
ACTIONS = {"pause": "train.pause", "resume": "train.resume", "start": "train.start", "stop": "train.stop"}


class Hub:
    """Fans the daemon's events out to the open pages and keeps the curves' history."""

    def __init__(self, bridge) -> None:
        self.bridge = bridge
        self.pages: set[asyncio.Queue] = set()
        self.loss: deque = deque(maxlen=HISTORY)      # [step, loss]
        self.val_loss: deque = deque(maxlen=HISTORY)  # [step, val_loss]
        self.lr: deque = deque(maxlen=HISTORY)        # [step, lr]
        self._poller: asyncio.Task | None = None
        bridge.on_event(self.on_event)

    def note_train(self, t: dict) -> None:
        """A training snapshot's figures onto the curves: one point per new step; validation
        losses only when a new one was computed."""
        step = t.get("step")
        if not isinstance(step, int):
            return
        for curve, key in ((self.loss, "loss"), (self.val_loss, "val_loss"), (self.lr, "lr")):
            value = t.get(key)
            if not isinstance(value, (int, float)) or (curve and curve[-1][0] >= step):
                continue
            if key == "val_loss" and curve and curve[-1][1] == value:
                continue
            curve.append([step, float(value)])

    def on_event(self, topic: str, payload: dict) -> None:
        if topic == "train":
            self.note_train(payload)
        elif topic == "model":   # another model is active: its own steps, its own curves
            for curve in (self.loss, self.val_loss, self.lr):
                curve.clear()
        self.send(topic, payload)

    def send(self, kind: str, payload: Any) -> None:
        for q in list(self.pages):
            if q.qsize() < 256:   # a page that stopped reading loses events, not the gateway's memory
                q.put_nowait((kind, payload))

    async def _poll(self) -> None:
        while self.pages:
            try:
                stats = await self.bridge.request("stats", timeout=2.0)
                self.note_train(stats.get("train") or {})
                self.send("stats", stats)
            except (ClientError, RequestError) as e:
                self.send("down", {"reason": str(e)})
            await asyncio.sleep(POLL_S)

    async def hello(self) -> dict:
        out: dict = {"history": {"loss": list(self.loss), "val_loss": list(self.val_loss), "lr": list(self.lr)},
                     "controls": {k: control(k) for k in CONTROLS}}
        try:
            out["stats"] = await self.bridge.request("stats", timeout=2.0)
            out["queue"] = await self.bridge.request("queue.list", limit=RECENT_FILES)
            out["config"] = await self.bridge.request("train.config.get", timeout=2.0)
            out["models"] = await self.bridge.models()
        except (ClientError, RequestError) as e:
            out["down"] = str(e)
        return out

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        q: asyncio.Queue = asyncio.Queue()
        self.pages.add(q)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        try:
            await resp.write(frame("hello", await self.hello()))
            while True:
                try:
                    kind, payload = await asyncio.wait_for(q.get(), 15)
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                await resp.write(frame(kind, payload))
        except ConnectionResetError:
            pass   # the page was closed
        finally:
            self.pages.discard(q)
        return resp


def control(key: str) -> dict:
    s = SETTINGS[f"train.{key}"]
    return {"doc": s.doc, "lo": s.kind.lo, "hi": s.kind.hi, "kind": s.kind.wire.__name__}


def frame(kind: str, payload: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'), default=str)}\n\n".encode()


# --------------------------------------------------------------------------- routes


HUB = web.AppKey("hub", Hub)


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def events(request: web.Request) -> web.StreamResponse:
    return await request.app[HUB].events(request)


async def train_action(request: web.Request) -> web.Response:
    body = parse_body(await request.read())
    action = body.get("action") if isinstance(body, dict) else None
    if action not in ACTIONS:
        raise invalid(f"'action' must be one of {', '.join(ACTIONS)}, got {action!r}", "action")
    return web.json_response(await request.app[HUB].bridge.request(ACTIONS[action]))


async def set_config(request: web.Request) -> web.Response:
    body = parse_body(await request.read())
    if not isinstance(body, dict) or not body or set(body) - set(CONTROLS):
        raise invalid(f"the body must be an object of some of {', '.join(CONTROLS)}")
    return web.json_response(await request.app[HUB].bridge.request("train.config.set", **body))


async def queue(request: web.Request) -> web.Response:
    return web.json_response(await request.app[HUB].bridge.request("queue.list", limit=RECENT_FILES))


async def models(request: web.Request) -> web.Response:
    return web.json_response({"models": await request.app[HUB].bridge.models()})


async def use_model(request: web.Request) -> web.Response:
    body = parse_body(await request.read())
    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        raise invalid("'name' must be the name of one of the daemon's models", "name")
    return web.json_response(await request.app[HUB].bridge.use(name))


def add_routes(app: web.Application, bridge) -> None:
    app[HUB] = Hub(bridge)
    app.router.add_get("/", page)
    app.router.add_static("/static/", STATIC, append_version=False)
    app.router.add_get("/api/events", events)
    app.router.add_post("/api/train", train_action)
    app.router.add_post("/api/config", set_config)
    app.router.add_get("/api/queue", queue)
    app.router.add_get("/api/models", models)
    app.router.add_post("/api/models/use", use_model)
