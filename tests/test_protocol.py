"""The wire codec and argument specs: golden bytes, round trips, malformed input, and the
agreement between docs/protocol.md and the code."""
import math
import random
import re
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from cllm import wire
from cllmd import protocol
from cllmd.protocol import (
    OP_SPECS, ArgsSpec, Field, ListOf, ProtocolError, Request, decode, encode, make_event,
    make_request, parse_event, parse_reply, parse_request, peek_envelope, peek_id, reply_error, reply_ok,
    stream_done, stream_token, validate_args,
)

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "protocol"
DOC = ROOT / "docs" / "protocol.md"

# The maps the golden files hold, byte for byte (key order as the builders produce it).
GOLDEN_MESSAGES = {
    "request_ping": make_request(1, "ping"),
    "request_generate": make_request("g-7", "generate", {
        "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.0, "top_k": 40,
        "stop": ["\n\n"], "seed": 1234, "stream": True}),
    "request_queue_add": make_request(42, "queue.add", {"name": "notes.txt",
                                                        "data": b"hello\x00world\n"}),
    "reply_ok_ping": reply_ok(1, {"pong": True, "time": 1700000000.5, "version": 1,
                                  "daemon": "cllmd 0.1.0"}),
    "reply_error_busy": reply_error(7, "busy", "9 requests running or waiting; retry later"),
    "reply_error_nil_id": reply_error(None, "bad_request",
                                      "malformed msgpack: invalid msgpack type byte"),
    "stream_token": stream_token("g-7", "h\u00e9"),
    "stream_done": stream_done("g-7", {"tokens_prompt": 4, "tokens_generated": 16,
                                       "seconds": 0.25, "tokens_per_second": 64.0,
                                       "stop_reason": "max_tokens"}),
    "event_train": make_event("train", {
        "state": "running", "step": 10, "loss": 3.5, "val_loss": None, "lr": 0.0003,
        "spheres": [{"id": 1, "state": "working", "batches": 3, "tokens": 384,
                     "mean_loss": 3.6, "busy_s": 1.5, "idle_s": 0.25}]},
        seq=3, time=1700000001.0),
}


# --------------------------------------------------------------------------- golden files

@pytest.mark.parametrize("name", sorted(GOLDEN_MESSAGES))
def test_encode_matches_golden_file(name):
    assert encode(GOLDEN_MESSAGES[name]) == (GOLDEN / f"{name}.msgpack").read_bytes()


@pytest.mark.parametrize("name", sorted(GOLDEN_MESSAGES))
def test_decode_golden_file_gives_the_message(name):
    assert decode((GOLDEN / f"{name}.msgpack").read_bytes()) == GOLDEN_MESSAGES[name]


def test_golden_directory_has_no_unlisted_files():
    assert {p.stem for p in GOLDEN.glob("*.msgpack")} == set(GOLDEN_MESSAGES)


def test_encode_ping_request_is_the_documented_bytes():
    # Written out by hand from the msgpack spec: fixmap(4), fixstr "v", 1, ...
    expected = bytes.fromhex("84 a1 76 01 a2 69 64 01 a2 6f 70 a4 70 69 6e 67 a4 61 72 67 73 80")
    assert encode(make_request(1, "ping")) == expected


def test_docs_example_bytes_are_golden_messages():
    blocks = re.findall(r"```\n((?:[0-9a-f]{2} )+[0-9a-f]{2})\n```", DOC.read_text())
    assert len(blocks) >= 3
    golden = {(GOLDEN / f"{n}.msgpack").read_bytes() for n in GOLDEN_MESSAGES}
    golden.add(encode(reply_ok(1, {"pong": True})))
    golden.add(encode(stream_token("g1", "Hi")))
    for block in blocks:
        assert bytes.fromhex(block) in golden, block


# --------------------------------------------------------------------------- round trips

_ids = st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(min_size=1, max_size=256))
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                     st.floats(allow_nan=False), st.text(max_size=50), st.binary(max_size=50))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(rid=_ids, op=st.text(min_size=1, max_size=40),
       args=st.dictionaries(st.text(max_size=20), _values, max_size=6))
def test_parse_request_round_trips(rid, op, args):
    req = parse_request(encode(make_request(rid, op, args)))
    assert req == Request(rid, op, args)


@settings(max_examples=100, deadline=None)
@given(rid=_ids, result=_values)
def test_parse_reply_round_trips_ok(rid, result):
    reply = parse_reply(encode(reply_ok(rid, result)))
    assert (reply.id, reply.kind, reply.body) == (rid, "ok", result)


