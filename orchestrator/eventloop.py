"""A minimal poll loop over ZMQ sockets and raw fds (pidfds, pipes, the signal socketpair)."""
from __future__ import annotations

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
