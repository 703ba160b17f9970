"""The one codec: msgpack maps <-> typed messages, with size limits and binary arrays.

No pickle, no eval: msgpack can only produce nil/bool/int/float/str/bin/array/map, and `decode` builds a
message only through the `MESSAGES` registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import (
    BadField, MalformedMessage, MessageTooLarge, ProtocolError, UnknownOp, UnsupportedVersion,
)
from .messages import MESSAGES, PROTOCOL_VERSION, Message, is_request_id

NDARRAY_KEY = "__ndarray__"
REUSE_MAX_BYTES = 64 * 1024  # envelopes up to this size are decoded by one reused Unpacker


@dataclass(frozen=True)
class Limits:
    """Caps applied while decoding. Each is configurable from the server config (README, "Limits")."""

    # 64 MiB: an embedding batch or an array input fits. The coordinator never decodes a job's `input`
    # (it forwards the bytes), so a message costs it about its wire size; the worker decodes one batch
    # of inputs at a time, where tiny items may inflate ~70x (the fuzzer found it).
    max_message_bytes: int = 64 * 1024 * 1024
    max_str_len: int = 64 * 1024 * 1024  # one string
    max_bin_len: int = 64 * 1024 * 1024  # one binary blob (an array's data)
    max_array_len: int = 1_000_000  # items in one list
    max_map_len: int = 100_000  # keys in one map


# Coordinator <-> worker traffic: a private 0700 ipc socket whose inputs already passed the client
# limits. A result may be larger than its request, so only msgpack's own format caps apply.
INTERNAL_LIMITS = Limits(2**62, 2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1)


@dataclass(frozen=True, slots=True)
class NDArray:
    """A dense array on the wire: raw little-endian bytes plus dtype and shape (never a list of floats).

    dtype uses numpy names ("float32", "int64", "bfloat16" travels as "uint16" bits plus a note).
    """

    dtype: str
    shape: tuple
    data: bytes

    def to_numpy(self):
        import numpy as np

        return np.frombuffer(self.data, dtype=np.dtype(self.dtype)).reshape(self.shape)

    @classmethod
    def from_numpy(cls, array) -> "NDArray":
        import numpy as np

        a = np.asarray(array, order="C")  # not ascontiguousarray: it turns 0-d into shape (1,)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        return cls(a.dtype.name, tuple(a.shape), a.tobytes())

    def to_wire(self) -> dict:
        return {NDARRAY_KEY: True, "dtype": self.dtype, "shape": list(self.shape), "data": self.data}


def wire_default(obj: Any) -> Any:
    """msgpack hook for types it does not know: arrays become NDArray maps, sets lists (msgpack packs
    tuples as lists itself)."""
    if isinstance(obj, NDArray):
        return obj.to_wire()
    if hasattr(obj, "__array_interface__") and hasattr(obj, "dtype"):
        return NDArray.from_numpy(obj).to_wire()
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} on the wire")


def array_hook(d: dict) -> Any:
    if d.get(NDARRAY_KEY) is True and len(d) == 4:
        dtype, shape, data = d.get("dtype"), d.get("shape"), d.get("data")
        if isinstance(dtype, str) and isinstance(shape, list) and isinstance(data, bytes):
            return NDArray(dtype, tuple(shape), data)
    return d


def peek_id(raw: bytes, limits: Limits | None = None, max_keys: int = 64):
    """The request id of a message that cannot be decoded, or None: reads the top-level map's keys up
    to "id" and skips other values unbuilt, so an error reply still reaches the job that caused it
    when the message is too large, or carries an ext type or a non-string key somewhere else."""
    lim = limits or Limits()
    unpacker = msgpack.Unpacker(raw=False, max_str_len=lim.max_str_len, max_bin_len=lim.max_bin_len,
                                max_array_len=0, max_map_len=0, max_ext_len=0,
                                max_buffer_size=len(raw) + 1)
    try:
        unpacker.feed(raw)
        for _ in range(min(unpacker.read_map_header(), max_keys)):
            # A key that is a map or list raises here (container limits are 0): no id then, which is rare.
            if unpacker.unpack() == "id":
                rid = unpacker.unpack()
                return rid if is_request_id(rid) else None
            unpacker.skip()
    except Exception:  # garbage or an odd id: the reply goes out with a null id
        return None
    return None


class Codec:
    """Encode/decode wire messages. `arrays=True` turns NDArray maps into `NDArray` objects on decode;
    the coordinator leaves it off because it forwards payloads without looking inside them.

    `opaque_input=True` (the coordinator's client socket) leaves a message's `input` value undecoded: it
    arrives in the message as the client's msgpack bytes, checked only against `max_message_bytes` as part
    of the whole message, and travels so to the worker, which decodes it under the same limits."""

    def __init__(self, limits: Limits | None = None, arrays: bool = False, opaque_input: bool = False,
                 accept: dict | None = None):
        self.limits = limits or Limits()
        self.opaque_input = opaque_input
        self._reused = None  # the envelope decoder's Unpacker for small messages (one thread per Codec)
        # op -> class this codec decodes; any other op is `unknown_op` (the client socket accepts only
        # client requests, so a reply or `w_*` op sent by a client is unknown there, not malformed).
        self.accept = MESSAGES if accept is None else accept
        lim = self.limits
        self._unpack_kw = dict(
            raw=False,
            max_str_len=lim.max_str_len,
            max_bin_len=lim.max_bin_len,
            max_array_len=lim.max_array_len,
            max_map_len=lim.max_map_len,
            max_ext_len=0,
        )
        if arrays:
            self._unpack_kw["object_hook"] = array_hook

    def encode(self, msg: Message) -> bytes:
        return msgpack.packb(msg.to_wire(), use_bin_type=True, default=wire_default)

    def decode(self, raw: bytes) -> Message:
        try:
            return self.from_dict(self.unpack(raw), self.accept)
        except ProtocolError as e:
            if e.request_id is None:  # keep the id whenever it can be read (an ext type elsewhere...)
                e.request_id = peek_id(raw, self.limits)
            raise

    def unpack(self, raw: bytes) -> dict:
        """Bytes -> the raw map, enforcing limits; raises MalformedMessage or MessageTooLarge."""
        self._check_size(raw)
        if self.opaque_input:
            return self._unpack_envelope(raw)
        d = self._unpackb(raw)
        if not isinstance(d, dict):
            raise MalformedMessage(f"message must be a map, got {type(d).__name__}")
        return d

    def unpack_value(self, raw: bytes) -> Any:
        """Any msgpack value (a job's input, on the worker), under the same limits."""
        self._check_size(raw)
        return self._unpackb(raw)

    def _unpackb(self, raw: bytes) -> Any:
        try:
            return msgpack.unpackb(raw, **self._unpack_kw)
        except Exception as e:  # msgpack raises several types for garbage (ExtraData, FormatError...)
            raise _decode_error(e) from None

    def _check_size(self, raw: bytes) -> None:
        if len(raw) > self.limits.max_message_bytes:
            raise MessageTooLarge(
                f"message of {len(raw)} bytes exceeds max_message_bytes={self.limits.max_message_bytes}",
                peek_id(raw),
            )

    def _unpack_envelope(self, raw: bytes) -> dict:
        """The top-level map with its `input` value left as its raw msgpack bytes: skipped, never built,
        so what a job's input contains costs the coordinator nothing beyond its wire size.

        Small messages (the dispatch hot path) go through one reused Unpacker: making one per message
        costs more than a whole `unpackb` of a small submit. Its buffer never holds more than
        REUSE_MAX_BYTES; after any error it is replaced, so no half-read message stays in it."""
        if len(raw) <= REUSE_MAX_BYTES:
            if self._reused is None:
                self._reused = msgpack.Unpacker(max_buffer_size=REUSE_MAX_BYTES + 1, **self._unpack_kw)
            unpacker, base = self._reused, self._reused.tell()
        else:
            unpacker, base = msgpack.Unpacker(max_buffer_size=len(raw) + 1, **self._unpack_kw), 0
        unpacker.feed(raw)
        try:
            return self._walk_envelope(unpacker, raw, base)
        except BaseException:
            self._reused = None
            raise

    def _walk_envelope(self, unpacker, raw: bytes, base: int) -> dict:
        try:
            size = unpacker.read_map_header()
        except Exception as e:
            raise MalformedMessage(f"message must be a map: {type(e).__name__}: {e}") from None
        d = {}
        try:
            for _ in range(size):
                key = unpacker.unpack()
                if key == "input":
                    start = unpacker.tell() - base
                    unpacker.skip()
                    d[key] = raw[start:unpacker.tell() - base]
                elif isinstance(key, str):
                    d[key] = unpacker.unpack()
                else:
                    raise MalformedMessage(f"message keys must be strings, got {type(key).__name__}")
        except ProtocolError:
            raise
        except Exception as e:  # OutOfData (truncated), a field over a limit...
            raise _decode_error(e) from None
        left = len(raw) - (unpacker.tell() - base)
        if left:
            raise MalformedMessage(f"undecodable message: {left} bytes after the map")
        return d

    @staticmethod
    def from_dict(d: dict, accept: dict | None = None) -> Message:
        rid = d.get("id")
        rid = rid if is_request_id(rid) else None
        v = d.get("v")
        if type(v) is not int or v != PROTOCOL_VERSION:  # True and 1.0 equal 1 in Python
            raise UnsupportedVersion(f"protocol version {v!r} not supported (server speaks "
                                     f"{PROTOCOL_VERSION})", rid)
        op = d.get("op")
        if not isinstance(op, str):
            raise BadField("missing or non-string 'op'", rid)
        cls = (MESSAGES if accept is None else accept).get(op)
        if cls is None:
            why = "not a client request" if op in MESSAGES else "unknown op"
            raise UnknownOp(f"{why}: {op!r}", rid)
        return cls.from_wire(d, rid)


def _decode_error(e: Exception) -> ProtocolError:
    """The error for an exception msgpack raised while decoding: a field over a limit is too_large;
    anything else (garbage, truncation, an ext type, a non-string key) is malformed."""
    if isinstance(e, ValueError):
        if "exceeds max_" in str(e) and "max_ext_len" not in str(e):  # ext types are refused, not too large
            return MessageTooLarge(f"message field too large: {e}")
        return MalformedMessage(_malformed_reason(e))
    return MalformedMessage(f"undecodable message: {type(e).__name__}: {e}")


def _malformed_reason(e: ValueError) -> str:
    text = str(e)
    if "max_ext_len" in text:
        return "msgpack ext types are not accepted"
    if "map key" in text:  # msgpack: "int is not allowed for map key when strict_map_key=True"
        return f"map keys must be strings, got a key of type {text.split()[0]}"
    return f"undecodable message: {text}"
