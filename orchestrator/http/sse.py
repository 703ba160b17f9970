"""Server-sent events as a pure ASGI response that notices a client's disconnect at once.

Starlette's StreamingResponse, under uvicorn (ASGI spec 2.3), learns of a disconnect only between
chunks, and a send to a gone client is silently dropped; so a stream whose job is between tokens would
run on. Here a second task waits on `receive()` for `http.disconnect` and calls `on_disconnect`
(cancel the job) the moment it comes; the event iterator then ends with the job.
"""
from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Callable


def sse_event(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class SSEResponse:
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_disconnect: Callable[[], None]):
        self.events, self.on_disconnect = events, on_disconnect
        self.gone = False

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        watcher = asyncio.get_running_loop().create_task(self._watch(receive))
        try:
            async for body in self.events:
                if not self.gone:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            if not self.gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke under a send
            self._disconnected()
        finally:
            watcher.cancel()

    async def _watch(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._disconnected()
                return

    def _disconnected(self) -> None:
        if not self.gone:
            self.gone = True
            self.on_disconnect()
