"""The worker's compute loop: receive jobs on the data socket, run the handler, send outcomes.

It runs on the main thread and owns the data socket, so a job goes socket -> handler -> socket without
crossing threads. The control thread (worker/control.py) pokes it through an eventfd for cancel and stop.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
import types
from collections import deque

import psutil
import zmq

from protocol import Codec, JobError, ProtocolError
from protocol.codec import INTERNAL_LIMITS
from protocol.errors import CANCELLED, HANDLER_ERROR, WORKER_CRASHED
from protocol.messages import WChunk, WError, WReady, WResult, WRun
from protocol.workerspec import DATA, WorkerSpec
from worker.control import ControlState, connect
from worker.guard import GroupError
from worker.handler import EngineHandler, Handler, Job, Progress

log = logging.getLogger("worker.runtime")

IDLE_POLL_MS = 200  # how often an idle loop rechecks the stop flag even without a poke


def short_traceback(exc: BaseException, limit: int = 6) -> str:
    """The last frames of a traceback: enough to find the bug, small enough for one reply."""
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-limit)
    return "".join(lines)[-4000:]


class HandlerErrors:
    """Turns a handler's exception into the job's error reply. A handler's own bug (anything but a
    JobError) is also logged with its full traceback on stderr, which the coordinator captures and
    prefixes with this worker's id: the traceback lands in the server log, not only in the client's
    short reply. One traceback per exception object (a failed batch is one bug, not one per job) and
    at most `per_second`, so a handler failing every job cannot flood the log."""

    def __init__(self, per_second: int = 10):
        self.per_second = per_second
        self.window, self.count, self.last = 0, 0, None

    def reply(self, jid: int, exc: BaseException) -> WError:
        if not isinstance(exc, JobError) and exc is not self.last:
            self.last = exc
            self._log(jid, exc)
        return WError(jid, *outcome_error(exc))

    def _log(self, jid: int, exc: BaseException) -> None:
        now = int(time.monotonic())
        if now != self.window:
            self.window, self.count = now, 0
        self.count += 1
        if self.count <= self.per_second:
            log.error("job %d: handler raised %s", jid, type(exc).__name__, exc_info=exc)
        elif self.count == self.per_second + 1:
            log.error("more handler errors this second: their tracebacks are not logged")


def outcome_error(exc: BaseException) -> tuple[str, str]:
    """Map a handler exception to (code, message) for an error reply."""
    if isinstance(exc, JobError):
        return exc.code, exc.message
    return HANDLER_ERROR, f"{type(exc).__name__}: {exc}\n{short_traceback(exc)}"


class Wakeup:
    """An eventfd the compute loop polls next to its socket; any thread may `set()` it."""

    def __init__(self):
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def set(self) -> None:
        os.eventfd_write(self.fd, 1)

    def clear(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass


class ComputeLoop:
    """Runs one handler. Construct cheaply; `start()` connects, loads and reports READY; `run()` serves
    until the control thread sets its stop event."""

    def __init__(self, zctx: zmq.Context, spec: WorkerSpec, handler: Handler, state: ControlState,
                 wakeup: Wakeup):
        self.zctx, self.spec, self.handler = zctx, spec, handler
        self.state, self.wakeup = state, wakeup
        self.ctx = handler.ctx
        self.progress: Progress = self.ctx.progress
        self.cancelled: set = state.cancelled
        self.codec = Codec(INTERNAL_LIMITS)  # worker traffic; each job's input is decoded on its own
        # A job's input arrives as the client's msgpack bytes, unread by the coordinator: decoded here, when
        # the job is taken to run, under the client limits (so at most a batch of inputs is ever decoded).
        self.inputs = Codec(spec.input_limits(), arrays=True)
        self.pending: deque[WRun] = deque()
        self.sock: zmq.Socket | None = None
        self.engine = isinstance(handler, EngineHandler)
        self.active: set[int] = set()  # engine jobs added and not yet ended
        self.errors = HandlerErrors()
        self.group = self.ctx.group  # TP: this rank's worker.tp.GroupRuntime (rank 0 leads), else None

    def start(self) -> None:
        self.sock = self._connect()  # before load, so that a load failure can be reported on it
        self.progress.begin()  # loading counts as a step: a hung load is caught by the watchdog
        # Interpreter start and imports so far, from the coordinator's spawn stamp (same host clock).
        spawned = self.spec.spawned_at
        boot_s = time.monotonic() - spawned if spawned else time.time() - psutil.Process().create_time()
        t0 = time.perf_counter()
        if self.group is not None:
            self.group.start(self.send)  # rendezvous first: a TP model loads into its group
        self.handler.load()
        self.ctx.transfers.start()  # after load: the pool's CUDA objects need the torch the handler loaded
        self.progress.end()
        spec, h = self.spec, self.handler
        capacity = int(spec.capacity or h.capacity)
        # Where cold start goes, per worker: visible in status under info.
        info = {**h.info(), "boot_s": round(boot_s, 3), "load_s": round(time.perf_counter() - t0, 3)}
        self.send(WReady(spec.wid, spec.incarnation, capacity, spec.devices, h.replay_safe, info))

    def _connect(self) -> zmq.Socket:
        sock = self.zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 2000)  # let final results flush on a graceful stop
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop a result because a queue filled
        sock.setsockopt(zmq.RCVHWM, 0)
        return connect(sock, self.spec, DATA)

    def send(self, msg) -> None:
        self.sock.send(self.codec.encode(msg))

    def send_output(self, msg) -> None:
        """Send a result or chunk. An output msgpack cannot carry (nested too deep, a type it does not
        know) fails its job with handler_error, never the worker."""
        try:
            raw = self.codec.encode(msg)
        except (TypeError, ValueError, OverflowError) as e:
            raise JobError(HANDLER_ERROR, f"the output cannot be sent: {type(e).__name__}: {e}") from None
        self.sock.send(raw)

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.wakeup.fd, zmq.POLLIN)
        while not self.state.stop_event.is_set():
            busy = bool(self.pending) and not self.engine
            events = poller.poll(0 if busy else IDLE_POLL_MS)
            if any(target == self.wakeup.fd for target, _ in events):
                self.wakeup.clear()  # only when set: reading an empty eventfd costs a syscall and a raise
            self._receive()
            if self.engine:
                self._engine_turn()
            else:
                self._sync_turn()
            if self.group is not None:
                self.group.raise_if_failed()  # a failure seen on an engine thread ends the worker here
        self._finish_on_stop()
        if self.group is not None:
            self.group.broadcast_stop(self.state.stop_reason)

    def _receive(self) -> None:
        while True:
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = self.codec.decode(raw)
            if isinstance(msg, WRun):
                self.pending.append(msg)

    def _take(self) -> Job | None:
        """The next pending job with its input decoded, or None when that job already ended here
        (cancelled, or an input that does not decode: that job alone fails, with the codec's code)."""
        run = self.pending.popleft()
        if run.jid in self.cancelled:
            self._end(run.jid, WError(run.jid, CANCELLED, "cancelled before it started"))
            return None
        try:
            value = None if run.input is None else self.inputs.unpack_value(run.input)
        except ProtocolError as e:
            self._end(run.jid, WError(run.jid, e.code, f"input: {e.message}"))
            return None
        return Job(run.jid, value, run.stream, self.cancelled)

    def _finish_on_stop(self) -> None:
        """A graceful stop arrives only once the coordinator has nothing in flight here; anything
        still pending is failed explicitly rather than dropped silently."""
        for run in self.pending:
            self.send(WError(run.jid, WORKER_CRASHED, f"worker stopping: {self.state.stop_reason}"))
        self.pending.clear()

    # ------------------------------------------------------------------ synchronous handlers

    def _sync_turn(self) -> None:
        batch = []
        while self.pending and len(batch) < self.handler.max_batch:
            job = self._take()
            if job is not None:
                batch.append(job)
        if not batch:
            return
        self.progress.begin()
        start = time.perf_counter()
        try:
            if self.group is not None:
                self.group.broadcast_batch(batch)  # first, so that every rank runs the same batch
            outcomes = self.handler.run_batch(batch)
        except GroupError:
            raise  # the group cannot go on: the worker reports it and the coordinator restarts the group
        except Exception as e:  # a batch-level failure fails each of its jobs, not the worker
            outcomes = [e] * len(batch)
        run_ms = (time.perf_counter() - start) * 1000 / len(batch)
        for job, outcome in zip(batch, outcomes):
            self._deliver(job, outcome, run_ms)
        self.progress.end()

    def _deliver(self, job: Job, outcome, run_ms: float) -> None:
        if isinstance(outcome, GroupError):
            raise outcome  # not this job's error: the group failed (its jobs are retried elsewhere)
        if isinstance(outcome, BaseException):
            self._end(job.jid, self.errors.reply(job.jid, outcome))
        elif isinstance(outcome, types.GeneratorType):
            self._stream(job, outcome)
        else:
            self._end(job.jid, WResult(job.jid, outcome, run_ms))

    def _stream(self, job: Job, gen) -> None:
        start = time.perf_counter()
        try:
            while True:
                if job.cancelled:
                    gen.close()
                    raise JobError(CANCELLED, "cancelled while streaming")
                chunk = next(gen)
                self.progress.tick()
                if job.stream:
                    self.send_output(WChunk(job.jid, chunk))
        except StopIteration as stop:
            self._end(job.jid, WResult(job.jid, stop.value, (time.perf_counter() - start) * 1000))
        except GroupError:
            raise
        except Exception as e:
            self._end(job.jid, self.errors.reply(job.jid, e))

    def _end(self, jid: int, msg) -> None:
        try:
            self.send_output(msg)
        except JobError as e:
            self.send(WError(jid, e.code, e.message))
        self.cancelled.discard(jid)

    # ------------------------------------------------------------------ engine handlers

    def _engine_turn(self) -> None:
        self._gather_burst()
        burst = []
        while self.pending:
            job = self._take()
            if job is not None:
                burst.append(job)
        if burst:
            self._engine_add(burst)
        for jid in [j for j in self.active if j in self.cancelled]:
            self.cancelled.discard(jid)
            self.handler.cancel(jid)
        for kind, jid, payload in self.ctx.sink.drain():
            self._engine_event(kind, jid, payload)
        if not self.active:
            self.progress.end()
        elif self.progress.age() is None:
            self.progress.begin()

    def _gather_burst(self) -> None:
        """Hand jobs that arrive together to the engine together.

        Jobs sent at once reach us a fraction of a millisecond apart. transformers' continuous batching
        ran a wave of 32 requests at 2,735 tok/s when they were added back to back, but at 1,455 tok/s
        when they came 0.2 ms apart (H200; docs/benchmarks.md, "Models on GPU"): so while jobs keep arriving
        within the handler's `admit_window_s` of each other, keep collecting (at most 5 windows)."""
        window = self.handler.admit_window_s  # defined on EngineHandler; only engines get here
        if not self.pending or window <= 0:
            return
        deadline = time.monotonic() + 5 * window
        while len(self.pending) < self.handler.capacity:
            wait = min(window, deadline - time.monotonic())
            if wait <= 0 or not self.sock.poll(int(wait * 1000) or 1):
                return
            self._receive()

    def _engine_add(self, burst: list[Job]) -> None:
        try:
            refused = self.handler.add_many(burst)
        except Exception as e:  # a handler bug in add_many itself: every job of the burst fails with it
            refused = [e] * len(burst)
        for job, exc in zip(burst, refused):
            if exc is None:
                self.active.add(job.jid)
            else:
                self._end(job.jid, self.errors.reply(job.jid, exc))

    def _engine_event(self, kind: str, jid: int, payload) -> None:
        self.progress.tick()
        if kind == "chunk":
            self.send(WChunk(jid, payload))
            return
        self.active.discard(jid)
        if kind == "result":
            self._end(jid, WResult(jid, payload))
        else:
            code, message = payload
            self._end(jid, WError(jid, code, message))

    def close(self) -> None:
        try:
            self.handler.close()
            self.ctx.transfers.close()
        finally:
            if self.group is not None:
                self.group.close()
            if self.sock is not None:
                self.sock.close()
