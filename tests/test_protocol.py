"""The wire codec: round trips of every registered message, binary arrays, and named errors for bad input.

Pure in-process tests (no sockets): the end-to-end error replies are in tests/test_core.py.
"""
from __future__ import annotations

import dataclasses
import pathlib

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protocol import (
    ALL_CODES, BadField, Codec, Limits, MESSAGES, MalformedMessage, Message, MessageTooLarge, NDArray,
    PROTOCOL_VERSION, ProtocolError, UnknownOp, UnsupportedVersion, errors as E,
)
from protocol.messages import CLIENT_REPLIES, CLIENT_REQUESTS, Error, Result, Submit

REPO = pathlib.Path(__file__).resolve().parent.parent
ARRAY = NDArray.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))

# One value per annotation the message registry understands (see protocol/messages.py `_CHECKS`).
# "Any" carries a nested structure with an array, so every payload field is exercised with binary data.
SAMPLE_BY_TYPE = {
    "Any": {"text": "héllo", "n": [1, -2, 3.5, None, True], "blob": b"\x00\xff", "arr": ARRAY},
    "str": "some text",
    "int": 42,
    "float": 2.5,
    "bool": True,
    "dict": {"k": [1, 2], "nested": {"x": "y"}},
    "list": [1, "two", 3.0],
    "bytes": b"\x00\x01\xfe\xff",
    "RequestId": "req-7",
}


def sample_value(annotation: str):
    first = [p.strip() for p in annotation.split("|") if p.strip() != "None"][0]
    return SAMPLE_BY_TYPE[first]


def full_sample(cls: type[Message]) -> Message:
    """An instance of `cls` with every field (optional ones too) set to a non-default value."""
    return cls(**{f.name: sample_value(f.type) for f in dataclasses.fields(cls)})


def minimal_sample(cls: type[Message]) -> Message:
    """An instance with only the required fields set."""
    required = [f for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    return cls(**{f.name: sample_value(f.type) for f in required})


def wire(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


@pytest.fixture
def codec() -> Codec:
    return Codec(arrays=True)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("op", sorted(MESSAGES))
def test_every_message_round_trips_with_all_fields(codec, op):
    msg = full_sample(MESSAGES[op])
    raw = codec.encode(msg)
    assert codec.decode(raw) == msg
    d = msgpack.unpackb(raw)
    assert d["v"] == PROTOCOL_VERSION and d["op"] == op


@pytest.mark.parametrize("op", sorted(MESSAGES))
def test_every_message_round_trips_with_required_fields_only(codec, op):
    msg = minimal_sample(MESSAGES[op])
    assert codec.decode(codec.encode(msg)) == msg


def test_optional_none_fields_are_left_off_the_wire(codec):
    d = msgpack.unpackb(codec.encode(Submit(1, "echo")))
    assert d == {"v": PROTOCOL_VERSION, "op": "submit", "id": 1, "pool": "echo", "stream": False}


def test_request_and_reply_families_are_registered():
    for cls in (*CLIENT_REQUESTS, *CLIENT_REPLIES):
        assert MESSAGES[cls.OP] is cls
    worker_ops = set(MESSAGES) - {c.OP for c in (*CLIENT_REQUESTS, *CLIENT_REPLIES)}
    assert worker_ops and all(op.startswith("w_") for op in worker_ops)


def test_int_and_bytes_request_ids_round_trip(codec):
    for rid in (0, 2**63 - 1, -5, "a-b", b"\x00\x01"):
        assert codec.decode(codec.encode(Submit(rid, "p", {"x": 1}))).id == rid


# ----------------------------------------------------------------------------- binary arrays


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(5, dtype=np.int64) - 2,
    np.array([True, False, True]),
    np.arange(8, dtype=np.uint8).reshape(2, 2, 2),
    np.linspace(-1, 1, 7).astype(np.float16),
    np.float64(3.25).reshape(()),  # 0-d
    np.zeros((0, 4), dtype=np.float32),  # empty
    np.arange(12, dtype=np.float64).reshape(3, 4).T,  # non-contiguous view
    np.arange(4, dtype=">i4"),  # big-endian input travels little-endian
])
def test_ndarray_round_trip_keeps_dtype_shape_and_values(codec, array):
    msg = Result(1, {"emb": NDArray.from_numpy(array)})
    out = codec.decode(codec.encode(msg)).output["emb"]
    assert isinstance(out, NDArray)
    back = out.to_numpy()
    assert back.shape == array.shape
    assert back.dtype == array.dtype.newbyteorder("=")
    assert np.array_equal(back, array)


