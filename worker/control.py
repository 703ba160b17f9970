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
from typing import Callable

import zmq

from protocol import Codec, curve
from protocol.messages import WCancel, WGroupInfo, WHeartbeat, WHello, WPing, WStop
from protocol.workerspec import CONTROL, WorkerSpec
from worker.handler import Progress

log = logging.getLogger("worker.control")


def connect(sock: zmq.Socket, spec: WorkerSpec, which: str) -> zmq.Socket:
    """Connect one of this worker's sockets (`which`: CONTROL or DATA) to the coordinator, under its
    routing id and, in Ray mode, with the run's CURVE keys. Set any other socket option before."""
    sock.setsockopt(zmq.ROUTING_ID, spec.routing_id(which))
    curve.apply_client(sock, spec.curve_keys())
    sock.connect(spec.endpoint)
    return sock


class ControlState:
    """What the coordinator told this worker on the control socket, for the threads that act on it (the
    compute loop, a TP follower). Made first, so that every part of the worker can be built complete
    around it: the control thread writes it; the others read it and are woken through `wake`."""

    def __init__(self, wake: Callable[[], None]):
        self.cancelled: set = set()  # job ids the client cancelled
        self.stop_event = threading.Event()
        self.stop_reason: str | None = None
        self.group_info: dict | None = None  # TP rendezvous info relayed from rank 0
        self.group_info_event = threading.Event()
        self.wake = wake  # wakes the compute loop's poll, so a cancel or stop acts at once


class ControlThread(threading.Thread):
    """Sends HELLO then heartbeats; applies cancel/stop; exits the process if the coordinator is gone.

    Orphan rules (any one ends the process with os._exit, since the coordinator can no longer stop it):
    the parent pid changed (the coordinator died; PR_SET_PDEATHSIG usually got there first), or no
    coordinator ping for `coord_timeout` seconds.
    """

    def __init__(self, zctx: zmq.Context, spec: WorkerSpec, state: ControlState, progress: Progress,
                 stats_fn: Callable[[], dict | None]):
        super().__init__(name="worker-control", daemon=True)
        self.zctx, self.spec, self.state, self.progress = zctx, spec, state, progress
        self.stats_fn = stats_fn
        self.codec = Codec()
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
        connect(sock, spec, CONTROL)
        sock.send(self.codec.encode(WHello(spec.wid, spec.incarnation, os.getpid(), spec.rank)))
        return sock

    def _loop(self, sock: zmq.Socket) -> None:
        interval = self.spec.hb_interval
        coord_timeout = self.spec.coord_timeout
        last_coord = time.monotonic()
        next_hb = 0.0
        beats = 0
        while not self._closing.is_set():
            now = time.monotonic()
            if now >= next_hb:
                self._check_orphan(now - last_coord, coord_timeout)
                stats = self._stats() if beats % 4 == 0 else None
                sock.send(self.codec.encode(WHeartbeat(
                    self.spec.wid, self.spec.incarnation, self.progress.age(), stats)))
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
        if os.getppid() != self.spec.parent_pid:
            log.error("coordinator (pid %s) is gone; exiting", self.spec.parent_pid)
            os._exit(3)
        if silent_for > coord_timeout:
            log.error("no coordinator heartbeat for %.1f s; exiting", silent_for)
            os._exit(3)

    def _on_message(self, raw: bytes) -> None:
        msg, state = self.codec.decode(raw), self.state
        if isinstance(msg, WCancel):
            state.cancelled.add(msg.jid)
            state.wake()
        elif isinstance(msg, WStop):
            state.stop_reason = msg.reason
            state.stop_event.set()
            state.wake()
        elif isinstance(msg, WGroupInfo):
            state.group_info = msg.info
            state.group_info_event.set()
        elif not isinstance(msg, WPing):
            log.warning("unexpected control message %s", msg.OP)

    def close(self, timeout: float = 2.0) -> None:
        """Stop heartbeating and close the control socket (the process is about to exit)."""
        self._closing.set()
        if self.is_alive():
            self.join(timeout)
