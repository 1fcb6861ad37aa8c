"""The cllm-http server: aiohttp routes for the OpenAI-compatible API, health, metrics and the
dashboard, the bearer-token check, and the `cllm-http` command.

aiohttp, because it is one well-kept package that serves HTTP/1.1 with streamed responses and
notices a client that went away (handler cancellation), with nothing else to install.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from cllm import __version__
from cllm.client import ClientError, DaemonNotRunning, RequestError
from cllm.http import dashboard
from cllm.http import openai_api as oai
from cllm.http.bridge import Bridge
from cllm.http.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("cllm.http")

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 11435   # Ollama's 11434, plus one
TOKEN_ENV, TOKEN_FILE_ENV = "CLLM_HTTP_TOKEN", "CLLM_HTTP_TOKEN_FILE"
CREDENTIAL = "cllm-http-token"    # systemd LoadCredential= name
MAX_BODY = 16 * 1024 * 1024 + 65536
SWITCH_INTERVAL = 0.0005   # seconds; see main()

BRIDGE = web.AppKey("bridge", Bridge)
TOKEN = web.AppKey("token", str)
METRICS = web.AppKey("metrics", Metrics)


# --------------------------------------------------------------------------- errors


def error_response(err: oai.ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


def daemon_error(e: Exception) -> oai.ApiError:
    """A failure of the daemon or of reaching it, in OpenAI's shape."""
    if isinstance(e, DaemonNotRunning):
        return oai.ApiError(503, str(e), type="server_error", code="daemon_unavailable")
    if isinstance(e, RequestError):
        status = {"bad_request": 400, "busy": 429, "not_found": 404, "too_large": 413,
                  "unavailable": 503, "timeout": 504}.get(e.code, 500)
        kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
        return oai.ApiError(status, f"cllmd: {e.message}", type=kind, code=e.code)
    return oai.ApiError(503, f"cannot reach cllmd: {e}", type="server_error", code="daemon_unavailable")


@web.middleware
async def errors(request: web.Request, handler):
    try:
        return await handler(request)
    except oai.ApiError as e:
        return error_response(e)
    except (ClientError, RequestError) as e:
        return error_response(daemon_error(e))


# --------------------------------------------------------------------------- auth


OPEN_PATHS = ("/", "/favicon.ico")   # the page's own bytes; every figure it shows needs the token


def authorized(request: web.Request) -> bool:
    token = request.app[TOKEN]
    if not token:
        return True
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


@web.middleware
async def auth(request: web.Request, handler):
    if request.path in OPEN_PATHS or request.path.startswith("/static/") or authorized(request):
        return await handler(request)
    resp = error_response(oai.ApiError(401, "a valid bearer token is required (Authorization: "
                                            "Bearer TOKEN)", code="invalid_api_key"))
    resp.headers["WWW-Authenticate"] = 'Bearer realm="cllm-http"'
    return resp


# --------------------------------------------------------------------------- OpenAI API


async def read_json(request: web.Request) -> Any:
    return oai.parse_body(await request.read())


async def list_models(request: web.Request) -> web.Response:
    models = await request.app[BRIDGE].models()
    return web.json_response({"object": "list", "data": [oai.model_object(m) for m in models]})


async def completions(request: web.Request) -> web.StreamResponse:
    return await run_job(request, oai.completion_job)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await run_job(request, oai.chat_job)


SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def sse(obj: Any) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def run_job(request: web.Request, make_job) -> web.StreamResponse:
    bridge = request.app[BRIDGE]
    arrived = time.perf_counter()
    body = await read_json(request)
    job = make_job(body, await bridge.models())
    stream = bridge.generate(job.prompt, job.args)
    stream.started = arrived   # time to first token counts from the request's arrival
    try:
        if not job.stream:
            text = "".join([p async for p in stream])
            if job.kind == "chat":
                text = text.strip()
            return web.json_response(oai.response(job, text, stream.stats or {}))
        return await stream_job(request, job, stream)
    finally:
        stream.cancel()   # a no-op once it ended; else the client went away: stop the daemon
        request.app[METRICS].generation_ended(stream)


async def stream_job(request: web.Request, job: oai.Job, stream) -> web.StreamResponse:
    resp: web.StreamResponse | None = None
    first = True
    try:
        async for piece in stream:
            if job.kind == "chat" and first:
                piece = piece.lstrip()   # the template ends in "Assistant:"; the answer starts after a space
                if not piece:
                    continue
            if resp is None:
                resp = web.StreamResponse(headers=SSE_HEADERS)
                await resp.prepare(request)
            await resp.write(sse(oai.chunk(job, piece, first=first)))
            first = False
    except ConnectionResetError:
        log.debug("%s: the client went away mid-stream", job.id)
        return resp   # run_job's finally cancels the generation
    except (ClientError, RequestError) as e:
        if resp is None:
            raise
        # the status line is sent: the error travels as the last event, as OpenAI's do
        await resp.write(sse(daemon_error(e).body()))
        await resp.write(sse("[DONE]"))
        return resp
    if resp is None:
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        if job.kind == "chat":
            await resp.write(sse(oai.chunk(job, "", first=True)))
    stats = stream.stats or {}
    await resp.write(sse(oai.chunk(job, None, stats=stats)))
    if job.include_usage:
        await resp.write(sse(oai.chunk(job, stats=stats, usage_only=True)))
    await resp.write(sse("[DONE]"))
    await resp.write_eof()
    return resp


