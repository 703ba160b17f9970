"""Typed wire messages.

Every message is a small dataclass with a class-level `OP`. On the wire it is one msgpack map:
``{"v": PROTOCOL_VERSION, "op": OP, <fields>}``. The registry `MESSAGES` maps op -> class and is the only
way a message type is chosen when decoding; an unknown op raises `UnknownOp`.

Two families share the codec:
- client-facing (documented field by field in protocol/README.md): requests a client sends and the
  replies it gets;
- worker-facing (ops prefixed ``w_``): coordinator <-> worker traffic on the private ipc socket.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from .errors import BadField

PROTOCOL_VERSION = 1
# A client-chosen request id. Annotations stay strings (see _CHECKS); this alias is for readers and linters.
RequestId = int | str | bytes


def is_request_id(v: Any) -> bool:
    """Whether `v` can be a request id (int, str or bytes; a bool is not an int here)."""
    return (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, (str, bytes))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Annotation string -> checker. Kept deliberately small: the wire carries msgpack types only.
_CHECKS: dict[str, Callable[[Any], bool]] = {
    "Any": lambda v: True,
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "float": _is_num,
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, (list, tuple)),
    "bytes": lambda v: isinstance(v, bytes),
    "RequestId": is_request_id,
}


_ABSENT = object()  # a field missing from the wire map (None is a value)


def field_check(annotation: str) -> tuple[Callable[[Any], bool], bool]:
    """Return (check, nullable) for an annotation such as ``"int | None"``."""
    parts = [p.strip() for p in annotation.split("|")]
    nullable = "None" in parts
    checks = [_CHECKS[p] for p in parts if p != "None"]
    if len(checks) == 1:  # the usual case: no closure or generator per field on the decode hot path
        return checks[0], nullable
    return (lambda v: any(c(v) for c in checks)), nullable


def field_specs(cls) -> list[tuple]:
    """(name, check, nullable, required) for each field of a dataclass; required: it has no default."""
    specs = []
    for f in dataclasses.fields(cls):
        check, nullable = field_check(f.type if isinstance(f.type, str) else f.type.__name__)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        specs.append((f.name, check, nullable, required))
    return specs


@dataclass(slots=True)
class Message:
    """Base of every wire message. Subclasses set OP and are registered with `@register`."""

    OP: ClassVar[str] = ""
    # Optional fields that travel even when nil, so that a reply's shape never depends on its value
    # (a result without output still carries `"output": nil`).
    ALWAYS_SENT: ClassVar[tuple] = ()
    # (name, check, nullable, sent) per field, computed once at registration for fast decoding; `sent`:
    # the field travels even as nil (required fields, the error id, ALWAYS_SENT).
    _FIELDS: ClassVar[tuple] = ()
    _REQUIRED: ClassVar[frozenset] = frozenset()
    _NAMES: ClassVar[frozenset] = frozenset()

    def to_wire(self) -> dict:
        d = {"v": PROTOCOL_VERSION, "op": self.OP}
        for name, _check, _nullable, sent in self._FIELDS:
            value = getattr(self, name)
            if value is not None or sent:
                d[name] = value
        return d

    @classmethod
    def from_wire(cls, d: dict, request_id: Any = None) -> "Message":
        kwargs = {}
        required = cls._REQUIRED
        for name, check, nullable, _sent in cls._FIELDS:
            value = d.get(name, _ABSENT)
            # An optional field may be omitted or nil (protocol/README.md): nil then means its default.
            if value is _ABSENT or value is None and not nullable and name not in required:
                if name in required:
                    raise BadField(f"{cls.OP}: missing field '{name}'", request_id)
                continue
            if not (value is None and nullable or check(value)):
                raise BadField(
                    f"{cls.OP}: field '{name}' has wrong type {type(value).__name__}", request_id
                )
            kwargs[name] = value
        # Counting keys is cheaper than a set difference per message; only a mismatch builds the set.
        if len(d) != len(kwargs) + ("v" in d) + ("op" in d):
            extra = d.keys() - cls._NAMES
            if extra:
                raise BadField(f"{cls.OP}: unknown field(s) {sorted(map(str, extra))}", request_id)
        return cls(**kwargs)


MESSAGES: dict[str, type[Message]] = {}


def register(cls: type[Message]) -> type[Message]:
    """Add a message class to the registry, precomputing its field checkers."""
    if cls.OP in MESSAGES:
        raise ValueError(f"duplicate op {cls.OP!r}")
    specs = field_specs(cls)
    cls._FIELDS = tuple((name, check, nullable, required or name in cls.ALWAYS_SENT)
                        for name, check, nullable, required in specs)
    cls._REQUIRED = frozenset(name for name, _check, _nullable, required in specs if required)
    cls._NAMES = frozenset(["v", "op", *(s[0] for s in specs)])
    MESSAGES[cls.OP] = cls
    return cls


# ----------------------------------------------------------------------------- client -> coordinator


@register
@dataclass(slots=True)
class Submit(Message):
    """Run `input` on a worker of `pool`. Answered by chunks (if stream) then one result or one error."""

    OP: ClassVar[str] = "submit"
    id: RequestId
    pool: str
    input: Any = None
    stream: bool = False
    timeout: float | None = None  # seconds from acceptance; past it the job fails with `timeout`
    retries: int | None = None  # overrides the pool's retry budget for this job


@register
@dataclass(slots=True)
class Cancel(Message):
    """Cancel this client's job `job` (the id its submit used)."""

    OP: ClassVar[str] = "cancel"
    id: RequestId
    job: RequestId


@register
@dataclass(slots=True)
class Status(Message):
    OP: ClassVar[str] = "status"
    id: RequestId