def test_numpy_arrays_are_encoded_as_raw_bytes_not_lists(codec):
    array = np.arange(1000, dtype=np.float32)
    raw = codec.encode(Result(1, array))
    d = msgpack.unpackb(raw)["output"]
    assert d["__ndarray__"] is True and d["dtype"] == "float32" and d["shape"] == [1000]
    assert isinstance(d["data"], bytes) and len(d["data"]) == array.nbytes
    assert len(raw) < array.nbytes + 200  # a list of floats would take 5+ bytes per item


def test_arrays_stay_plain_maps_for_the_forwarding_coordinator():
    # The coordinator decodes with arrays=False and forwards payloads untouched.
    raw = Codec(arrays=True).encode(Submit(1, "p", {"a": ARRAY}))
    inp = Codec().decode(raw).input["a"]
    assert isinstance(inp, dict) and inp["data"] == ARRAY.data
    assert Codec(arrays=True).decode(Codec().encode(Submit(1, "p", {"a": inp}))).input["a"] == ARRAY


def test_unknown_python_objects_are_refused_not_pickled(codec):
    class Thing:
        pass

    with pytest.raises(TypeError, match="cannot encode Thing"):
        codec.encode(Result(1, Thing()))


def test_no_pickle_anywhere_in_the_packages():
    offenders = []
    for pkg in ("protocol", "orchestrator", "worker"):
        for path in (REPO / pkg).rglob("*.py"):
            text = path.read_text()
            if "import pickle" in text or "pickle." in text or "cloudpickle" in text:
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


# ----------------------------------------------------------------------------- named errors


@pytest.mark.parametrize("raw", [
    b"\xc1",  # a byte msgpack never uses
    b"garbage that is not msgpack \xff\xfe",
    b"",
    msgpack.packb({"v": 1, "op": "submit", "id": 1, "pool": "echo"})[:-3],  # truncated
    msgpack.packb({"v": 1, "op": "ping", "id": 1}) + b"\x01",  # trailing data
    msgpack.packb([1, "ping", 3]),  # not a map
    msgpack.packb(7),
    msgpack.packb({1: 2}),  # non-string key
    b"\xd4\x01\x00",  # ext type (never allowed)
])
def test_undecodable_input_is_malformed(codec, raw):
    with pytest.raises(MalformedMessage) as info:
        codec.decode(raw)
    assert info.value.code == E.BAD_REQUEST


@pytest.mark.parametrize("version", [0, 2, 99, "1", None, [1]])
def test_wrong_version_is_named_and_keeps_the_request_id(codec, version):
    with pytest.raises(UnsupportedVersion) as info:
        codec.decode(wire(v=version, op="ping", id=5))
    assert info.value.code == E.UNSUPPORTED_VERSION and info.value.request_id == 5


def test_missing_version_is_unsupported(codec):
    with pytest.raises(UnsupportedVersion):
        codec.decode(wire(op="ping", id=5))


def test_unknown_op(codec):
    with pytest.raises(UnknownOp) as info:
        codec.decode(wire(v=1, op="frobnicate", id="x"))
    assert info.value.code == E.UNKNOWN_OP and info.value.request_id == "x"
    assert "frobnicate" in info.value.message


@pytest.mark.parametrize("op", [None, 3, b"ping"])
def test_missing_or_non_string_op_is_bad_field(codec, op):
    fields = {"v": 1, "id": 1} if op is None else {"v": 1, "id": 1, "op": op}
    with pytest.raises(BadField) as info:
        codec.decode(wire(**fields))
    assert info.value.code == E.BAD_REQUEST


@pytest.mark.parametrize("fields, needle", [
    ({"id": 1}, "pool"),  # submit without pool
    ({"pool": "echo"}, "id"),
])
def test_missing_required_field_names_it(codec, fields, needle):
    with pytest.raises(BadField, match=needle) as info:
        codec.decode(wire(v=1, op="submit", **fields))
    assert info.value.code == E.BAD_REQUEST


