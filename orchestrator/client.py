"""Synchronous client: thread-safe, many jobs in flight, streaming, cancel.

One background I/O thread owns the DEALER socket (ZMQ sockets are not thread-safe). Caller threads
encode their own requests and hand the bytes over an inproc PUSH socket of their own, so the I/O thread
only moves bytes outward and decodes replies inward.
"""
from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from typing import Any, Iterator

import zmq

from protocol import Codec, JobError, ProtocolError
from protocol.messages import (
    Cancel, Chunk, Error, Health, Ok, Ping, Result, Scale, Status, Stop, Submit,
)
from . import security


class RequestError(JobError):
    """An `error` reply. `.code` is the protocol's stable error code (see protocol/README.md)."""


_DONE = object()


class _Pending:
    """Reply slot for one request id. Chunks and the terminal reply arrive on `events`."""

    __slots__ = ("events", "done", "outcome")

    def __init__(self):
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.done = threading.Event()
        self.outcome: Any = None  # Result | Ok | Error once done


class JobHandle:
    """A submitted job. `result()` waits for its output; iterating yields its stream chunks."""

    def __init__(self, client: "Client", rid: int, pool: str, pending: _Pending, timeout: float | None):
        self.client, self.id, self.pool = client, rid, pool
        self._p = pending
        self._timeout = timeout

    def done(self) -> bool:
        return self._p.done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        """The job's output. Raises RequestError (with .code) on an error reply, TimeoutError if no
        reply within `timeout` seconds (default: the submit timeout plus a grace period, else forever)."""
        wait = timeout if timeout is not None else (self._timeout + 5 if self._timeout else None)
        if not self._p.done.wait(wait):
            raise TimeoutError(f"job {self.id} on pool {self.pool}: no reply within {wait} s")
        return _unwrap(self._p.outcome)

    def __iter__(self) -> Iterator[Any]:
        """Stream chunks (data) as they arrive; ends after the final reply, raising on an error."""
        while True:
            item = self._p.events.get()
            if item is _DONE:
                _unwrap(self._p.outcome)
                return
            yield item

    def cancel(self, timeout: float = 10.0) -> dict:
        """Ask the coordinator to cancel this job; the job then ends with code `cancelled`."""
        return self.client._request(lambda rid: Cancel(rid, self.id), timeout)


def _unwrap(outcome) -> Any:
    if isinstance(outcome, Error):
        raise RequestError(outcome.code, outcome.message, outcome.details)
    if isinstance(outcome, Result):
        return outcome.output
    return outcome.data  # Ok


class Client:
    """`Client(address)` connects at once (ZMQ reconnects by itself). Use as a context manager or
    call `close()`."""

    def __init__(self, address: str, *, curve: dict | None = None, timeout: float = 30.0):
        self.address = address
        self.timeout = timeout  # default wait for non-job requests (status, scale, ...)
        self._codec = Codec(arrays=True)
        self._ctx = zmq.Context()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._inbox = f"inproc://client-{id(self)}-{os.getpid()}"
        self._local = threading.local()
        self._socks: list = []
        self._socks_lock = threading.Lock()
        self._closed = threading.Event()
        curve = security.client_keys(curve)  # raises ValueError here, not in the I/O thread
        self._io = threading.Thread(target=self._io_loop, args=(curve,), daemon=True,
                                    name="orchestrator-client-io")
        self._bound = threading.Event()
        self._io.start()
        self._bound.wait()

    # ------------------------------------------------------------------ public API

    def submit(self, pool: str, input: Any = None, *, stream: bool = False,
               timeout: float | None = None, retries: int | None = None) -> JobHandle:
        rid = next(self._ids)
        pending = self._register(rid)
        self._send(Submit(rid, pool, input, stream, timeout, retries))
        return JobHandle(self, rid, pool, pending, timeout)

    def run(self, pool: str, input: Any = None, *, timeout: float | None = None) -> Any:
        """submit(...).result(): the output, or RequestError."""
        return self.submit(pool, input, timeout=timeout).result(timeout)

    def status(self) -> dict:
        return self._request(Status)

    def health(self) -> dict:
        return self._request(Health)

    def ping(self, timeout: float | None = None) -> dict:
        return self._request(Ping, timeout)

    def scale(self, pool: str, replicas: int) -> dict:
        return self._request(lambda rid: Scale(rid, pool, replicas))

    def stop(self, reason: str = "client requested stop", drain: bool = True) -> dict:
        return self._request(lambda rid: Stop(rid, reason, drain))

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._io.join(timeout=5)
        with self._socks_lock:
            for s in self._socks:
                s.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _request(self, make, timeout: float | None = None) -> Any:
        rid = next(self._ids)
        pending = self._register(rid)
        self._send(make(rid))
        wait = self.timeout if timeout is None else timeout
        if not pending.done.wait(wait):
            self._pending.pop(rid, None)
            raise TimeoutError(f"no reply from {self.address} within {wait} s")
        return _unwrap(pending.outcome)

    def _register(self, rid: int) -> _Pending:
        if self._closed.is_set():
            raise RuntimeError("client is closed")
        p = _Pending()
        self._pending[rid] = p
        return p

    def _send(self, msg) -> None:
        sock = getattr(self._local, "push", None)
        if sock is None:  # one PUSH socket per caller thread: sockets are never shared across threads
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(self._inbox)
            self._local.push = sock
            with self._socks_lock:
                self._socks.append(sock)
        sock.send(self._codec.encode(msg))

    def _io_loop(self, curve: dict | None) -> None:
        pull = self._ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, 0)
        pull.bind(self._inbox)
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, 0)
        dealer.setsockopt(zmq.RCVHWM, 0)
        # A fixed identity lets replies find us again after a reconnect.
        dealer.setsockopt(zmq.ROUTING_ID, os.urandom(8))
        security.apply_client(dealer, curve)
        dealer.connect(self.address)
        self._bound.set()
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        try:
            while not self._closed.is_set():
                for sock, _ in poller.poll(100):
                    if sock is pull:
                        self._forward(pull, dealer)
                    else:
                        self._receive(dealer)
        finally:
            pull.close(linger=0)
            dealer.close(linger=0)

    @staticmethod
    def _forward(pull, dealer) -> None:
        for _ in range(1024):
            try:
                dealer.send(pull.recv(zmq.NOBLOCK))
            except zmq.Again:
                return

    def _receive(self, dealer) -> None:
        for _ in range(1024):
            try:
                raw = dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = self._codec.decode(raw)
            except ProtocolError:  # one bad reply must not kill the thread every caller waits on
                continue
            self._deliver(msg)

    def _deliver(self, msg) -> None:
        pending = self._pending.get(msg.id) if msg.id is not None else None
        if pending is None:
            return  # a reply to a request we gave up on, or an error for an unreadable message
        if isinstance(msg, Chunk):
            pending.events.put(msg.data)
            return
        del self._pending[msg.id]
        pending.outcome = msg
        pending.done.set()
        pending.events.put(_DONE)


def wait_ready(address: str, pools: list | None = None, timeout: float = 60.0,
               curve: dict | None = None) -> dict:
    """Poll `health` until every pool (or those named) reports ready. Returns the last health."""
    deadline = time.monotonic() + timeout
    with Client(address, curve=curve, timeout=2.0) as c:
        while True:
            try:
                h = c.health()
                states = {k: v["status"] for k, v in h["pools"].items() if not pools or k in pools}
                if states and all(s == "ready" for s in states.values()):
                    return h
            except TimeoutError:
                h = None
            if time.monotonic() > deadline:
                raise TimeoutError(f"pools not ready within {timeout} s: {h}")
            time.sleep(0.05)
