"""The cllmd wire format, version 1: building and parsing messages, never touching a socket.

Shared by both ends (the daemon imports it as ``cllm.wire``); docs/protocol.md is the contract.
Pure Python on msgpack and the standard library, so the client stays light.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import msgpack

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_ID_CHARS = 256

# Error codes (docs/protocol.md, "Errors").
BAD_REQUEST = "bad_request"
UNKNOWN_OP = "unknown_op"
BUSY = "busy"
NOT_FOUND = "not_found"
CANCELLED = "cancelled"
INTERNAL = "internal"
UNAVAILABLE = "unavailable"
TOO_LARGE = "too_large"
VERSION = "version"
ERROR_CODES = (BAD_REQUEST, UNKNOWN_OP, BUSY, NOT_FOUND, CANCELLED, INTERNAL, UNAVAILABLE,
               TOO_LARGE, VERSION)

STOP_REASONS = ("max_tokens", "eot", "stop", "cancelled", "error")
EVENT_TOPICS = ("train", "queue", "checkpoint", "model", "log", "error")

# Safe to resend after a timeout: they change nothing in the daemon.
IDEMPOTENT_OPS = frozenset({
    "ping", "status", "stats", "model.info", "models.list", "model.show", "queue.list", "train.status",
    "train.config.get", "tokenize", "detokenize", "queue.show",
})


class ProtocolError(Exception):
    """A message or request that breaks the protocol, or an operation's failure to report.

    ``code`` is one of ERROR_CODES; ``request_id`` is the id of the offending request when it
    could be read (else None), so the reply can still be matched by the client.
    """

    def __init__(self, code: str, message: str, *, request_id: Any = None, **extra: Any):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.extra = extra


# --------------------------------------------------------------------------- bytes <-> maps

def _to_plain(obj: Any) -> Any:
    # numpy scalars and arrays (duck-typed: this module never imports numpy), paths.
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot serialize object of type {type(obj).__name__}")


# Arrays (numpy, by duck typing) longer than this are packed a chunk at a time: one packb of
# millions of items holds the GIL for a quarter of a second, stalling every other thread of the
# process (the daemon's socket loop among them); between chunks the interpreter can switch.
ARRAY_CHUNK = 32768


class PackedUints:
    """A msgpack array of unsigned integers packed as it is built, for a value of ``encode``:
    ``extend`` packs each chunk (numpy, by duck typing) at once, so a long array of ids never
    exists whole, only its msgpack bytes (1-5 per item). ``nbytes``: the items' packed size.

    The items go into one buffer after HEADROOM bytes kept free: when the array is the last
    value of a message, ``encode`` writes the message's start there and returns a view of the
    buffer, so a 16 MiB reply is not copied once more to be joined (the join held the GIL 13-81
    ms under issue 11's attack, a fresh mapping's page faults included)."""

    HEADROOM = 512   # a reply's envelope, an id of 256 characters included, and the array header

    def __init__(self) -> None:
        self.count = 0
        self._buf = bytearray(self.HEADROOM)
        self._packer = msgpack.Packer()

    @property
    def nbytes(self) -> int:
        return len(self._buf) - self.HEADROOM

    def extend(self, chunk: Any) -> None:
        n = len(chunk)
        if n == 0:
            return
        if int(chunk.min()) < 0:
            raise ValueError("PackedUints holds unsigned integers only")
        if int(chunk.max()) < 128:   # all positive fixints: each item is its own byte
            self._buf += chunk.astype("uint8").tobytes()
        else:   # the items without the array header packb puts in front of them
            items = chunk.tolist()
            self._buf += self._packer.pack(items)[len(self._packer.pack_array_header(n)):]
        self.count += n

    def items(self) -> memoryview:
        return memoryview(self._buf)[self.HEADROOM:]

    def after(self, start: bytes) -> memoryview | None:
        """The bytes ``start`` followed by the items, without copying them (``start`` written
        into the headroom); None when it does not fit."""
        if len(start) > self.HEADROOM:
            return None
        at = self.HEADROOM - len(start)
        self._buf[at:self.HEADROOM] = start
        return memoryview(self._buf)[at:]


def _has_long_array(obj: Any) -> bool:
    if isinstance(obj, Mapping):
        return any(_has_long_array(v) for v in obj.values())
    if isinstance(obj, PackedUints):
        return True
    return hasattr(obj, "tolist") and getattr(obj, "ndim", 0) == 1 and len(obj) > ARRAY_CHUNK


def _pack_pieces(obj: Any, packer: msgpack.Packer, out: list[bytes]) -> None:
    """Append the msgpack encoding of ``obj`` to ``out``; long arrays a chunk at a time."""
    if isinstance(obj, Mapping):
        out.append(packer.pack_map_header(len(obj)))
        for key, value in obj.items():
            out.append(packer.pack(key))
            _pack_pieces(value, packer, out)
    elif isinstance(obj, PackedUints):
        out.append(packer.pack_array_header(obj.count))
        out.append(obj)   # its items, placed by encode
    elif hasattr(obj, "tolist") and getattr(obj, "ndim", 0) == 1 and len(obj) > ARRAY_CHUNK:
        out.append(packer.pack_array_header(len(obj)))
        for start in range(0, len(obj), ARRAY_CHUNK):
            chunk = obj[start:start + ARRAY_CHUNK].tolist()
            # the chunk's items without the array header packb puts in front of them
            out.append(packer.pack(chunk)[len(packer.pack_array_header(len(chunk))):])
    else:
        out.append(packer.pack(obj))


def encode(msg: Mapping[str, Any]) -> bytes | memoryview:
    """One message -> one msgpack frame (str as msgpack str, bytes as msgpack bin, floats 64-bit);
    a memoryview over a PackedUints' buffer when the message ends with that array."""
    if not isinstance(msg, Mapping):
        raise ProtocolError(INTERNAL, f"a message must be a map, not {type(msg).__name__}")
    try:
        if not _has_long_array(msg):
            return msgpack.packb(msg, use_bin_type=True, default=_to_plain)
        out: list = []
        _pack_pieces(msg, msgpack.Packer(use_bin_type=True, default=_to_plain), out)
        arrays = [p for p in out if isinstance(p, PackedUints)]
        if len(arrays) == 1 and out[-1] is arrays[0]:   # the message ends with it: no join
            frame = arrays[0].after(b"".join(out[:-1]))
            if frame is not None:
                return frame
        return b"".join(p.items() if isinstance(p, PackedUints) else p for p in out)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(INTERNAL, f"cannot encode message: {e}") from e


