"""A minimal poll loop over ZMQ sockets and raw fds (pidfds, pipes, the signal socketpair)."""
from __future__ import annotations

import signal
import socket
from typing import Callable

import zmq


class EventLoop:
    def __init__(self):
        self.poller = zmq.Poller()
        self.handlers: dict = {}

    def add(self, target, callback: Callable[[], None]) -> None:
        """Call `callback()` whenever `target` (a zmq socket or an int fd) is readable."""
        self.handlers[target] = callback
        self.poller.register(target, zmq.POLLIN)

    def remove(self, target) -> None:
        if self.handlers.pop(target, None) is not None:
            self.poller.unregister(target)

    def poll(self, timeout_s: float) -> None:
        for target, _event in self.poller.poll(int(timeout_s * 1000)):
            callback = self.handlers.get(target)
            if callback is not None:
                callback()


class Outbox:
    """Messages of one loop turn, sent together at its end, so that a worker or a client wakes once for
    the lot rather than once per message (scripts/bench_dispatch.py, 4 echo workers on 2 cores: 9k ->
    13k jobs/s). `put((socket, route frames, body))` queues one; `flush()` sends all, in order."""

    def __init__(self):
        self._items: list = []
        self.put = self._items.append  # bound once: it is on the job path

    def __bool__(self) -> bool:
        return bool(self._items)

    def flush(self) -> None:
        items = self._items[:]
        self._items.clear()
        for sock, route, body in items:
            send_frames(sock, route, body)


def send_frames(sock: zmq.Socket, route: tuple, body: bytes) -> None:
    """send_multipart(route + [body]) without its per-call type checks and flag-enum arithmetic, which
    cost about 2 us a message on the job path (scripts/bench_dispatch.py)."""
    for frame in route:
        sock.send(frame, _SNDMORE)
    sock.send(body)


_SNDMORE = zmq.SNDMORE


class Signals:
    """SIGTERM and SIGINT only set a flag; a socketpair registered in the loop wakes the poll, so
    `on_signal(signum)` runs on the loop thread at once."""

    def __init__(self, loop: EventLoop, on_signal: Callable[[int], None],
                 signums: tuple = (signal.SIGTERM, signal.SIGINT)):
        self.on_signal = on_signal
        self._r, self._w = socket.socketpair()
        for s in (self._r, self._w):
            s.setblocking(False)
        signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        self._pending: list[int] = []
        for sig in signums:
            signal.signal(sig, lambda signum, _frame: self._pending.append(signum))
        loop.add(self._r.fileno(), self._drain)

    def _drain(self) -> None:
        try:
            self._r.recv(512)
        except BlockingIOError:
            pass
        while self._pending:
            self.on_signal(self._pending.pop(0))
