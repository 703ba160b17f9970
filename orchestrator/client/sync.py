"""Synchronous client: thread-safe, many jobs in flight, streaming, cancel.

No background thread: callers' own threads do the socket I/O, so a job's round trip crosses no thread
handoff (each one cost tens of microseconds in scripts/bench_dispatch.py). ZMQ sockets are not
thread-safe, so one lock guards the DEALER socket, leader/followers style:
- a sender queues its encoded request in an outbox; whoever holds the socket sends the outbox before
  letting go (a sender that finds it free takes it just for that, and a socketpair wakes a holder that
  waits in poll);
- a thread that waits for a reply takes the socket if it is free and receives for everyone, handing
  each reply to its request's slot; a thread that finds it taken waits until its reply has been handed
  over or the socket is free again.
Replies that arrive while no thread is inside the client wait in the socket until one calls in.
"""
from __future__ import annotations

import collections
import itertools
import os
import queue
import socket
import threading
import time
from typing import Any, Callable, Iterator

import zmq

from protocol import Codec, JobError, ProtocolError
from protocol.codec import INTERNAL_LIMITS
from protocol.messages import (
    Cancel, Chunk, Error, Health, Ping, Reload, Result, Scale, Status, Stop, Submit,
)
from orchestrator.client import keys


class RequestError(JobError):
    """An `error` reply. `.code` is the protocol's stable error code (see protocol/README.md)."""


_DONE = object()
SLICE_S = 0.1  # longest a thread blocks (holding the socket or not) before it rechecks close and deadlines