@pytest.mark.parametrize("code", wire.ERROR_CODES)
def test_parse_reply_round_trips_every_error_code(code):
    reply = parse_reply(encode(reply_error("x", code, "what went wrong")))
    assert reply.kind == "error" and reply.body == {"code": code, "message": "what went wrong"}


def test_parse_reply_reads_stream_events_and_keeps_unknown_ones():
    token = parse_reply(encode(stream_token(3, "ab", token_ids=[1, 2])))
    assert (token.kind, token.body) == ("token", {"text": "ab", "token_ids": [1, 2]})
    done = parse_reply(encode(stream_done(3, {"stop_reason": "eot", "id": "ignored"})))
    assert (done.id, done.kind, done.body) == (3, "done", {"stop_reason": "eot"})
    other = parse_reply(encode({"v": 1, "id": 3, "event": "queued", "position": 2}))
    assert (other.kind, other.body) == ("event:queued", {"position": 2})


def test_parse_request_ignores_unknown_fields():
    frame = encode({"v": 1, "id": 5, "op": "ping", "args": {}, "trace": "abc", "x": [1]})
    assert parse_request(frame) == Request(5, "ping", {})


def test_parse_request_treats_missing_or_nil_args_as_empty():
    assert parse_request(encode({"v": 1, "id": 1, "op": "ping"})).args == {}
    assert parse_request(encode({"v": 1, "id": 1, "op": "ping", "args": None})).args == {}


def test_parse_event_round_trips():
    frames = [b"queue", encode(make_event("queue", {"counts": {"done": 2}}, seq=9, time=1.5))]
    assert parse_event(frames) == ("queue", {"seq": 9, "time": 1.5, "counts": {"done": 2}})


def test_encode_converts_numpy_like_scalars_and_arrays():
    class Scalar:          # what numpy.float32(2.5) looks like to a duck
        shape = ()

        def item(self):
            return 2.5

    class Array:
        def tolist(self):
            return [1, 2]

    assert decode(encode({"a": Scalar(), "b": Array(), "c": Path("/x")})) == {
        "a": 2.5, "b": [1, 2], "c": "/x"}


def test_encode_refuses_unserializable_values():
    with pytest.raises(ProtocolError) as e:
        encode({"a": object()})
    assert e.value.code == "internal" and "object" in e.value.message


# --------------------------------------------------------------------------- malformed input

@pytest.mark.parametrize("frame, fragment", [
    (b"", "malformed msgpack"),
    (b"\xc1", "invalid msgpack type byte"),
    (b"\x81\xa1a", "malformed msgpack"),                   # truncated map
    (msgpack.packb({"v": 1}) + b"\x00", "trailing bytes"),
    (b"\x91" * 5000, "nesting too deep"),
    (b"\x81\xa2\xff\xfe\x01", "not valid UTF-8"),
    (msgpack.packb([1, 2]), "got an array"),
    (msgpack.packb("text"), "got a str"),
    (msgpack.packb({1: 2}), "malformed msgpack"),
    (msgpack.packb({b"v": 1}, use_bin_type=True), "keys must be msgpack str"),
    (b"\xdd\xff\xff\xff\xff", "malformed msgpack"),         # array claiming 4 G items
])
def test_decode_malformed_raises_bad_request(frame, fragment):
    with pytest.raises(ProtocolError) as e:
        decode(frame)
    assert e.value.code == "bad_request" and fragment in e.value.message


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_decode_random_bytes_gives_a_map_or_protocol_error(frame):
    try:
        assert isinstance(decode(frame), dict)
    except ProtocolError as e:
        assert e.code == "bad_request"


@pytest.mark.parametrize("msg, code, fragment, rid", [
    ({"id": 1, "op": "ping"}, "bad_request", "missing field 'v'", 1),
    ({"v": "1", "id": 1, "op": "ping"}, "bad_request", "'v' must be an integer", 1),
    ({"v": 2, "id": 1, "op": "ping"}, "version", "unsupported protocol version 2", 1),
    ({"v": 1, "op": "ping"}, "bad_request", "missing field 'id'", None),
    ({"v": 1, "id": 1.5, "op": "ping"}, "bad_request", "'id' must be", None),
    ({"v": 1, "id": None, "op": "ping"}, "bad_request", "'id' must be", None),
    ({"v": 1, "id": True, "op": "ping"}, "bad_request", "'id' must be", None),
    ({"v": 1, "id": "", "op": "ping"}, "bad_request", "'id' must be", None),
    ({"v": 1, "id": "x" * 257, "op": "ping"}, "bad_request", "'id' must be", None),
    ({"v": 1, "id": 1}, "bad_request", "missing field 'op'", 1),
    ({"v": 1, "id": 1, "op": 5}, "bad_request", "'op' must be a non-empty str", 1),
    ({"v": 1, "id": "a", "op": "ping", "args": [1]}, "bad_request", "'args' must be a map", "a"),
])
def test_parse_request_rejects_bad_envelopes(msg, code, fragment, rid):
    with pytest.raises(ProtocolError) as e:
        parse_request(encode(msg))
    assert (e.value.code, e.value.request_id) == (code, rid)
    assert fragment in e.value.message