def _describe_unpack_error(e: Exception) -> str:
    if isinstance(e, msgpack.exceptions.ExtraData):
        return "trailing bytes after the first msgpack object"
    if isinstance(e, msgpack.exceptions.StackError):
        return "nesting too deep"
    if isinstance(e, msgpack.exceptions.FormatError):
        return "invalid msgpack type byte"
    if isinstance(e, UnicodeDecodeError):
        return "a msgpack str is not valid UTF-8 (use bin for raw bytes)"
    return str(e) or type(e).__name__


def decode(frame: bytes | bytearray | memoryview) -> dict:
    """One frame -> one map. Raises ProtocolError(bad_request) for anything that is not a map."""
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises ValueError, TypeError and friends for bad input
        raise ProtocolError(BAD_REQUEST, f"malformed msgpack: {_describe_unpack_error(e)}") from e
    if not isinstance(msg, dict):
        raise ProtocolError(BAD_REQUEST, f"a message must be a msgpack map, got {_kind(msg)}")
    for key in msg:
        if not isinstance(key, str):
            raise ProtocolError(BAD_REQUEST, "message keys must be msgpack str, got bin")
    return msg


def _kind(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a str"
    if isinstance(value, (bytes, bytearray)):
        return "bin"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a map"
    return type(value).__name__


def valid_id(value: Any) -> bool:
    """A request id is a str of 1..256 characters or an integer (not a boolean)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


class _FrameReader:
    """A file-like view of a frame for msgpack's streaming Unpacker, read in slices: io.BytesIO
    shares a bytes but copies a memoryview whole (a large frame received without a copy)."""

    def __init__(self, frame: bytes | bytearray | memoryview):
        self._view, self._pos = memoryview(frame), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else min(len(self._view), self._pos + n)
        piece = self._view[self._pos:end].tobytes()
        self._pos = end
        return piece


def _peeker(frame: bytes | bytearray | memoryview) -> msgpack.Unpacker:
    limit = max(len(frame), 1024)
    return msgpack.Unpacker(_FrameReader(frame), raw=False, max_buffer_size=limit,
                            read_size=min(64 * 1024, limit))


def peek_id(frame: bytes | bytearray | memoryview) -> Any:
    """Read only the top-level ``id`` of a frame, skipping every other value without building it.

    Used for oversized frames, so they can still get an error reply carrying their id.
    Returns None when the frame is not a map or has no valid id.
    """
    try:
        unpacker = _peeker(frame)
        n = unpacker.read_map_header()
        for _ in range(n):
            key = unpacker.unpack()
            if key == "id":
                value = unpacker.unpack()
                return value if valid_id(value) else None
            unpacker.skip()
    except Exception:  # anything unreadable simply has no id
        return None
    return None


def peek_envelope(frame: bytes | bytearray | memoryview) -> tuple[Any, Any]:
    """The top-level ``id`` and ``op`` of a request frame, every other value skipped without
    being built (in C, allocating nothing): what routing a large frame needs. Stops once both
    are read; either is None when absent or not valid. Raises ProtocolError(bad_request) for a
    frame that is not a msgpack map."""
    try:
        unpacker = _peeker(frame)
        n = unpacker.read_map_header()
        rid = op = None
        for _ in range(n):
            key = unpacker.unpack()
            if key == "id":
                value = unpacker.unpack()
                rid = value if valid_id(value) else None
            elif key == "op":
                value = unpacker.unpack()
                op = value if isinstance(value, str) and len(value) <= MAX_ID_CHARS else None
            else:
                unpacker.skip()
            if rid is not None and op is not None:
                break
    except Exception as e:
        raise ProtocolError(BAD_REQUEST, f"malformed msgpack: {_describe_unpack_error(e)}") from e
    return rid, op


# --------------------------------------------------------------------------- requests

@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request: ``args`` is a plain dict (after validation: defaults filled in)."""
    id: Any
    op: str
    args: dict = field(default_factory=dict)


def make_request(req_id: Any, op: str, args: Mapping[str, Any] | None = None) -> dict:
    if not valid_id(req_id):
        raise ProtocolError(BAD_REQUEST, f"request id must be a str (1..{MAX_ID_CHARS} chars) "
                                         f"or an integer, got {_kind(req_id)}")
    return {"v": PROTOCOL_VERSION, "id": req_id, "op": op, "args": dict(args or {})}


def check_version(msg: Mapping[str, Any], request_id: Any = None) -> None:
    if "v" not in msg:
        raise ProtocolError(BAD_REQUEST, "missing field 'v' (protocol version)",
                            request_id=request_id)
    v = msg["v"]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(BAD_REQUEST, f"field 'v' must be an integer, got {_kind(v)}",
                            request_id=request_id)
    if v not in SUPPORTED_VERSIONS:
        raise ProtocolError(VERSION, f"unsupported protocol version {v} (this end speaks "
                                     f"{', '.join(map(str, SUPPORTED_VERSIONS))})",
                            request_id=request_id, supported=list(SUPPORTED_VERSIONS))


def request_from_map(msg: Mapping[str, Any]) -> Request:
    """Validate a decoded request map (see parse_request)."""
    rid = msg.get("id")
    readable_id = rid if valid_id(rid) else None
    check_version(msg, readable_id)
    if "id" not in msg:
        raise ProtocolError(BAD_REQUEST, "missing field 'id'")
    if readable_id is None:
        raise ProtocolError(BAD_REQUEST, f"field 'id' must be a str (1..{MAX_ID_CHARS} chars) "
                                         f"or an integer, got {_kind(rid)}")
    if "op" not in msg:
        raise ProtocolError(BAD_REQUEST, "missing field 'op'", request_id=rid)
    op = msg["op"]
    if not isinstance(op, str) or not op:
        raise ProtocolError(BAD_REQUEST, f"field 'op' must be a non-empty str, got {_kind(op)}",
                            request_id=rid)
    args = msg.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError(BAD_REQUEST, f"field 'args' must be a map, got {_kind(args)}",
                            request_id=rid)
    return Request(rid, op, args)


def parse_request(frame: bytes | bytearray | memoryview,
                  max_bytes: int | None = None) -> Request:
    """One frame -> Request, or ProtocolError with ``request_id`` set whenever it was readable."""
    if max_bytes is not None and len(frame) > max_bytes:
        raise ProtocolError(TOO_LARGE, f"message of {len(frame)} bytes exceeds the limit of "
                                       f"{max_bytes} bytes", request_id=peek_id(frame))
    return request_from_map(decode(frame))


# --------------------------------------------------------------------------- replies and streams

def reply_ok(req_id: Any, result: Any = None) -> dict:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": True, "result": result}


def reply_error(req_id: Any, code: str, message: str, **extra: Any) -> dict:
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": False,
            "error": {"code": code, "message": message, **extra}}