@register
@dataclass(slots=True)
class Health(Message):
    OP: ClassVar[str] = "health"
    id: RequestId


@register
@dataclass(slots=True)
class Scale(Message):
    OP: ClassVar[str] = "scale"
    id: RequestId
    pool: str
    replicas: int


@register
@dataclass(slots=True)
class Stop(Message):
    """Ask the coordinator to drain (unless drain is false) and exit."""

    OP: ClassVar[str] = "stop"
    id: RequestId
    reason: str = "client requested stop"
    drain: bool = True


@register
@dataclass(slots=True)
class Ping(Message):
    OP: ClassVar[str] = "ping"
    id: RequestId


@register
@dataclass(slots=True)
class Reload(Message):
    """Restart every slot of `pool` with a fresh failure budget: the operator's way to retry a slot that
    failed permanently (after fixing its model or config on disk), or to pick up new weights."""

    OP: ClassVar[str] = "reload"
    id: RequestId
    pool: str


# ----------------------------------------------------------------------------- coordinator -> client


@register
@dataclass(slots=True)
class Result(Message):
    """The final output of job `id`."""

    OP: ClassVar[str] = "result"
    ALWAYS_SENT: ClassVar[tuple] = ("output", "meta")
    id: RequestId
    output: Any = None
    meta: dict | None = None


@register
@dataclass(slots=True)
class Chunk(Message):
    """One streamed piece of job `id`; seq counts from 0 with no gaps."""

    OP: ClassVar[str] = "chunk"
    ALWAYS_SENT: ClassVar[tuple] = ("data",)
    id: RequestId
    seq: int
    data: Any = None


@register
@dataclass(slots=True)
class Error(Message):
    """Request or job `id` failed. id is null only when the bad message's id could not be read."""

    OP: ClassVar[str] = "error"
    id: RequestId | None
    code: str
    message: str
    details: Any = None


@register
@dataclass(slots=True)
class Ok(Message):
    """Success reply to a non-job request (status, health, scale, stop, ping, cancel)."""

    OP: ClassVar[str] = "ok"
    ALWAYS_SENT: ClassVar[tuple] = ("data",)
    id: RequestId
    data: Any = None


# ----------------------------------------------------------------------------- coordinator -> worker


@register
@dataclass(slots=True)
class WRun(Message):
    """A job for a worker. `input` is the client's msgpack encoding of its submit's `input`, forwarded
    unread by the coordinator (null when the submit had none); the worker decodes it under the client
    limits and fails that job alone when it does not decode."""

    OP: ClassVar[str] = "w_run"
    jid: int
    input: bytes | None = None
    stream: bool = False


@register
@dataclass(slots=True)
class WCancel(Message):
    OP: ClassVar[str] = "w_cancel"
    jid: int


@register
@dataclass(slots=True)
class WStop(Message):
    OP: ClassVar[str] = "w_stop"
    reason: str


@register
@dataclass(slots=True)
class WPing(Message):
    """Coordinator heartbeat; a worker that hears none for its timeout exits (no orphans)."""

    OP: ClassVar[str] = "w_ping"
    t: float


@register
@dataclass(slots=True)
class WGroupInfo(Message):
    """Relayed from a TP group's rank 0 to its other ranks: where the group's rendezvous store is."""

    OP: ClassVar[str] = "w_group_info"
    info: dict


# ----------------------------------------------------------------------------- worker -> coordinator


@register
@dataclass(slots=True)
class WHello(Message):
    """First message of a worker process's control socket: it is alive and loading."""

    OP: ClassVar[str] = "w_hello"
    wid: str
    incarnation: int
    pid: int
    rank: int = 0


@register
@dataclass(slots=True)
class WReady(Message):
    """Sent on the data socket once the handler is loaded: jobs may now be sent to this socket."""

    OP: ClassVar[str] = "w_ready"
    wid: str
    incarnation: int
    capacity: int
    devices: list
    replay_safe: bool = True
    info: dict | None = None


@register
@dataclass(slots=True)
class WHeartbeat(Message):
    """Worker liveness (from its I/O thread) plus progress: step_age is how long the current
    handler step has run (null when idle), which lets the coordinator tell busy from hung."""

    OP: ClassVar[str] = "w_hb"
    wid: str
    incarnation: int
    step_age: float | None = None
    stats: dict | None = None


@register
@dataclass(slots=True)
class WChunk(Message):
    OP: ClassVar[str] = "w_chunk"
    jid: int
    data: Any = None


@register
@dataclass(slots=True)
class WResult(Message):
    OP: ClassVar[str] = "w_result"
    jid: int
    output: Any = None
    run_ms: float | None = None


@register
@dataclass(slots=True)
class WError(Message):
    OP: ClassVar[str] = "w_error"
    jid: int
    code: str
    message: str
    details: Any = None


@register
@dataclass(slots=True)
class WFatal(Message):
    """The worker (or its TP group) cannot go on: load failure, collective mismatch. It exits next."""

    OP: ClassVar[str] = "w_fatal"
    wid: str
    incarnation: int
    code: str
    message: str
    details: Any = None


@register
@dataclass(slots=True)
class WGroupReport(Message):
    """A TP group's rank 0 publishes its rendezvous info for the coordinator to relay."""

    OP: ClassVar[str] = "w_group_report"
    wid: str
    incarnation: int
    info: dict


CLIENT_REQUESTS = (Submit, Cancel, Status, Health, Scale, Reload, Stop, Ping)
CLIENT_REPLIES = (Result, Chunk, Error, Ok)
# What the coordinator's client socket decodes: any other op (a reply, a `w_*` op) is `unknown_op`.
CLIENT_REQUEST_OPS = {cls.OP: cls for cls in CLIENT_REQUESTS}
