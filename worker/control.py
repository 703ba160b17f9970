"""The worker's I/O thread: heartbeats, cancel/stop, and the no-orphan checks.

It owns the worker's *control* socket. Jobs never pass through it: they go straight to the compute
thread's own *data* socket, so the hot path has no thread handoff. This thread only wakes every
`hb_interval` or on a control message, so it costs the compute thread almost no GIL time; and because it
runs on its own thread, heartbeats go on while a handler computes (liveness is not progress).
"""
from __future__ import annotations

import logging
import os
import threading
import time

import zmq

from protocol import Codec, curve
from protocol.messages import WCancel, WGroupInfo, WHeartbeat, WHello, WPing, WStop

log = logging.getLogger("worker.control")


class Progress:
    """How long the current step has run. The compute thread marks steps; heartbeats report the age."""

    def __init__(self):
        self._since: float | None = None

    def begin(self) -> None:
        self._since = time.monotonic()

    tick = begin  # progress inside a long step (a streamed token) restarts the clock

    def end(self) -> None:
        self._since = None

    def age(self) -> float | None:
        since = self._since
        return None if since is None else time.monotonic() - since


class ControlThread(threading.Thread):
    """Sends HELLO then heartbeats; applies cancel/stop; exits the process if the coordinator is gone.

    Orphan rules (any one ends the process with os._exit, since the coordinator can no longer stop it):
    the parent pid changed (the coordinator died; PR_SET_PDEATHSIG usually got there first), or no
    coordinator ping for `coord_timeout` seconds.
    """

    def __init__(self, zctx: zmq.Context, spec: dict, progress: Progress, cancelled: set):
        super().__init__(name="worker-control", daemon=True)
        self.zctx, self.spec, self.progress, self.cancelled = zctx, spec, progress, cancelled
        self.codec = Codec()
        self.stop_reason: str | None = None
        self.stop_event = threading.Event()
        self.group_info: dict | None = None
        self.group_info_event = threading.Event()
        self.stats_fn = lambda: None
        self._wake = None
        self._closing = threading.Event()

    def run(self) -> None:
        sock = self._connect()
        try:
            self._loop(sock)
        finally:
            sock.close(linger=0)

    def _connect(self) -> zmq.Socket:
        spec = self.spec
        sock = self.zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, f"c:{spec['wid']}:{spec['incarnation']}".encode())
        curve.apply_client(sock, curve.CurveClientKeys.from_spec(spec.get("curve")))
        sock.connect(spec["endpoint"])
        sock.send(self.codec.encode(WHello(spec["wid"], spec["incarnation"], os.getpid(), spec["rank"])))
        return sock

    def _loop(self, sock: zmq.Socket) -> None:
        interval = self.spec["hb_interval"]
        coord_timeout = self.spec["coord_timeout"]
        last_coord = time.monotonic()
        next_hb = 0.0
        beats = 0
        while not self._closing.is_set():
            now = time.monotonic()
            if now >= next_hb:
                self._check_orphan(now - last_coord, coord_timeout)
                stats = self._stats() if beats % 4 == 0 else None
                sock.send(self.codec.encode(WHeartbeat(
                    self.spec["wid"], self.spec["incarnation"], self.progress.age(), stats)))
                beats += 1
                next_hb = now + interval
            if sock.poll(max(1, int((next_hb - time.monotonic()) * 1000))):
                last_coord = time.monotonic()
                self._on_message(sock.recv())

    def _stats(self) -> dict | None:
        """Stats are optional; liveness is not. A failing probe (e.g. torch half-imported by the
        compute thread) must never end this thread, or the heartbeats stop and the worker is killed."""
        try:
            return self.stats_fn()
        except Exception as e:
            log.debug("device stats unavailable: %s", e)
            return None

    def _check_orphan(self, silent_for: float, coord_timeout: float) -> None:
        if os.getppid() != self.spec["parent_pid"]:
            log.error("coordinator (pid %s) is gone; exiting", self.spec["parent_pid"])
            os._exit(3)
        if silent_for > coord_timeout:
            log.error("no coordinator heartbeat for %.1f s; exiting", silent_for)
            os._exit(3)

    def _on_message(self, raw: bytes) -> None:
        msg = self.codec.decode(raw)
        if isinstance(msg, WCancel):
            self.cancelled.add(msg.jid)
            self._poke()
        elif isinstance(msg, WStop):
            self.stop_reason = msg.reason
            self.stop_event.set()
            self._poke()
        elif isinstance(msg, WGroupInfo):
            self.group_info = msg.info
            self.group_info_event.set()
        elif not isinstance(msg, WPing):
            log.warning("unexpected control message %s", msg.OP)

    def close(self, timeout: float = 2.0) -> None:
        """Stop heartbeating and close the control socket (the process is about to exit)."""
        self._closing.set()
        if self.is_alive():
            self.join(timeout)

    def set_wake(self, wake) -> None:
        """Callable that wakes the compute loop's poll (so a cancel or stop acts at once)."""
        self._wake = wake

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake()
