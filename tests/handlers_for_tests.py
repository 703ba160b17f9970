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


class InitFails(Handler):
    """The constructor raises (a bug in a handler's __init__): a permanent failure, never restarted."""

    def __init__(self, ctx):
        super().__init__(ctx)
        raise TypeError("InitFails.__init__ got an unexpected keyword 'shards'")


class NeedsModelDir(Handler):
    """Checks config "model" as the model handlers do (worker.models.check_model_location), then echoes.
    A missing directory is a permanent failure; creating it and reloading the pool brings it back."""

    def load(self) -> None:
        from worker.models import check_model_location

        check_model_location(self.config.get("model"))

    def run(self, job: Job):
        return {"echo": job.input, "pid": os.getpid()}


class CrashOnLoadWhileMarker(Handler):
    """`load()` ends the process (exit code 9, a native crash) while the file config["marker"] exists:
    a transient crash loop whose cause the test removes."""

    def load(self) -> None:
        if os.path.exists(self.config["marker"]):
            os._exit(9)

    def run(self, job: Job):
        return {"echo": job.input, "pid": os.getpid()}


class GarbageOnce(Handler):
    """Sends the coordinator a frame it must refuse, once. Input {"garbage": true, "marker": PATH, "go":
    GO}: on the first attempt (PATH is created atomically, holding this pid) it waits for the file GO, then
    its result is a msgpack ext type, which the worker's codec packs as is and the coordinator's decoder
    rejects; later attempts echo. Input
    {"hang_while": PATH}: waits while PATH holds this process's pid (so a job queued behind the garbage
    one is still in flight when the worker is ended, and finishes at once on the next incarnation)."""

    capacity = 2

    def run(self, job: Job):
        import msgpack

        inp = job.input
        if inp.get("garbage"):
            if _first_attempt(inp["marker"]):
                while not os.path.exists(inp["go"]):  # the test first sees its other job in flight here
                    time.sleep(0.01)
                return msgpack.ExtType(42, b"\xff not a message")
            return {"echo": inp, "first_attempt": False, "pid": os.getpid()}
        while inp.get("hang_while") and _holds_pid(inp["hang_while"]) and not job.cancelled:
            time.sleep(0.01)
        return {"echo": inp, "pid": os.getpid()}


def _first_attempt(marker: str) -> bool:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def _holds_pid(path: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == str(os.getpid())
    except FileNotFoundError:
        return False


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
    (tests/gpu/test_streams_gpu.py). On a CPU worker the API is a plain conversion.
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