@pytest.mark.parametrize("op, fields, bad", [
    ("submit", {"id": 1, "pool": 5}, "pool"),
    ("submit", {"id": 1, "pool": "p", "stream": "yes"}, "stream"),
    ("submit", {"id": 1, "pool": "p", "timeout": "3"}, "timeout"),
    ("submit", {"id": 1, "pool": "p", "retries": 1.5}, "retries"),
    ("submit", {"id": [1], "pool": "p"}, "id"),
    ("submit", {"id": True, "pool": "p"}, "id"),  # bool is not an id
    ("scale", {"id": 1, "pool": "p", "replicas": "3"}, "replicas"),
    ("scale", {"id": 1, "pool": "p", "replicas": True}, "replicas"),  # bool is not an int
    ("cancel", {"id": 1, "job": {"x": 1}}, "job"),
    ("result", {"id": 1, "meta": []}, "meta"),
])
def test_wrongly_typed_field_names_it(codec, op, fields, bad):
    with pytest.raises(BadField, match=f"'{bad}'") as info:
        codec.decode(wire(v=1, op=op, **fields))
    assert info.value.code == E.BAD_REQUEST


def test_bad_field_keeps_a_readable_request_id(codec):
    with pytest.raises(BadField) as info:
        codec.decode(wire(v=1, op="scale", id="r9", pool="p", replicas="x"))
    assert info.value.request_id == "r9"


def test_unknown_field_is_refused(codec):
    with pytest.raises(BadField, match="unknown field") as info:
        codec.decode(wire(v=1, op="ping", id=1, extra=2))
    assert info.value.request_id == 1


def test_null_for_a_required_non_nullable_field_is_refused(codec):
    with pytest.raises(BadField, match="'pool'"):
        codec.decode(wire(v=1, op="submit", id=1, pool=None))


def test_message_over_the_size_limit_is_too_large():
    codec = Codec(Limits(max_message_bytes=1000))
    raw = wire(v=1, op="submit", id=1, pool="p", input="x" * 2000)
    with pytest.raises(MessageTooLarge) as info:
        codec.decode(raw)
    assert info.value.code == E.TOO_LARGE and "1000" in info.value.message


@pytest.mark.parametrize("limits, payload", [
    (Limits(max_str_len=100), "s" * 101),
    (Limits(max_bin_len=100), b"b" * 101),
    (Limits(max_array_len=10), list(range(11))),
    (Limits(max_map_len=10), {str(i): i for i in range(11)}),
])
def test_fields_over_their_limits_are_too_large(limits, payload):
    with pytest.raises(MessageTooLarge):
        Codec(limits).decode(wire(v=1, op="submit", id=1, pool="p", input=payload))


def test_error_codes_are_unique_stable_strings():
    assert len(set(ALL_CODES)) == len(ALL_CODES)
    assert all(isinstance(c, str) and c == c.lower() for c in ALL_CODES)
    for exc in (MalformedMessage, BadField, UnknownOp, UnsupportedVersion, MessageTooLarge):
        assert issubclass(exc, ProtocolError) and exc.code in ALL_CODES
    for code in ("bad_request", "unknown_op", "unknown_pool", "too_large", "overloaded", "cancelled",
                 "handler_error", "unsupported_version", "scale_error"):
        assert code in ALL_CODES


def test_error_reply_may_carry_a_null_id(codec):
    msg = Error(None, E.BAD_REQUEST, "undecodable")
    raw = codec.encode(msg)
    assert msgpack.unpackb(raw)["id"] is None  # documented as present-and-null, not absent
    assert codec.decode(raw) == msg


@pytest.mark.parametrize("rid", [7, "abc", b"\x01"])
def test_too_large_error_still_names_the_request(rid):
    # The id is read without decoding the body, so a client's oversized job gets its error reply.
    raw = wire(v=1, op="submit", id=rid, pool="p", input="x" * 5000)
    with pytest.raises(MessageTooLarge) as info:
        Codec(Limits(max_message_bytes=1000)).decode(raw)
    assert info.value.request_id == rid


