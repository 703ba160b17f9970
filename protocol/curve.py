"""CURVE keys for a ZMQ client socket, shared by both sides (the CLI/Client and remote workers).

A worker launched on another host (Ray mode) connects back over TCP to the coordinator's worker socket.
That socket is a CURVE server with a key pair made for the run; each worker gets, in its spec, the
server's public key and the run's worker key pair (Z85 text: plain strings in the msgpack spec). Locally
launched workers use the private ipc socket and carry no keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import zmq


@dataclass(frozen=True)
class CurveClientKeys:
    """What a CURVE client needs: the server's public key and its own key pair (Z85 bytes)."""

    serverkey: bytes
    publickey: bytes
    secretkey: bytes

    def to_spec(self) -> dict:
        return {"server_public": self.serverkey.decode(), "public": self.publickey.decode(),
                "secret": self.secretkey.decode()}

    @classmethod
    def from_spec(cls, data: dict | None) -> "CurveClientKeys | None":
        """Parse the spec's `curve` entry (None: no CURVE). Raises ValueError on a malformed key."""
        if not data:
            return None
        try:
            keys = cls(data["server_public"].encode(), data["public"].encode(), data["secret"].encode())
        except (KeyError, AttributeError) as e:
            raise ValueError(f"curve keys need server_public, public and secret strings: {e}") from None
        for name in ("serverkey", "publickey", "secretkey"):
            if len(getattr(keys, name)) != 40:
                raise ValueError(f"curve {name} must be 40 Z85 characters")
        return keys


def apply_client(sock: zmq.Socket, keys: CurveClientKeys | None) -> None:
    """Make `sock` a CURVE client (before connect). None leaves it plain (ipc, loopback)."""
    if keys is None:
        return
    sock.curve_serverkey = keys.serverkey
    sock.curve_publickey = keys.publickey
    sock.curve_secretkey = keys.secretkey