def test_parse_request_version_error_lists_supported_versions():
    with pytest.raises(ProtocolError) as e:
        parse_request(encode({"v": 9, "id": 1, "op": "ping"}))
    assert reply_error(1, e.value.code, e.value.message, **e.value.extra)["error"]["supported"] == [1]


def test_parse_request_oversized_is_too_large_with_its_id():
    frame = encode(make_request("big", "queue.add", {"name": "a.txt", "data": b"x" * 5000}))
    with pytest.raises(ProtocolError) as e:
        parse_request(frame, max_bytes=4096)
    assert (e.value.code, e.value.request_id) == ("too_large", "big")
    assert str(len(frame)) in e.value.message


def test_peek_id_finds_id_after_large_fields_and_refuses_bad_ones():
    assert peek_id(encode({"args": {"data": b"x" * 100_000}, "v": 1, "id": 77})) == 77
    assert peek_id(encode({"v": 1, "id": 2.5})) is None
    assert peek_id(msgpack.packb([1, 2])) is None
    assert peek_id(b"\xff\x00garbage") is None
    assert peek_id(encode({"v": 1})) is None
    assert peek_id(encode({"v": 1, "id": "small"})) == "small"   # frames below the read size


def test_peek_reads_a_large_frame_received_without_copy_in_slices():
    # the server peeks at large frames through a memoryview of libzmq's buffer: io.BytesIO
    # would copy it whole (a bytes' buffer it shares, a memoryview's it copies)
    import tracemalloc
    frame = memoryview(encode(make_request("big", "tokenize", {"text": "a" * 8 * 2**20})))
    tracemalloc.start()
    try:
        assert peek_envelope(frame) == ("big", "tokenize")
        assert peek_id(frame) == "big"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak
    late = memoryview(encode({"args": {"data": b"x" * 100_000}, "v": 1, "op": "tokenize", "id": 3}))
    assert peek_envelope(late) == (3, "tokenize") and peek_id(late) == 3


def test_reply_error_refuses_unknown_codes():
    with pytest.raises(ValueError):
        reply_error(1, "oops", "no such code")


# --------------------------------------------------------------------------- argument specs

SPEC = ArgsSpec({
    "prompt": Field(str, hi=10),
    "n": Field(int, 5, 1, 100),
    "t": Field(float, 0.5, 0.0, 2.0),
    "p": Field(float, 1.0, 0.0, 1.0, lo_open=True),
    "flag": Field(bool, False),
    "stop": Field(ListOf(str, 1, 4), [], 0, 2),
    "mode": Field(str, "a", choices=("a", "b")),
    "id": Field((str, int), None),
    "blob": Field(bytes, None, 1, 8),
})


def test_validate_args_fills_defaults_and_converts_ints_to_floats():
    out = validate_args(SPEC, {"prompt": "hi", "t": 1, "unknown": 3}, "gen")
    assert out == {"prompt": "hi", "n": 5, "t": 1.0, "p": 1.0, "flag": False, "stop": [],
                   "mode": "a", "id": None, "blob": None}
    assert isinstance(out["t"], float) and "unknown" not in out


def test_validate_args_nil_means_default():
    assert validate_args(SPEC, {"prompt": "x", "n": None})["n"] == 5


def test_validate_args_defaults_are_not_shared():
    validate_args(SPEC, {"prompt": "x"})["stop"].append("oops")
    assert validate_args(SPEC, {"prompt": "x"})["stop"] == []