def error_from_exception(req_id: Any, exc: ProtocolError) -> dict:
    return reply_error(req_id, exc.code, exc.message, **exc.extra)


def stream_token(req_id: Any, text: str, **fields: Any) -> dict:
    return {"v": PROTOCOL_VERSION, "id": req_id, "event": "token", "text": text, **fields}


def stream_done(req_id: Any, stats: Mapping[str, Any] | None = None) -> dict:
    stats = dict(stats or {})
    for reserved in ("v", "id", "event"):
        stats.pop(reserved, None)
    return {"v": PROTOCOL_VERSION, "id": req_id, "event": "done", **stats}


@dataclass(frozen=True, slots=True)
class Reply:
    """A parsed server->client message.

    kind is "ok", "error", "token", "done", or "event:<name>" for stream events a client does
    not know (which it must ignore). ``body`` is the result (ok), the error map (error), or the
    message's remaining fields (token/done/other events).
    """
    id: Any
    kind: str
    body: Any


def parse_reply(frame: bytes | bytearray | memoryview) -> Reply:
    msg = decode(frame)
    check_version(msg)
    rid = msg.get("id")
    if "event" in msg:
        name = msg["event"]
        if not isinstance(name, str):
            raise ProtocolError(BAD_REQUEST, f"field 'event' must be a str, got {_kind(name)}")
        body = {k: v for k, v in msg.items() if k not in ("v", "id", "event")}
        kind = name if name in ("token", "done") else f"event:{name}"
        return Reply(rid, kind, body)
    ok = msg.get("ok")
    if ok is True:
        return Reply(rid, "ok", msg.get("result"))
    if ok is False:
        err = msg.get("error")
        if not isinstance(err, dict):
            err = {"code": INTERNAL, "message": f"error reply without an error map: {err!r}"}
        err.setdefault("code", INTERNAL)
        err.setdefault("message", "")
        return Reply(rid, "error", err)
    raise ProtocolError(BAD_REQUEST, "a reply needs 'ok' (true/false) or 'event'")


# --------------------------------------------------------------------------- events (PUB)

def make_event(topic: str, payload: Mapping[str, Any], *, seq: int, time: float) -> dict:
    return {"v": PROTOCOL_VERSION, "topic": topic, "seq": seq, "time": time, **payload}


def parse_event(frames: list[bytes]) -> tuple[str, dict]:
    """[topic frame, msgpack frame] -> (topic, payload map without v/topic)."""
    if len(frames) != 2:
        raise ProtocolError(BAD_REQUEST, f"an event is two frames (topic, map), got {len(frames)}")
    try:
        topic = bytes(frames[0]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(BAD_REQUEST, "event topic is not UTF-8") from e
    msg = decode(frames[1])
    check_version(msg)
    payload = {k: v for k, v in msg.items() if k not in ("v", "topic")}
    return topic, payload
