"""Handlers for tests and benchmarks. None of them imports torch."""
from __future__ import annotations

import os
import socket
import time

from protocol.errors import CANCELLED, INVALID_INPUT, JobError
from worker.handler import Handler, Job


def _param(job: Job, key: str, default, kind=(int, float)):
    """Read an optional numeric field from a dict input, rejecting wrong types with invalid_input."""
    value = job.input.get(key, default) if isinstance(job.input, dict) else default
    if not isinstance(value, kind) or isinstance(value, bool):
        raise JobError(INVALID_INPUT, f"'{key}' must be a number")
    return value


class Echo(Handler):
    """Returns its input unchanged. With stream=True, also streams the input once as a chunk."""

    capacity = 64  # deep credit so the worker always has the next job queued (pipelining)
    max_batch = 64

    def run(self, job: Job):
        if job.stream:
            return self._stream(job.input)
        return job.input

    @staticmethod
    def _stream(value):
        yield value
        return value


class Sleep(Handler):
    """Holds for `ms` milliseconds (input {"ms": N}), checking for cancel every 10 ms."""

    capacity = 2

    def run(self, job: Job):
        ms = _param(job, "ms", 100)
        deadline = time.monotonic() + ms / 1000
        while not job.cancelled:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.01))
        if job.cancelled:
            raise JobError(CANCELLED, "job cancelled while sleeping")
        return {"slept_ms": ms, "pid": os.getpid(), "input": job.input}


class Fail(Handler):
    """Raises, to test handler_error replies."""

    def run(self, job: Job):
        raise RuntimeError(f"fail handler raised on purpose: {job.input!r}")


class Crash(Handler):
    """Kills its own process with os._exit, to test crash supervision. {"code": N} sets the status."""

    def run(self, job: Job):
        code = job.input.get("code", 13) if isinstance(job.input, dict) else 13
        os._exit(int(code))


class Env(Handler):
    """Reports the device binding this worker process was started with."""

    capacity = 4

    def run(self, job: Job):
        try:
            affinity = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            affinity = None
        return {
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "pid": os.getpid(),
            "affinity": affinity,
            "wid": self.ctx.wid,
            "rank": self.ctx.rank,
            "device": self.ctx.device,
            "devices": self.ctx.devices,
            "host": socket.gethostname(),
            "node": self.ctx.node,  # the Ray node id, or None when launched locally
        }