@pytest.mark.parametrize("args, fragment", [
    ({}, "gen: missing required argument 'prompt'"),
    ({"prompt": None}, "missing required argument 'prompt'"),
    ({"prompt": 3}, "argument 'prompt' must be a str, got an integer"),
    ({"prompt": "x" * 11}, "argument 'prompt' must be <= 10 characters, got 11 characters"),
    ({"prompt": "x", "n": True}, "argument 'n' must be an integer, got a boolean"),
    ({"prompt": "x", "n": 2.0}, "argument 'n' must be an integer, got a number"),
    ({"prompt": "x", "n": 0}, "argument 'n' must be between 1 and 100, got 0"),
    ({"prompt": "x", "t": "hot"}, "argument 't' must be a number, got a str"),
    ({"prompt": "x", "t": math.nan}, "argument 't' must be a finite number"),
    ({"prompt": "x", "t": math.inf}, "argument 't' must be a finite number"),
    ({"prompt": "x", "p": 0.0}, "argument 'p' must be > 0 and <= 1"),
    ({"prompt": "x", "flag": 1}, "argument 'flag' must be a boolean, got an integer"),
    ({"prompt": "x", "stop": "\n"}, "argument 'stop' must be an array of strs, got a str"),
    ({"prompt": "x", "stop": ["a", "b", "c"]}, "argument 'stop' must be between 0 and 2 items"),
    ({"prompt": "x", "stop": [1]}, "argument 'stop' item 0 must be a str, got an integer"),
    ({"prompt": "x", "stop": ["ok", ""]}, "argument 'stop' item 1 must be between 1 and 4"),
    ({"prompt": "x", "mode": "c"}, "argument 'mode' must be one of 'a', 'b', got 'c'"),
    ({"prompt": "x", "id": 1.5}, "argument 'id' must be a str or an integer, got a number"),
    ({"prompt": "x", "blob": "text"}, "argument 'blob' must be bin (bytes), got a str"),
    ({"prompt": "x", "blob": b""}, "argument 'blob' must be between 1 and 8 bytes, got 0 bytes"),
])
def test_validate_args_names_the_bad_field(args, fragment):
    with pytest.raises(ProtocolError) as e:
        validate_args(SPEC, args, "gen")
    assert e.value.code == "bad_request"
    assert fragment in e.value.message


