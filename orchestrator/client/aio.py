"""asyncio client: the same operations as `Client`, on one DEALER socket driven by the event loop.

Hot path, each point measured with scripts/bench_dispatch.py (docs/benchmarks.md, "AsyncClient against Client"):
- a plain (sync) zmq socket whose FD is watched with `loop.add_reader`, not zmq.asyncio: zmq.asyncio
  wraps every send and recv in a Future and a loop round, and its reader task woke once per reply;
- sends are queued and go out together at the end of the loop turn (one `call_soon`), with NOBLOCK
  (SNDHWM is 0, so they never block): back-to-back sends wake libzmq's I/O thread once, not each;
- each wake-up drains every reply already queued (up to RECV_BATCH) and resolves their futures;
- a job's chunk queue exists only for streamed jobs, and `result()` on a finished job returns at once.
The ZMQ FD is edge-triggered and a send can consume its edge, so after sends the socket's EVENTS are
checked and a drain is scheduled when replies are already waiting.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import os
from typing import Any, AsyncIterator

import zmq

from protocol import Codec, ProtocolError
from protocol.codec import INTERNAL_LIMITS
from protocol.messages import (
    Cancel, Chunk, Error, Health, Ping, Reload, Result, Scale, Status, Stop, Submit,
)
from orchestrator.client import keys
from orchestrator.client.sync import RequestError

_DONE = object()
RECV_BATCH = 1024  # replies handled per wake-up before yielding to other tasks


class AsyncJob:
    """A submitted job: `await job.result()`, `async for chunk in job`, `await job.cancel()`."""

    __slots__ = ("client", "id", "_future", "_chunks")

    def __init__(self, client: "AsyncClient", rid: int, future: asyncio.Future, chunks):
        self.client, self.id = client, rid
        self._future, self._chunks = future, chunks

    async def result(self, timeout: float | None = None) -> Any:
        """The job's output; RequestError on an error reply; TimeoutError after `timeout` seconds (the
        job itself goes on, and a later call may still collect it)."""
        future = self._future
        if not future.done():
            await _wait(future, timeout)
        return _unwrap(future.result())

    @property
    def meta(self) -> dict | None:
        """The result's metadata once the job has succeeded (`worker`, `attempts`, `run_ms`), else None."""
        f = self._future
        return f.result().meta if f.done() and isinstance(f.result(), Result) else None

    async def __aiter__(self) -> AsyncIterator[Any]:
        """Stream chunks (submit with stream=True); ends after the final reply, raising on an error. A job
        submitted without stream yields no chunks."""
        if self._chunks is None:
            await self.result()
            return
        while True:
            item = await self._chunks.get()
            if item is _DONE:
                _unwrap(self._future.result())
                return
            yield item

    async def cancel(self) -> dict:
        return await self.client.cancel(self.id)


