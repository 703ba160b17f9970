"""asyncio client: the same operations as `Client`, on one zmq.asyncio DEALER socket."""
from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from protocol import Codec, ProtocolError
from protocol.codec import INTERNAL_LIMITS
from protocol.messages import (
    Cancel, Chunk, Error, Health, Ping, Reload, Result, Scale, Status, Stop, Submit,
)
from . import security
from .client import RequestError

_DONE = object()


class AsyncJob:
    """A submitted job: `await job.result()`, `async for chunk in job`, `await job.cancel()`."""

    def __init__(self, client: "AsyncClient", rid: int, future: asyncio.Future, chunks: asyncio.Queue):
        self.client, self.id = client, rid
        self._future, self._chunks = future, chunks

    async def result(self, timeout: float | None = None) -> Any:
        outcome = await asyncio.wait_for(asyncio.shield(self._future), timeout)
        return _unwrap(outcome)

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            item = await self._chunks.get()
            if item is _DONE:
                _unwrap(self._future.result())
                return
            yield item

    async def cancel(self) -> dict:
        return await self.client._request(lambda rid: Cancel(rid, self.id))


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
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.ROUTING_ID, os.urandom(8))
        security.apply_client(self._sock, curve)
        self._sock.connect(address)
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, asyncio.Queue | None]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def submit(self, pool: str, input: Any = None, *, stream: bool = False,
                     timeout: float | None = None, retries: int | None = None) -> AsyncJob:
        rid = next(self._ids)
        future, chunks = asyncio.get_running_loop().create_future(), asyncio.Queue()
        self._pending[rid] = (future, chunks)
        await self._sock.send(self._codec.encode(Submit(rid, pool, input, stream, timeout, retries)))
        return AsyncJob(self, rid, future, chunks)

    async def run(self, pool: str, input: Any = None, *, timeout: float | None = None) -> Any:
        job = await self.submit(pool, input, timeout=timeout)
        return await job.result()

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

    async def close(self) -> None:
        self._reader.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass
        self._sock.close(linger=0)
        self._ctx.term()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _request(self, make) -> Any:
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = (future, None)
        await self._sock.send(self._codec.encode(make(rid)))
        try:
            return _unwrap(await asyncio.wait_for(future, self.timeout))
        except asyncio.TimeoutError:
            self._pending.pop(rid, None)
            raise TimeoutError(f"no reply from {self.address} within {self.timeout} s") from None

    async def _read(self) -> None:
        while True:
            try:
                msg = self._codec.decode(await self._sock.recv())
            except ProtocolError:  # one bad reply must not end the task every caller waits on
                continue
            entry = self._pending.get(msg.id) if msg.id is not None else None
            if entry is None:
                continue
            future, chunks = entry
            if isinstance(msg, Chunk):
                if chunks is not None:
                    chunks.put_nowait(msg.data)
                continue
            del self._pending[msg.id]
            if not future.done():
                future.set_result(msg)
            if chunks is not None:
                chunks.put_nowait(_DONE)
