"""The worker contract: what the coordinator tells a worker process to be, and how the two name its sockets.

`WorkerSpec` is written once by the coordinator (orchestrator/fleet/slots.py `worker_spec`), encoded once
(msgpack, then URL-safe base64 so that it fits in argv: ``python -m worker --spec <text>``), and decoded
and validated by the worker before it does anything else. A missing or unknown field, or a field of the
wrong type, is a `BadField` naming the field: a coordinator and a worker of different versions fail at
start with one readable line, never half-way through serving.

Every default of the contract is written here and nowhere else (GUARD_TIMEOUT_S, the log level).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .codec import Limits
from .curve import CurveClientKeys
from .errors import BadField
from .messages import field_specs

GUARD_TIMEOUT_S = 5.0  # a TP rank waits this long for the others at a collective guard step
CONTROL, DATA = "c", "d"  # a worker's two sockets: heartbeats/cancel/stop, and jobs


def routing_id(socket: str, wid: str, incarnation: int) -> bytes:
    """The ROUTER identity of one of a worker's sockets; the one place this format is written.

    >>> routing_id(CONTROL, "gen/0#1", 3), routing_id(DATA, "gen/0", 0)
    (b'c:gen/0#1:3', b'd:gen/0:0')
    """
    if socket not in (CONTROL, DATA):
        raise ValueError(f"socket must be {CONTROL!r} or {DATA!r}, got {socket!r}")
    return f"{socket}:{wid}:{incarnation}".encode()


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process (one rank of a slot) is. Data only, never code: `handler` is a name from
    the server's own config, resolved by the worker's registry."""

    wid: str  # "gen/0" for rank 0, "gen/0#1" for rank 1 of a TP group
    slot: str  # the slot's wid ("gen/0") for every rank
    pool: str
    handler: str  # built-in name or "module:Class" from the server config
    devices: list  # the slot's physical device ids ("0", "1") or ["cpu"]
    incarnation: int
    endpoint: str  # the coordinator's worker socket
    parent_pid: int  # the coordinator's pid: the worker exits when it changes
    hb_interval: float
    coord_timeout: float
    config: dict = field(default_factory=dict)  # the pool's handler config
    rank: int = 0
    world_size: int = 1
    cores: list | None = None  # CPU cores to pin to; None leaves affinity alone
    capacity: int | None = None  # None: the handler's own
    log_level: str = "INFO"
    guard_timeout: float = GUARD_TIMEOUT_S  # tp > 1 only
    limits: dict = field(default_factory=dict)  # the client limits (protocol.Limits fields) for inputs
    spawned_at: float | None = None  # CLOCK_MONOTONIC at spawn: the worker measures its boot from it
    # Ray mode (the Ray launcher and the rank's actor fill these in): CURVE keys for the TCP worker
    # socket (protocol/curve.py: server_public, public, secret), and the Ray node id the worker runs on.
    curve: dict | None = None
    node: str | None = None

    def routing_id(self, socket: str) -> bytes:
        return routing_id(socket, self.wid, self.incarnation)

    def curve_keys(self) -> CurveClientKeys | None:
        """The CURVE client keys for the worker's sockets (None: the local ipc socket needs none)."""
        return CurveClientKeys.from_spec(self.curve)

    def input_limits(self) -> Limits:
        """The limits a job's `input` is decoded under: the same as the coordinator's client limits."""
        return Limits(**self.limits)

    def encode(self) -> str:
        """Text for argv: msgpack, then URL-safe base64 (argv cannot carry NUL bytes)."""
        packed = msgpack.packb(dataclasses.asdict(self), use_bin_type=True)
        return base64.urlsafe_b64encode(packed).decode("ascii")

    @classmethod
    def decode(cls, text: str) -> "WorkerSpec":
        """Parse and validate; raises BadField with the reason."""
        try:
            d = msgpack.unpackb(base64.urlsafe_b64decode(text.encode("ascii")), raw=False, max_ext_len=0)
        except (ValueError, binascii.Error, msgpack.UnpackException) as e:
            raise BadField(f"worker spec is not base64 msgpack: {type(e).__name__}: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: Any) -> "WorkerSpec":
        if not isinstance(d, dict):
            raise BadField(f"worker spec must be a map, got {type(d).__name__}")
        unknown = d.keys() - _FIELDS.keys()
        if unknown:
            raise BadField(f"worker spec: unknown field(s) {sorted(map(str, unknown))}")
        for name, (check, nullable, required) in _FIELDS.items():
            if name not in d:
                if required:
                    raise BadField(f"worker spec: missing field '{name}'")
            elif not (d[name] is None and nullable or check(d[name])):
                raise BadField(f"worker spec: field '{name}' has wrong type {type(d[name]).__name__}")
        spec = cls(**d)
        try:
            spec.input_limits()  # a bad limit fails here, at start, not at the first job
        except TypeError as e:
            raise BadField(f"worker spec: bad 'limits': {e}") from None
        return spec


# name -> (check, nullable, required), as messages are checked.
_FIELDS = {name: (check, nullable, required) for name, check, nullable, required in field_specs(WorkerSpec)}