async def _wait(future: asyncio.Future, timeout: float | None) -> None:
    """Wait for `future` without cancelling it on timeout (cheaper than wait_for(shield(...)))."""
    if timeout is None:
        await asyncio.shield(future)
        return
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_=None):
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(wake)
    timer = loop.call_later(timeout, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        future.remove_done_callback(wake)
    if not future.done():
        raise TimeoutError(f"no reply within {timeout} s")


def _unwrap(outcome) -> Any:
    if isinstance(outcome, Error):
        raise RequestError(outcome.code, outcome.message, outcome.details)
    if isinstance(outcome, Result):
        return outcome.output
    return outcome.data


class AsyncClient:
    """Create inside a running event loop; `await client.close()` (or `async with`) when done."""

    def __init__(self, address: str, *, curve: dict | None = None, timeout: float = 30.0):
        self.address, self.timeout = address, timeout
        self._codec = Codec(INTERNAL_LIMITS, arrays=True)  # replies come from our server: no client caps
        self._loop = asyncio.get_running_loop()
        curve = keys.client_keys(curve)  # raises ValueError before any socket exists
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.ROUTING_ID, os.urandom(8))  # replies find us again after a reconnect
        keys.apply_client(self._sock, curve)
        self._sock.connect(address)
        self._ids = itertools.count(1)
        # rid -> [future, chunk queue or None]
        self._pending: dict[int, tuple[asyncio.Future, asyncio.Queue | None]] = {}
        self._drain_scheduled = False
        self._outbox: list = []  # encoded requests, sent by _flush at the end of this loop turn
        self._closed = False
        self._fd = self._sock.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._drain)

    async def submit(self, pool: str, input: Any = None, *, stream: bool = False,
                     timeout: float | None = None, retries: int | None = None) -> AsyncJob:
        rid = next(self._ids)
        future = self._loop.create_future()
        chunks = asyncio.Queue() if stream else None
        self._pending[rid] = (future, chunks)
        self._send(Submit(rid, pool, input, stream, timeout, retries))
        return AsyncJob(self, rid, future, chunks)

    async def run(self, pool: str, input: Any = None, *, timeout: float | None = None) -> Any:
        job = await self.submit(pool, input, timeout=timeout)
        return await job.result()

    async def cancel(self, job_id: int) -> dict:
        """Cancel one of this client's unfinished jobs by its id; the job then ends with code `cancelled`."""
        return await self._request(lambda rid: Cancel(rid, job_id))

    async def status(self) -> dict:
        return await self._request(Status)

    async def health(self) -> dict:
        return await self._request(Health)

    async def ping(self) -> dict:
        return await self._request(Ping)

    async def scale(self, pool: str, replicas: int) -> dict:
        return await self._request(lambda rid: Scale(rid, pool, replicas))

    async def reload(self, pool: str) -> dict:
        """Restart every slot of `pool` with a fresh failure budget (retries a permanent failure)."""
        return await self._request(lambda rid: Reload(rid, pool))

    async def stop(self, reason: str = "client requested stop", drain: bool = True) -> dict:
        return await self._request(lambda rid: Stop(rid, reason, drain))

    def cancel_nowait(self, job: AsyncJob) -> None:
        """Send a cancel for `job` without waiting for its `ok` (safe to call from a cancelled task or a
        `finally`): the job then ends with `cancelled`."""
        if not self._closed and job.id in self._pending:
            rid = next(self._ids)
            self._send(Cancel(rid, job.id))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._sock.close(linger=0)
        self._ctx.term()
        for future, chunks in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError("client is closed"))
                future.exception()  # marks it retrieved: no "never retrieved" warning if nobody awaits it
            if chunks is not None:
                chunks.put_nowait(_DONE)
        self._pending.clear()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------------ internals

    def _send(self, msg) -> None:
        if self._closed:
            raise RuntimeError("client is closed")
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.append(self._codec.encode(msg))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if self._closed:
            return
        send, noblock = self._sock.send, zmq.NOBLOCK
        for frame in outbox:
            send(frame, noblock)
        # A send can swallow the FD's edge for replies already queued: look, and drain now if so.
        if not self._drain_scheduled and self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._drain()

    async def _request(self, make) -> Any:
        rid = next(self._ids)
        future = self._loop.create_future()
        self._pending[rid] = (future, None)
        self._send(make(rid))
        try:
            await _wait(future, self.timeout)
        except TimeoutError:
            self._pending.pop(rid, None)
            raise TimeoutError(f"no reply from {self.address} within {self.timeout} s") from None
        return _unwrap(future.result())

    def _drain(self) -> None:
        """Deliver every queued reply (reader callback and scheduled drains)."""
        self._drain_scheduled = False
        if self._closed:
            return
        sock, decode, pending = self._sock, self._codec.decode, self._pending
        for _ in range(RECV_BATCH):
            try:
                raw = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(raw)
            except ProtocolError:  # one bad reply must not stop the delivery of the others
                continue
            entry = pending.get(msg.id) if msg.id is not None else None
            if entry is None:
                continue  # a reply to a request we gave up on
            future, chunks = entry
            if type(msg) is Chunk:
                if chunks is not None:
                    chunks.put_nowait(msg.data)
                continue
            del pending[msg.id]
            if not future.done():
                future.set_result(msg)
            if chunks is not None:
                chunks.put_nowait(_DONE)
        # Batch full: more may be waiting, and the edge-triggered FD will not say so again.
        self._drain_scheduled = True
        self._loop.call_soon(self._drain)