class _Flag:
    """A set-once flag. Waiting goes through Client._wait, so a threading.Event (a Condition and a
    lock per request) would only cost time on the job path."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = False

    def is_set(self) -> bool:
        return self.value

    def set(self) -> None:
        self.value = True


class _Pending:
    """Reply slot for one request id. Chunks and the terminal reply arrive on `events`."""

    __slots__ = ("events", "done", "outcome")

    def __init__(self):
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.done = _Flag()
        self.outcome: Any = None  # Result | Ok | Error once done


class JobHandle:
    """A submitted job. `result()` waits for its output; iterating yields its stream chunks."""

    def __init__(self, client: "Client", rid: int, pool: str, pending: _Pending, timeout: float | None,
                 wait: Callable[[Callable[[], bool], float | None], bool], pump: Callable[[], None]):
        self.client, self.id, self.pool = client, rid, pool
        self._p = pending
        self._timeout = timeout
        # The client's socket I/O (leader/followers under its lock), handed in by the client itself.
        self._wait, self._pump = wait, pump

    def done(self) -> bool:
        if not self._p.done.is_set():
            self._pump()
        return self._p.done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        """The job's output. Raises RequestError (with .code) on an error reply, TimeoutError if no
        reply within `timeout` seconds (default: the submit timeout plus a grace period, else forever)."""
        wait = timeout if timeout is not None else (self._timeout + 5 if self._timeout else None)
        if not self._wait(self._p.done.is_set, wait):
            raise TimeoutError(f"job {self.id} on pool {self.pool}: no reply within {wait} s")
        return _unwrap(self._p.outcome)

    def __iter__(self) -> Iterator[Any]:
        """Stream chunks (data) as they arrive; ends after the final reply, raising on an error."""
        events = self._p.events
        while True:
            self._wait(lambda: not events.empty(), None)
            item = events.get_nowait()
            if item is _DONE:
                _unwrap(self._p.outcome)
                return
            yield item

    @property
    def meta(self) -> dict | None:
        """The result's metadata once the job has succeeded (`worker`, `attempts`, `run_ms`), else None."""
        outcome = self._p.outcome
        return outcome.meta if isinstance(outcome, Result) else None

    def cancel(self, timeout: float = 10.0) -> dict:
        """Ask the coordinator to cancel this job; the job then ends with code `cancelled`."""
        return self.client.cancel(self.id, timeout)


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
        self._codec = Codec(INTERNAL_LIMITS, arrays=True)  # replies come from our server: no client caps
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._closed = threading.Event()
        curve = keys.client_keys(curve)  # raises ValueError before any socket exists
        self._ctx = zmq.Context()
        self._dealer = self._connect(curve)
        self._io_lock = threading.Lock()  # held by the one thread using the socket
        self._outbox: collections.deque = collections.deque()  # encoded requests, not yet sent
        self._cv = threading.Condition()  # followers wait here for their reply or a free socket
        self._followers = 0
        self._wake_r, self._wake_w = socket.socketpair()  # interrupts a holder's poll
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller = zmq.Poller()
        self._poller.register(self._dealer, zmq.POLLIN)
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)

    # ------------------------------------------------------------------ public API

    def submit(self, pool: str, input: Any = None, *, stream: bool = False,
               timeout: float | None = None, retries: int | None = None) -> JobHandle:
        rid = next(self._ids)
        pending = self._register(rid)
        self._send(Submit(rid, pool, input, stream, timeout, retries))
        return JobHandle(self, rid, pool, pending, timeout, self._wait, self._pump)

    def run(self, pool: str, input: Any = None, *, timeout: float | None = None) -> Any:
        """submit(...).result(): the output, or RequestError (code `timeout` once the job's own `timeout`
        passes: the wait allows the reply a grace period, as result() does)."""
        return self.submit(pool, input, timeout=timeout).result()

    def cancel(self, job_id: int, timeout: float = 10.0) -> dict:
        """Cancel one of this client's unfinished jobs by its id; the job then ends with code `cancelled`."""
        return self._request(lambda rid: Cancel(rid, job_id), timeout)

    def status(self) -> dict:
        return self._request(Status)

    def health(self) -> dict:
        return self._request(Health)

    def ping(self, timeout: float | None = None) -> dict:
        return self._request(Ping, timeout)

    def scale(self, pool: str, replicas: int) -> dict:
        return self._request(lambda rid: Scale(rid, pool, replicas))

    def reload(self, pool: str) -> dict:
        """Restart every slot of `pool` with a fresh failure budget (retries a permanent failure)."""
        return self._request(lambda rid: Reload(rid, pool))

    def stop(self, reason: str = "client requested stop", drain: bool = True) -> dict:
        return self._request(lambda rid: Stop(rid, reason, drain))

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._poke()
        with self._io_lock:  # the holder, if any, lets go within SLICE_S
            self._dealer.close(linger=0)
        with self._cv:
            self._cv.notify_all()
        self._wake_r.close()
        self._wake_w.close()
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
        if not self._wait(pending.done.is_set, wait):
            self._pending.pop(rid, None)
            raise TimeoutError(f"no reply from {self.address} within {wait} s")
        return _unwrap(pending.outcome)

    def _register(self, rid: int) -> _Pending:
        if self._closed.is_set():
            raise RuntimeError("client is closed")
        p = _Pending()
        self._pending[rid] = p
        return p

    def _connect(self, curve: dict | None) -> zmq.Socket:
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, 0)
        dealer.setsockopt(zmq.RCVHWM, 0)
        # A fixed identity lets replies find us again after a reconnect.
        dealer.setsockopt(zmq.ROUTING_ID, os.urandom(8))
        keys.apply_client(dealer, curve)
        dealer.connect(self.address)
        return dealer

    def _send(self, msg) -> None:
        self._outbox.append(self._codec.encode(msg))
        if self._io_lock.acquire(blocking=False):
            self._release()  # sends the outbox, ours included
        else:
            self._poke()  # a holder waiting in poll sends it now; any other sends it as it lets go

    def _release(self) -> None:
        """Send the outbox, then let the socket go. A request queued after the last look is sent by its
        sender (who finds the socket free) or by the next holder."""
        while True:
            outbox, send = self._outbox, self._dealer.send
            if self._closed.is_set():
                outbox.clear()  # the socket is closed or about to be: nothing more goes out
            while outbox:
                send(outbox.popleft())
            self._io_lock.release()
            if self._followers:  # one of them takes over receiving
                with self._cv:
                    self._cv.notify_all()
            if not self._outbox or not self._io_lock.acquire(blocking=False):
                return

    def _poke(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already poked (or closed): one wake-up is enough

    def _wait(self, ready, timeout: float | None) -> bool:
        """Block until ready() (True) or `timeout` seconds pass (False), receiving for every waiter
        whenever the socket is free."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if self._closed.is_set():
                raise RuntimeError("client is closed")
            if self._io_lock.acquire(blocking=False):
                try:
                    if not self._closed.is_set():
                        self._lead(ready, deadline)
                finally:
                    self._release()
                continue
            with self._cv:
                self._followers += 1
                try:
                    if not ready() and self._io_lock.locked():
                        self._cv.wait(SLICE_S if left is None else min(left, SLICE_S))
                finally:
                    self._followers -= 1
        return True

    def _lead(self, ready, deadline: float | None) -> None:
        """Hold the socket: send the outbox and deliver replies until ready(), the deadline or a slice."""
        outbox, send, wake = self._outbox, self._dealer.send, self._wake_r.fileno()
        end = time.monotonic() + SLICE_S
        if deadline is not None:
            end = min(end, deadline)
        while True:
            while outbox:
                send(outbox.popleft())
            events = self._poller.poll(max(0, int((end - time.monotonic()) * 1000)))
            for target, _ in events:
                if target == wake:
                    self._drain_wake()
                elif self._receive(self._dealer) and self._followers:
                    with self._cv:
                        self._cv.notify_all()
            if ready() or self._closed.is_set() or time.monotonic() >= end:
                return

    def _pump(self) -> None:
        """Deliver the replies already received, without waiting (for done())."""
        if self._io_lock.acquire(blocking=False):
            try:
                if not self._closed.is_set():
                    self._receive(self._dealer)
            finally:
                self._release()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _receive(self, dealer) -> int:
        n = 0
        for _ in range(1024):
            try:
                raw = dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = self._codec.decode(raw)
            except ProtocolError:  # one bad reply must not stop the delivery of the others
                continue
            self._deliver(msg)
            n += 1
        return n

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