def test_too_large_garbage_has_no_request_id():
    with pytest.raises(MessageTooLarge) as info:
        Codec(Limits(max_message_bytes=10)).decode(b"\xc1" * 100)
    assert info.value.request_id is None


# ----------------------------------------------------------------------------- fuzz

_FIELD_NAMES = sorted({f.name for cls in MESSAGES.values() for f in dataclasses.fields(cls)})
_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                  st.text(max_size=20), st.binary(max_size=20))
_value = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
# Maps that often look like messages: a known or odd version and op, known or odd field names.
_envelope = st.fixed_dictionaries(
    {},
    optional={"v": st.one_of(st.just(PROTOCOL_VERSION), _leaf), "op": st.one_of(st.sampled_from(sorted(MESSAGES)), _leaf)},
).flatmap(lambda base: st.dictionaries(
    st.one_of(st.sampled_from(_FIELD_NAMES), st.text(max_size=6)), _value, max_size=6,
).map(lambda extra: {**extra, **base}))
_valid_raw = st.sampled_from(sorted(MESSAGES)).map(lambda op: Codec(arrays=True).encode(full_sample(MESSAGES[op])))


def _mutate(raw: bytes, data) -> bytes:
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    i = data.draw(st.integers(0, max(len(raw) - 1, 0)))
    if kind == "truncate":
        return raw[:i]
    if kind == "flip":
        return raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1:]
    return raw[:i] + data.draw(st.binary(min_size=1, max_size=4)) + raw[i:]


def _decode_is_total(raw: bytes) -> None:
    """The fuzz property: decode returns a registered message (that re-encodes to the same message) or
    raises a ProtocolError. Any other exception escapes and fails the test."""
    for codec in (Codec(Limits(max_message_bytes=4096, max_str_len=512, max_array_len=64)),
                  Codec(arrays=True)):
        try:
            msg = codec.decode(raw)
        except ProtocolError as e:
            assert e.code in ALL_CODES
            continue
        assert MESSAGES[msg.OP] is type(msg)
        again = codec.encode(msg)
        assert codec.encode(codec.decode(again)) == again


_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@_FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(raw):
    _decode_is_total(raw)


@_FUZZ
@given(_envelope)
def test_fuzz_structured_maps(d):
    _decode_is_total(msgpack.packb(d, use_bin_type=True))


@_FUZZ
@given(_valid_raw, st.data())
def test_fuzz_mutated_valid_messages(raw, data):
    _decode_is_total(_mutate(raw, data))


# ---------------------------------------------------------------------------------- conformance details


def test_nil_optional_fields_mean_their_default_and_replies_always_carry_their_fields():
    from protocol.messages import Chunk, Ok, Result, Stop, Submit

    codec = Codec()
    raw = msgpack.packb({"v": 1, "op": "submit", "id": 1, "pool": "p", "stream": None, "timeout": None,
                         "retries": None, "input": None})
    assert codec.decode(raw) == Submit(1, "p", None, False, None, None)
    assert codec.decode(msgpack.packb({"v": 1, "op": "stop", "id": 2, "reason": None, "drain": None})) == \
        Stop(2, "client requested stop", True)
    with pytest.raises(BadField):  # a required field stays required: nil is not a pool name
        codec.decode(msgpack.packb({"v": 1, "op": "submit", "id": 3, "pool": None}))
    assert msgpack.unpackb(codec.encode(Result(1, None, None))) == \
        {"v": 1, "op": "result", "id": 1, "output": None, "meta": None}
    assert msgpack.unpackb(codec.encode(Chunk(1, 0))) == \
        {"v": 1, "op": "chunk", "id": 1, "seq": 0, "data": None}
    assert msgpack.unpackb(codec.encode(Ok(1))) == {"v": 1, "op": "ok", "id": 1, "data": None}


def test_client_codec_answers_unknown_op_for_replies_and_worker_ops():
    from protocol.messages import CLIENT_REQUEST_OPS

    codec = Codec(accept=CLIENT_REQUEST_OPS)
    for op, extra in (("w_run", {"jid": 1}), ("result", {}), ("w_fatal", {})):
        with pytest.raises(UnknownOp) as e:
            codec.decode(msgpack.packb({"v": 1, "op": op, "id": 9, **extra}))
        assert e.value.request_id == 9 and "not a client request" in e.value.message
    assert Codec().decode(msgpack.packb({"v": 1, "op": "w_cancel", "jid": 1})).OP == "w_cancel"


