"""Refused connections, logged without letting a client flood the log (each kind through a `LogThrottle`):
- a client whose CURVE key is not authorised: by the ZAP handler's log (`ZapLog`), naming the key;
- a client that fails the handshake before ZAP (no CURVE at all, garbage, a wrong socket type): by a
  socket monitor on the client socket (`HandshakeMonitor`), which the coordinator's loop reads.
The worker socket's refusals (Ray mode, ZAP domain `workers`) are logged the same way, as worker
connections."""
from __future__ import annotations

import logging
import os

import zmq

from protocol.logthrottle import LogThrottle

log = logging.getLogger("orchestrator.security")

WORKER_DOMAIN = "workers"  # ZAP domain of the worker socket: client keys never open it, nor the reverse


def _refusals(who: str) -> LogThrottle:
    return LogThrottle(log, f"more 'refused {who} connection' lines")


class ZapLog:
    """zmq.auth logs its decisions at debug level; surface refusals as (rate-limited) warnings."""

    def __init__(self):
        self.refused = _refusals("client")
        self.refused_workers = _refusals("worker")

    def __getattr__(self, name):
        return getattr(log, name)

    def debug(self, msg, *args, **kwargs):
        text = msg % args if args else msg
        throttle, who = self.refused, "client"
        if f"domain={WORKER_DOMAIN} " in text:
            throttle, who = self.refused_workers, "worker"
        if text.startswith("DENIED"):
            throttle(f"refused {who} connection: %s", text)
        elif text.startswith("ZAP reply") and "200" not in text and "Unknown key" not in text:
            throttle("refused client connection: %s", text)  # no DENIED line for these
        else:
            log.debug(text)


# libzmq's protocol error codes (event values of EVENT_HANDSHAKE_FAILED_PROTOCOL) -> words.
_PROTOCOL_ERRORS = {getattr(zmq, n): n[len("PROTOCOL_ERROR_"):].lower()
                    for n in dir(zmq) if n.startswith("PROTOCOL_ERROR_")}
_WHY = {"zmtp_mechanism_mismatch": "the client did not use CURVE (no key, or wrong mechanism)",
        "zmtp_cryptographic": "the client's CURVE handshake failed (wrong server key?)",
        "zmtp_invalid_metadata": "incompatible socket type or bad metadata"}


def _handshake_failure(event: int, value: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        name = _PROTOCOL_ERRORS.get(value, hex(value))
        return f"{name} ({_WHY.get(name, 'not a valid ZMTP client')})"
    return os.strerror(value) if value else "no detail"


class HandshakeMonitor:
    """A ZMQ socket monitor on the client socket: logs connections that fail the handshake and
    connections that libzmq closes, so that drops nobody can answer still leave a line in the log.

    libzmq reports a message over the hard `MAXMSGSIZE` cap only as a disconnect, the same event as a
    client leaving, so a closed connection is logged (info) with both explanations.
    """

    EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
              | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)

    def __init__(self, sock: zmq.Socket, hard_cap: int, who: str = "client", log_closes: bool = True):
        self.sock = sock.get_monitor_socket(self.EVENTS)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.hard_cap = hard_cap
        self.who = who  # "client", or "worker" for the worker socket in Ray mode
        self.log_closes = log_closes  # workers leave at every restart: not worth a line each
        self.open = 0
        self.refused = 0  # handshakes that failed
        self._unlogged_closes = 0  # refused connections: their close needs no second line
        self.refusals = _refusals(who)
        self.closes = LogThrottle(log, "more 'client connection closed' lines (the client left, or a message "
                                  f"over the {hard_cap}-byte hard cap)", logging.INFO)

    def on_readable(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        for _ in range(256):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(frames)
            self._on_event(event["event"], event["value"], event["endpoint"])

    def _on_event(self, event: int, value: int, endpoint: bytes) -> None:
        where = endpoint.decode(errors="replace")
        if event == zmq.EVENT_ACCEPTED:
            self.open += 1
        elif event == zmq.EVENT_DISCONNECTED:
            self.open = max(0, self.open - 1)
            if self._unlogged_closes:
                self._unlogged_closes -= 1
                return
            if not self.log_closes:
                return
            self.closes("client connection on %s closed (%d open): the client left, or libzmq cut "
                        "it for a protocol error or a message over the %d-byte hard cap", where,
                        self.open, self.hard_cap)
        else:  # a HANDSHAKE_FAILED_* event; libzmq reports the connection's close right after it
            self.refused += 1
            self._unlogged_closes += 1
            if event != zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # ZapLog logged that one, naming the key
                self.refusals(f"refused {self.who} connection on %s: handshake failed: %s", where,
                              _handshake_failure(event, value))

    def flush(self) -> None:
        """Call now and then (the coordinator's tick): reports suppressed counts without waiting."""
        self.refusals.flush()
        self.closes.flush()

    def close(self) -> None:
        self.sock.close(linger=0)