# --------------------------------------------------------------------------- health


HEALTH_STATES = {"running": "training", "stopping": "training", "paused": "paused", "idle": "ready"}


async def health(request: web.Request) -> web.Response:
    """200 {status: ready | training | paused}; 503 {status: loading | unreachable} while the
    daemon starts or cannot be reached."""
    try:
        status = await request.app[BRIDGE].request("status", timeout=2.0)
    except DaemonNotRunning as e:
        return web.json_response({"status": "unreachable", "error": str(e)}, status=503)
    except RequestError as e:
        # a daemon starting up answers `unavailable` with what it is doing in `starting`
        state = "loading" if e.code in ("unavailable", "timeout") else "unreachable"
        body = {"status": state, "error": str(e)}
        if e.error.get("starting"):
            body["starting"] = e.error["starting"]
        return web.json_response(body, status=503)
    except ClientError as e:
        return web.json_response({"status": "unreachable", "error": str(e)}, status=503)
    train = status.get("train") or {}
    return web.json_response({"status": HEALTH_STATES.get(train.get("state"), "ready"),
                              "step": train.get("step"), "model": (status.get("model") or {}).get("name"),
                              "daemon": (status.get("daemon") or {}).get("version")})


# --------------------------------------------------------------------------- metrics


async def metrics(request: web.Request) -> web.Response:
    try:
        stats = await request.app[BRIDGE].request("stats", timeout=2.0)
    except (ClientError, RequestError):
        stats = None   # cllmd_up 0, and what the gateway itself counted
    body = request.app[METRICS].exposition(stats)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


# --------------------------------------------------------------------------- the application


def make_app(bridge: Bridge, token: str = "") -> web.Application:
    app = web.Application(middlewares=[errors, auth], client_max_size=MAX_BODY)
    app[BRIDGE] = bridge
    app[TOKEN] = token
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    dashboard.add_routes(app, bridge)
    app[METRICS] = Metrics()
    bridge.on_event(app[METRICS].on_event)

    async def start(app: web.Application) -> None:
        bridge.start()

    async def stop(app: web.Application) -> None:
        await bridge.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


# --------------------------------------------------------------------------- cllm-http


def read_token(token_file: str | None, env=os.environ) -> str:
    """The bearer token: --token-file, else $CLLM_HTTP_TOKEN_FILE, else the systemd credential
    cllm-http-token, else $CLLM_HTTP_TOKEN; "" when none is set. Surrounding whitespace is
    dropped; an empty file is an error (it would silently turn auth off)."""
    path = token_file or env.get(TOKEN_FILE_ENV)
    if not path and env.get("CREDENTIALS_DIRECTORY"):
        cred = Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL
        path = str(cred) if cred.exists() else None
    if path:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"cllm-http: cannot read the token file {path}: {e}")
        if not token:
            raise SystemExit(f"cllm-http: the token file {path} is empty")
        return token
    return env.get(TOKEN_ENV, "").strip()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cllm-http", description=(
        "The HTTP face of cllmd: an OpenAI-compatible API, /health, /metrics (Prometheus) and a "
        "live dashboard, talking to the daemon over ZeroMQ. See docs/http.md."))
    p.add_argument("--host", default=os.environ.get("CLLM_HTTP_HOST", DEFAULT_HOST),
                   help=f"address to bind (default {DEFAULT_HOST}; beyond loopback a token is required)")
    p.add_argument("--port", type=int, default=int(os.environ.get("CLLM_HTTP_PORT", DEFAULT_PORT)),
                   help=f"port to bind (default {DEFAULT_PORT})")
    p.add_argument("--socket", help="the daemon's socket (default: found as `cllm` finds it)")
    p.add_argument("--token-file", help=f"file holding the bearer token (or ${TOKEN_FILE_ENV}, "
                                        f"or ${TOKEN_ENV} with the token itself)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--version", action="version", version=f"cllm-http {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="cllm-http: %(levelname)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if not 0 < args.port < 65536:
        print(f"cllm-http: --port must be 1..65535, got {args.port}", file=sys.stderr)
        return 2
    token = read_token(args.token_file)
    if not token and not is_loopback(args.host):
        print(f"cllm-http: refusing to bind {args.host} without a token: set ${TOKEN_ENV}, "
              f"${TOKEN_FILE_ENV} or --token-file (only loopback may go without one)", file=sys.stderr)
        return 2
    # Every request hops between the loop and a client thread (and back) a few times; with
    # Python's default 5 ms switch interval each hop may wait that long for the GIL.
    sys.setswitchinterval(SWITCH_INTERVAL)
    app = make_app(Bridge(args.socket), token)
    log.info("listening on http://%s:%d/ (%s)", args.host, args.port,
             "bearer token required" if token else "no token: loopback only")
    try:
        web.run_app(app, host=args.host, port=args.port, print=None, handler_cancellation=True,
                    shutdown_timeout=5, access_log=None)
    except OSError as e:
        print(f"cllm-http: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
