"""Handlers that only the supervision tests load, by path: ``--handler tests.handlers_for_tests:Name``.

Workers import them because the coordinator puts the repository root on their PYTHONPATH.
"""
from __future__ import annotations

import os
import time

from worker.handler import Handler, Job


class CrashOnDemand(Handler):
    """Echoes its input; input {"crash": true} ends the process with exit code 13 (a poison job)."""

    capacity = 2

    def run(self, job: Job):
        if isinstance(job.input, dict) and job.input.get("crash"):
            os._exit(13)
        return {"echo": job.input, "pid": os.getpid()}


class _StreamThenHang(Handler):
    """Streams one chunk (naming its pid), then on the first attempt only hangs until killed.

    The first attempt is told apart by a marker file named in the input (created atomically), so a
    replayed attempt finishes with a result instead of hanging again.
    """

    def run(self, job: Job):
        return self._stream(job)

    @staticmethod
    def _stream(job: Job):
        yield {"pid": os.getpid()}
        try:
            os.close(os.open(job.input["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            first_attempt = True
        except FileExistsError:
            first_attempt = False
        while first_attempt and not job.cancelled:
            time.sleep(0.01)  # the test SIGKILLs this process here
        return {"done": True, "pid": os.getpid()}


class StreamNotReplaySafe(_StreamThenHang):
    replay_safe = False


class StreamReplaySafe(_StreamThenHang):
    replay_safe = True


class FailLoad(Handler):
    """`load()` raises, as a missing model file would: the worker never becomes ready."""

    def load(self) -> None:
        raise RuntimeError("weights file /nonexistent/model.bin is missing")


class ExitOnLoad(Handler):
    """`load()` ends the process with exit code 7 (a native crash during load, with no report)."""

    def load(self) -> None:
        os._exit(7)


class FailLoadOnSlot0(Handler):
    """Loads everywhere but on slot 0 of its pool, whose load raises; the rest echo."""

    def load(self) -> None:
        if self.ctx.wid == f"{self.ctx.pool}/0":
            raise RuntimeError("slot 0 has a broken device")

    def run(self, job: Job):
        return {"echo": job.input, "wid": self.ctx.wid}


class HoldUntilFile(Handler):
    """Holds each job until the file named in its input ({"until": path}) exists, and ignores cancel,
    as a handler in a step it cannot interrupt: a cancelled job keeps its credit until it answers."""

    capacity = 1

    def run(self, job: Job):
        while not os.path.exists(job.input["until"]):
            time.sleep(0.01)
        return {"done": True}


class DeviceRoundTrip(Handler):
    """The handler transfer API end to end (worker/transfers.py): input {"x": ndarray, "delay_cycles": int
    (optional)} -> {"y": 2 * x + 1 (float32 ndarray), "device": where y was computed}.

    On a CUDA worker `delay_cycles` queues a sleep kernel on the compute stream before y is written, so a
    device-to-host copy that did not wait for the compute stream would read y's memory before it holds y
    (scripts/gpu_check_streams.py, check "worker"). On a CPU worker the API is a plain conversion.
    """

    capacity = 4

    def load(self) -> None:
        import torch

        self.torch = torch

    def run(self, job: Job):
        torch = self.torch
        x = self.ctx.to_device(job.input["x"])
        if x.device.type == "cuda" and job.input.get("delay_cycles"):
            torch.cuda._sleep(int(job.input["delay_cycles"]))
        y = x.float() * 2 + 1
        return {"y": self.ctx.to_host(y), "device": str(y.device)}