@pytest.mark.parametrize("body, code", [
    ({"v": 1, "op": "submit", "id": "x", "pool": "p", "input": msgpack.ExtType(1, b"z")}, "bad_request"),
    ({"v": 1, "op": "submit", "id": "x", "pool": "p", "input": {1: "a"}}, "bad_request"),
    ({"v": 1, "op": "submit", "pool": "p", 2: 3, "id": "x"}, "bad_request"),
    ({"v": 1, "op": "submit", "id": "x", "pool": "p", "input": "s" * 100}, "too_large"),
])
def test_error_keeps_the_id_whenever_it_can_be_read(body, code):
    codec = Codec(Limits(max_str_len=50))
    with pytest.raises(ProtocolError) as e:
        codec.decode(msgpack.packb(body, use_bin_type=True, strict_types=False))
    assert (e.value.code, e.value.request_id) == (code, "x")


# ----------------------------------------------------------------------------- the worker contract


def _spec(**kw):
    from protocol.workerspec import WorkerSpec

    base = dict(wid="gen/0#1", slot="gen/0", pool="gen", handler="generate", devices=["0", "1"],
                incarnation=3, endpoint="ipc:///run/x/workers", parent_pid=1234, hb_interval=0.5,
                coord_timeout=10.0)
    return WorkerSpec(**{**base, **kw})


def test_worker_spec_round_trips_through_argv_text_with_its_defaults():
    from protocol.workerspec import GUARD_TIMEOUT_S, WorkerSpec

    spec = _spec(rank=1, world_size=2, cores=[2, 3], config={"model": "m", "cb": {"num_blocks": 8}},
                 limits={"max_str_len": 10}, spawned_at=12.5)
    text = spec.encode()
    assert text.isascii() and "\x00" not in text  # argv-safe
    back = WorkerSpec.decode(text)
    assert back == spec and back.input_limits() == Limits(max_str_len=10)
    plain = WorkerSpec.decode(_spec().encode())
    defaults = (plain.guard_timeout, plain.rank, plain.config, plain.log_level)
    assert defaults == (GUARD_TIMEOUT_S, 0, {}, "INFO")


@pytest.mark.parametrize("change, match", [
    (lambda d: d.pop("endpoint"), "missing field 'endpoint'"),
    (lambda d: d.update(colour="red"), r"unknown field\(s\) \['colour'\]"),
    (lambda d: d.update(rank="1"), "field 'rank' has wrong type str"),
    (lambda d: d.update(cores="0-3"), "field 'cores' has wrong type str"),
    (lambda d: d.update(limits={"max_nope": 1}), "bad 'limits'"),
])
def test_worker_spec_decode_names_what_is_wrong(change, match):
    import base64
    import dataclasses

    from protocol.workerspec import WorkerSpec

    d = dataclasses.asdict(_spec())
    change(d)
    text = base64.urlsafe_b64encode(msgpack.packb(d)).decode()
    with pytest.raises(BadField, match=match):
        WorkerSpec.decode(text)


def test_worker_spec_refuses_text_that_is_not_a_spec():
    from protocol.workerspec import WorkerSpec

    for text in ("{\"wid\": 1}", "!!!", base64_of(msgpack.packb([1, 2]))):
        with pytest.raises(BadField):
            WorkerSpec.decode(text)


def base64_of(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).decode()


def test_routing_ids_come_from_one_function():
    from protocol.workerspec import CONTROL, DATA, routing_id

    spec = _spec()
    assert spec.routing_id(CONTROL) == routing_id(CONTROL, "gen/0#1", 3) == b"c:gen/0#1:3"
    assert spec.routing_id(DATA) == b"d:gen/0#1:3"
    with pytest.raises(ValueError):
        routing_id("x", "gen/0", 0)