def test_validate_args_checks_long_id_arrays_by_chunks_and_names_the_first_bad_item():
    # token ids are checked ITEM_CHUNK at a time in C; a bad item is still named exactly
    from cllmd.protocol import ITEM_CHUNK
    spec = OP_SPECS["detokenize"]
    ids = list(range(1000)) * (3 * ITEM_CHUNK // 1000)
    assert validate_args(spec, {"ids": ids}, "detokenize")["ids"] == list(range(1000)) * (3 * ITEM_CHUNK // 1000)
    at = ITEM_CHUNK + 17
    for bad, fragment in ((True, "must be an integer, got a boolean"), (1.0, "must be an integer, got a number"),
                          ("7", "must be an integer, got a str"), (-1, "must be between 0 and 2147483647, got -1"),
                          (2**70, f"must be between 0 and 2147483647, got {2**70}")):
        with pytest.raises(ProtocolError) as e:
            validate_args(spec, {"ids": ids[:at] + [bad] + ids[at:]}, "detokenize")
        assert e.value.message == f"detokenize: argument 'ids' item {at} {fragment}", e.value.message


def test_validate_args_strict_spec_refuses_unknown_arguments():
    with pytest.raises(ProtocolError) as e:
        validate_args(OP_SPECS["train.config.set"], {"lrr": 0.1}, "train.config.set")
    assert "unknown argument 'lrr'" in e.value.message and "lr" in e.value.message


def test_validate_args_accepts_the_short_tuple_form():
    spec = {"n": (int, 3, (0, 9)), "name": (str,)}
    assert validate_args(spec, {"name": "a"}) == {"n": 3, "name": "a"}
    with pytest.raises(ProtocolError, match="between 0 and 9"):
        validate_args(spec, {"name": "a", "n": 10})
    with pytest.raises(TypeError):
        validate_args({"n": [int]}, {})


def test_validate_args_without_spec_passes_args_through():
    assert validate_args(None, {"anything": 1}) == {"anything": 1}


@pytest.mark.parametrize("name", ["../etc/passwd", ".hidden", "a\0b", "é" * 200])
def test_op_specs_queue_add_refuses_unsafe_names(name):
    with pytest.raises(ProtocolError) as e:
        validate_args(OP_SPECS["queue.add"], {"name": name, "data": b"x"}, "queue.add")
    assert "argument 'name'" in e.value.message


def test_op_specs_generate_defaults():
    # a sampling option not given is nil: the daemon applies the model's own default, else the
    # catalogue's (SamplingOptions.from_args)
    from cllmd.generate import SamplingOptions
    args = validate_args(OP_SPECS["generate"], {"prompt": ""}, "generate")
    assert args == {"prompt": "", "max_tokens": None, "temperature": None, "top_k": None,
                    "top_p": None, "min_p": None, "repeat_penalty": None, "repeat_last_n": None,
                    "seed": None, "stop": [], "stream": True, "model": None}
    assert SamplingOptions.from_args(args) == SamplingOptions()
    opts = SamplingOptions.from_args({**args, "top_k": 5}, {"top_k": 40, "temperature": 0.0})
    assert (opts.top_k, opts.temperature, opts.max_tokens) == (5, 0.0, 128)


# --------------------------------------------------------------------------- the document and the code

def _sections(doc: str) -> dict[str, str]:
    """'### `op`' headings of the Operations part -> their text (a heading may name several)."""
    ops_part = doc.split("## Operations", 1)[1].split("\n## ", 1)[0]
    out = {}
    for head, body in re.findall(r"^### ([^\n]+)\n(.*?)(?=^### |\Z)", ops_part, re.M | re.S):
        for op in re.findall(r"`([a-z.]+)`", head):
            out[op] = head + "\n" + body
    return out


def test_docs_document_every_op_and_no_other():
    assert set(_sections(DOC.read_text())) == set(OP_SPECS)


def test_docs_document_every_argument_of_every_op():
    sections = _sections(DOC.read_text())
    for op, spec in OP_SPECS.items():
        for name in spec.fields:
            assert f"| `{name}` |" in sections[op], (op, name)


def test_docs_mark_exactly_the_idempotent_ops():
    sections = _sections(DOC.read_text())
    marked = {op for op, text in sections.items() if "(idempotent)" in text.split("\n", 1)[0]}
    assert marked == set(wire.IDEMPOTENT_OPS)


def test_docs_list_every_error_code_stop_reason_and_topic():
    doc = DOC.read_text()
    for code in wire.ERROR_CODES:
        assert f"| `{code}` |" in doc, code
    for reason in wire.STOP_REASONS:
        assert f'`"{reason}"`' in doc, reason
    for topic in wire.EVENT_TOPICS:
        assert f"| `{topic}` |" in doc, topic


def test_docs_state_the_version_and_a_changed_in_section():
    doc = DOC.read_text()
    assert doc.startswith(f"# The cllmd protocol, version {wire.PROTOCOL_VERSION}")
    assert "## Changed in" in doc and f"**Version {wire.PROTOCOL_VERSION}**" in doc


def test_protocol_module_reexports_the_wire_codec():
    assert protocol.encode is wire.encode and protocol.ProtocolError is wire.ProtocolError


def test_random_frames_never_escape_as_other_exceptions():
    rng = random.Random(7)
    for _ in range(300):
        frame = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        try:
            parse_request(frame, max_bytes=1024)
        except ProtocolError:
            pass


def test_packed_uints_encode_as_the_plain_array():
    # tokenize's reply: ids packed a chunk at a time, the frame the same as packb of the list
    import numpy as np
    rng = np.random.default_rng(0)
    values = [np.arange(200, dtype=np.int32), rng.integers(0, 128, 70000).astype(np.int32),
              np.array([0, 127, 128, 255, 256, 65535, 65536, 2**31 - 1], dtype=np.int32),
              np.zeros(0, dtype=np.int32), rng.integers(0, 2**31 - 1, 5000).astype(np.int32)]
    ids = wire.PackedUints()
    for chunk in values:
        ids.extend(chunk)
    plain = np.concatenate(values).tolist()
    frame = wire.encode({"count": len(plain), "ids": ids})
    assert frame == msgpack.packb({"count": len(plain), "ids": plain})
    assert ids.count == len(plain) and ids.nbytes == len(msgpack.packb(plain)) - 5   # array32 header
    assert wire.encode({"ids": wire.PackedUints()}) == msgpack.packb({"ids": []})
    with pytest.raises(ValueError, match="unsigned"):
        wire.PackedUints().extend(np.array([1, -1]))


def test_packed_uints_at_the_end_of_a_message_are_not_copied_to_be_joined():
    # tokenize's reply ends with its ids: the frame is a view of their buffer, the envelope
    # written just before them, where a join would copy every item once more
    import tracemalloc
    import numpy as np
    ids = wire.PackedUints()
    for _ in range(8):
        ids.extend(np.full(2**20, 97, dtype=np.int32))
    rid = "r" * 256   # the longest id
    tracemalloc.start()
    try:
        frame = wire.encode({"v": 1, "id": rid, "ok": True, "result": {"count": ids.count, "ids": ids}})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak
    assert msgpack.unpackb(frame) == {"v": 1, "id": rid, "ok": True,
                                      "result": {"count": 8 * 2**20, "ids": [97] * (8 * 2**20)}}
    # not last in the message: joined, the same bytes as packb's
    small = wire.PackedUints()
    small.extend(np.array([1, 300, 70000], dtype=np.int32))
    assert wire.encode({"ids": small, "count": 3}) == msgpack.packb({"ids": [1, 300, 70000], "count": 3})
