"""The daemon's side of the protocol: the wire codec (shared with the client as ``cllm.wire``)
plus the declarative argument specs of every operation, which turn wrong or missing arguments
into ``bad_request`` errors naming the field. docs/protocol.md is the contract.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from cllm.catalogue import (
    MAX_STOP_CHARS, MAX_STOPS, RENAMED, SAMPLING, SCALAR_SAMPLING, Kind, renamed_error,
    runtime_settings,
)
from cllm.wire import (  # noqa: F401  (re-exported: the daemon imports the codec from here)
    BAD_REQUEST, BUSY, CANCELLED, DEFAULT_MAX_MESSAGE_BYTES, ERROR_CODES, EVENT_TOPICS,
    IDEMPOTENT_OPS, INTERNAL, NOT_FOUND, PROTOCOL_VERSION,
    STOP_REASONS, SUPPORTED_VERSIONS, TOO_LARGE, UNAVAILABLE, UNKNOWN_OP, VERSION, PackedUints, ProtocolError,
    Reply, Request, decode, encode, error_from_exception,
    make_event, make_request, parse_event, parse_reply, parse_request, peek_envelope, peek_id, reply_error,
    reply_ok, request_from_map, stream_done, stream_token, valid_id,
)

REQUIRED = object()  # default marking an argument the client must send


@dataclass(frozen=True)
class ListOf:
    """An array whose items are all of ``item`` type, each within [lo, hi] (value or length)."""
    item: type
    lo: float | None = None
    hi: float | None = None


@dataclass(frozen=True)
class Field:
    """One argument: its type, default (REQUIRED if none), bounds and allowed values.

    Bounds are inclusive and apply to the value of numbers and to the length of str, bin and
    arrays; ``lo_open`` makes the lower bound exclusive. ``type`` may be a tuple of types.
    A nil value means "not given": the default is used (an error if the field is REQUIRED).
    ``check`` returns an error text for values the type and bounds cannot express, else None.
    """
    type: Any
    default: Any = REQUIRED
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None
    doc: str = ""


@dataclass(frozen=True)
class ArgsSpec:
    """The arguments of one op. ``strict`` refuses unknown arguments (for setters, where a typo
    must not pass silently); otherwise unknown arguments are ignored, as the protocol says."""
    fields: Mapping[str, Field]
    strict: bool = False
    renamed: Mapping[str, str] | None = None  # old argument -> the refusal naming the new one


_TYPE_NAMES = {str: "a str", int: "an integer", float: "a number", bool: "a boolean",
               bytes: "bin (bytes)", dict: "a map", list: "an array", type(None): "nil"}
_PLURALS = {str: "strs", int: "integers", float: "numbers", bool: "booleans", bytes: "bins",
            dict: "maps", list: "arrays"}


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    if isinstance(t, ListOf):
        return f"an array of {_PLURALS.get(t.item, t.item.__name__)}"
    return _TYPE_NAMES.get(t, getattr(t, "__name__", str(t)))


def _kind(value: Any) -> str:
    for t in (bool, int, float, str, bytes, dict, list, type(None)):
        if isinstance(value, t):
            return _TYPE_NAMES[t]
    return type(value).__name__


def _matches(t: Any, value: Any) -> tuple[bool, Any]:
    """Does ``value`` have type ``t``? Returns (ok, value converted: int -> float for floats)."""
    if isinstance(t, tuple):
        for one in t:
            ok, conv = _matches(one, value)
            if ok:
                return True, conv
        return False, value
    if t is bool:
        return isinstance(value, bool), value
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if t is type(None):
        return value is None, value
    if isinstance(t, ListOf):
        return isinstance(value, list), value
    return isinstance(value, t), value


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bounds_error(value: Any, lo: float | None, hi: float | None, lo_open: bool,
                  what: str = "") -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number{what}, got {value}"
    measure = len(value) if isinstance(value, (str, bytes, list)) else value
    if not isinstance(measure, (int, float)) or isinstance(measure, bool):
        return None
    low_bad = lo is not None and (measure <= lo if lo_open else measure < lo)
    high_bad = hi is not None and measure > hi
    if not (low_bad or high_bad):
        return None
    unit = ""
    if isinstance(value, str):
        unit = " characters"
    elif isinstance(value, bytes):
        unit = " bytes"
    elif isinstance(value, list):
        unit = " items"
    if lo is not None and hi is not None and not lo_open:
        rule = f"between {_fmt(lo)} and {_fmt(hi)}"
    else:
        lo_txt = None if lo is None else ("> " if lo_open else ">= ") + _fmt(lo)
        hi_txt = None if hi is None else "<= " + _fmt(hi)
        rule = " and ".join(x for x in (lo_txt, hi_txt) if x)
    got = f"{len(value)}{unit}" if unit else _fmt(value)
    return f"must be {rule}{unit}{what}, got {got}"


def validate_args(spec: ArgsSpec | Mapping[str, Any] | None, args: Mapping[str, Any],
                  op: str = "") -> dict:
    """Check ``args`` against ``spec`` and return a new dict with defaults filled in.

    Raises ProtocolError(bad_request) whose message names the op and the argument.
    A spec may be an ArgsSpec, or a plain mapping name -> Field or (type[, default[, (lo, hi)]]).
    """
    if spec is None:
        return dict(args)
    spec = as_spec(spec)
    where = f"{op}: " if op else ""
    out: dict = {}
    if spec.strict:
        unknown = sorted(k for k in args if k not in spec.fields)
        for name in unknown:
            if spec.renamed and name in spec.renamed:
                raise ProtocolError(BAD_REQUEST, f"{where}argument '{name}' {spec.renamed[name]}")
        if unknown:
            raise ProtocolError(BAD_REQUEST, f"{where}unknown argument '{unknown[0]}' "
                                             f"(known: {', '.join(spec.fields)})")
    for name, f in spec.fields.items():
        value = args.get(name)
        if value is None:
            if f.default is REQUIRED:
                raise ProtocolError(BAD_REQUEST, f"{where}missing required argument '{name}'")
            # copy mutable defaults so handlers may not change the spec by accident
            out[name] = list(f.default) if isinstance(f.default, list) else f.default
            continue
        ok, value = _matches(f.type, value)
        if not ok:
            raise ProtocolError(BAD_REQUEST, f"{where}argument '{name}' must be "
                                             f"{_type_name(f.type)}, got {_kind(args[name])}")
        err = _bounds_error(value, f.lo, f.hi, f.lo_open)
        if err:
            raise ProtocolError(BAD_REQUEST, f"{where}argument '{name}' {err}")
        if isinstance(f.type, ListOf):
            value = _checked_items(f.type, value, f"{where}argument '{name}'")
        if f.choices is not None and value not in f.choices:
            raise ProtocolError(BAD_REQUEST, f"{where}argument '{name}' must be one of "
                                             f"{', '.join(map(repr, f.choices))}, got {value!r}")
        if f.check is not None:
            err = f.check(value)
            if err:
                raise ProtocolError(BAD_REQUEST, f"{where}argument '{name}' {err}")
        out[name] = value
    return out


# Integer arrays (token ids) are checked this many items per C call (their types, their least
# and greatest): a 50,000-id detokenize took ~100 ms of Python holding the GIL item by item,
# and one C call over millions of items would hold it as long; between chunks it changes hands.
ITEM_CHUNK = 65536


def _checked_items(t: ListOf, value: list, what: str) -> list:
    """The array's items checked against t (converted where t says, e.g. int -> float);
    ProtocolError(bad_request) names the first item that is wrong."""
    if t.item is int:   # the same list back: an exact int needs no conversion
        for start in range(0, len(value), ITEM_CHUNK):
            chunk = value[start:start + ITEM_CHUNK]
            if set(map(type, chunk)) <= {int} and (t.lo is None or min(chunk) >= t.lo) \
                    and (t.hi is None or max(chunk) <= t.hi):
                continue
            _check_each(t, chunk, what, start)   # finds the item and says what is wrong
        return value
    value = list(value)
    _check_each(t, value, what, 0)
    return value


def _check_each(t: ListOf, items: list, what: str, first: int) -> None:
    for i, item in enumerate(items):
        item_ok, items[i] = _matches(t.item, item)
        if not item_ok:
            raise ProtocolError(BAD_REQUEST, f"{what} item {first + i} must be "
                                             f"{_type_name(t.item)}, got {_kind(item)}")
        err = _bounds_error(items[i], t.lo, t.hi, False)
        if err:
            raise ProtocolError(BAD_REQUEST, f"{what} item {first + i} {err}")


def as_spec(spec: ArgsSpec | Mapping[str, Any]) -> ArgsSpec:
    """Normalise the short tuple form (type, default, (lo, hi)) into an ArgsSpec of Fields."""
    if isinstance(spec, ArgsSpec):
        return spec
    fields = {}
    for name, f in spec.items():
        if isinstance(f, Field):
            fields[name] = f
        elif isinstance(f, tuple) and 1 <= len(f) <= 3:
            t = f[0]
            default = f[1] if len(f) > 1 else REQUIRED
            lo, hi = f[2] if len(f) > 2 and f[2] is not None else (None, None)
            fields[name] = Field(t, default, lo, hi)
        else:
            raise TypeError(f"argument spec for {name!r} must be a Field or a tuple "
                            f"(type, default, (lo, hi)), got {f!r}")
    return ArgsSpec(fields)


# --------------------------------------------------------------------------- the ops of version 1

def _queue_name_error(name: str) -> str | None:
    if "/" in name or "\0" in name:
        return "must be a plain file name (no '/' or NUL)"
    if name.startswith("."):
        return "must not start with '.' (hidden and temporary names are ignored by the queue)"
    if len(name.encode("utf-8")) > 255:
        return "must be at most 255 bytes in UTF-8"
    return None


def from_kind(kind: Kind, default: Any, doc: str = "") -> Field:
    """The argument of a catalogue entry: its kind's type and bounds; the kind's own check
    refuses what bounds cannot say (an open upper bound, a pattern)."""
    def check(value: Any) -> str | None:
        try:
            kind.value(value, from_text=False)
        except ValueError as e:
            return str(e)
        return None

    return Field(kind.wire, default, kind.lo, kind.hi, kind.lo_open, check=check, doc=doc)


_ID = (str, int)
_BIG = 2**31 - 1
QUEUE_STATES = ("incoming", "processing", "done", "failed")

OP_SPECS: dict[str, ArgsSpec] = {
    "ping": ArgsSpec({}),
    "status": ArgsSpec({}),
    "stats": ArgsSpec({}),
    "cancel": ArgsSpec({"id": Field(_ID, doc="id of the request to cancel")}),
    "generate": ArgsSpec({
        "prompt": Field(str, hi=DEFAULT_MAX_MESSAGE_BYTES),
        # nil = not given: the model's own generation default applies, else the catalogue's
        **{name: from_kind(SAMPLING[name].kind, None, SAMPLING[name].doc) for name in SCALAR_SAMPLING},
        "stop": Field(ListOf(str, 1, MAX_STOP_CHARS), [], 0, MAX_STOPS, doc=SAMPLING["stop"].doc),
        "stream": Field(bool, True),
        "model": Field(str, None, 1, 64, doc="a named model; nil: the active one"),
    }),
    "tokenize": ArgsSpec({"text": Field(str)}),
    "detokenize": ArgsSpec({"ids": Field(ListOf(int, 0, _BIG))}),
    "train.start": ArgsSpec({"steps": Field(int, None, 1, 10**12)}),
    "train.stop": ArgsSpec({}),
    "train.pause": ArgsSpec({}),
    "train.resume": ArgsSpec({}),
    "train.status": ArgsSpec({}),
    "train.config.get": ArgsSpec({}),
    # the catalogue's runtime settings; train.config.get answers with every one of them
    "train.config.set": ArgsSpec({s.name: from_kind(s.kind, None, s.doc) for s in runtime_settings()},
                                 strict=True,
                                 renamed={old.split(".", 1)[1]: renamed_error(old.split(".", 1)[1])
                                          for old in RENAMED if old.startswith("train.")}),
    "queue.list": ArgsSpec({
        "state": Field(str, None, choices=QUEUE_STATES),
        "limit": Field(int, 1000, 1, 100_000),
    }),
    "queue.add": ArgsSpec({
        "name": Field(str, lo=1, hi=255, check=_queue_name_error),
        "data": Field(bytes, lo=1),
    }),
    "queue.retry": ArgsSpec({"name": Field(str, lo=1, hi=255, check=_queue_name_error)}),
    "queue.show": ArgsSpec({"name": Field(str, lo=1, hi=255, check=_queue_name_error),
                            "max_chars": Field(int, 65536, 1, 4 * 2**20)}),
    "model.info": ArgsSpec({}),
    "model.save": ArgsSpec({}),
    "models.list": ArgsSpec({}),
    "model.show": ArgsSpec({"name": Field(str, lo=1, hi=64, doc="a model's name")}),
    "model.create": ArgsSpec({
        "name": Field(str, lo=1, hi=64, doc="the new model's name"),
        "from": Field(str, lo=1, hi=4096, doc="a Hugging Face directory, a .cllm file (paths on the daemon's "
                                             "machine) or 'default'"),
    }),
    "model.rm": ArgsSpec({"name": Field(str, lo=1, hi=64, doc="a model's name, not the active one")}),
    "model.use": ArgsSpec({
        "name": Field(str, lo=1, hi=64, doc="the model to make active"),
        "train_on_existing": Field(bool, False, doc="tokenize every text ingested before for it"),
    }),
    "checkpoint": ArgsSpec({}),
    "shutdown": ArgsSpec({"checkpoint": Field(bool, True)}),
}

# Ops whose reply is a stream of token events ending with a done event.
STREAM_OPS = frozenset({"generate"})