def test_worker_sends_only_codes_defined_in_protocol_errors():
    """No bare error-code strings in worker/: every code it sends is a constant of protocol/errors.py.
    (Docstrings and comparisons, such as matching "timeout" in an exception's text, are not codes.)"""
    import ast

    from protocol.errors import LOAD_FAILED

    assert LOAD_FAILED in ALL_CODES
    found = []
    for path in sorted((REPO / "worker").rglob("*.py")):
        tree = ast.parse(path.read_text())
        skip = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        skip |= {id(c) for n in ast.walk(tree) if isinstance(n, ast.Compare)
                 for c in [n.left, *n.comparators]}
        found += [f"{path.relative_to(REPO)}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and n.value in ALL_CODES and id(n) not in skip]
    assert found == []


# ----------------------------------------------------------------------------- input passes through unread


def test_the_coordinators_codec_leaves_input_as_its_msgpack_bytes():
    value = {"texts": ["a", "b" * 100], "x": NDArray("float32", (2,), b"\x00" * 8).to_wire(), "n": [None] * 5}
    raw = msgpack.packb({"v": 1, "op": "submit", "id": 7, "input": value, "pool": "p", "stream": True})
    msg = Codec(opaque_input=True).decode(raw)
    assert isinstance(msg, Submit) and (msg.id, msg.pool, msg.stream) == (7, "p", True)
    assert msg.input == msgpack.packb(value)  # exactly the client's bytes
    worker = Codec(arrays=True)
    decoded = worker.unpack_value(msg.input)
    assert decoded["texts"] == value["texts"] and isinstance(decoded["x"], NDArray)
    # ... and an envelope without input, or with a nil one
    bare = msgpack.packb({"v": 1, "op": "submit", "id": 1, "pool": "p"})
    assert Codec(opaque_input=True).decode(bare).input is None


def test_the_coordinator_never_builds_what_input_holds():
    """Limits on strings/arrays/maps inside `input` are the worker's to apply: the coordinator skips the value
    unbuilt (its own map, string and array limits still hold for the envelope)."""
    limits = Limits(max_str_len=8, max_array_len=4, max_map_len=8)
    inner = msgpack.packb([list(range(100)), "x" * 1000, {str(i): i for i in range(50)}])
    raw = msgpack.packb({"v": 1, "op": "submit", "id": 1, "pool": "p", "input": None})[:-1] + inner
    assert Codec(limits, opaque_input=True).decode(raw).input == inner
    with pytest.raises(MessageTooLarge):
        Codec(limits, arrays=True).unpack_value(inner)  # the worker's decode: too_large for that job
    with pytest.raises(MessageTooLarge):
        long_pool = msgpack.packb({"v": 1, "op": "submit", "id": 1, "pool": "p" * 9})
        Codec(limits, opaque_input=True).decode(long_pool)


@pytest.mark.parametrize("raw", [
    msgpack.packb({"v": 1, "op": "submit", "id": 1, "pool": "p", "input": [1, 2]})[:-1],  # truncated
    msgpack.packb({"v": 1, "op": "submit", "id": 1, "pool": "p"}) + b"\x01",  # bytes after the map
    msgpack.packb([1, 2]),  # not a map
    msgpack.packb({1: 2, "v": 1}, strict_types=False),  # a non-string key
    b"",
])
def test_a_bad_envelope_is_still_refused_with_input_left_undecoded(raw):
    codec = Codec(opaque_input=True)
    good = msgpack.packb({"v": 1, "op": "submit", "id": 2, "pool": "p", "input": {"k": [1]}})
    assert codec.decode(good).input == msgpack.packb({"k": [1]})
    with pytest.raises(MalformedMessage):
        codec.decode(raw)
    assert codec.decode(good).input == msgpack.packb({"k": [1]})  # nothing of the bad one is left over


def test_envelopes_small_and_large_decode_alike_one_after_another():
    """Small envelopes share one Unpacker, large ones get their own: interleaved, each comes out whole."""
    codec = Codec(opaque_input=True)
    for i, size in enumerate([10, 200_000, 30, 70_000, 65_000, 5]):
        value = {"s": "x" * size, "i": i}
        raw = msgpack.packb({"v": 1, "op": "submit", "id": i, "pool": "p", "input": value, "stream": True})
        msg = codec.decode(raw)
        assert (msg.id, msg.stream, msgpack.unpackb(msg.input)) == (i, True, value)
