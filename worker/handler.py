"""The Handler interface: what runs inside a worker process.

A handler is chosen by the server's config (a built-in name or ``module:Class``), never by a client
message. Construction is cheap; `load()` does the slow work (imports, CUDA, model weights) and runs once
before the worker reports READY.

Two shapes:

- `Handler` (synchronous). The worker's compute thread calls `run_batch(jobs)` with up to `max_batch`
  jobs and sends each outcome. `run(job)` may return the output, or return a generator: every yielded
  item is one stream chunk and the generator's ``return`` value is the final output.
- `EngineHandler` (asynchronous, e.g. continuous batching with its own thread). The compute thread
  calls `add_many(jobs)` (by default `add(job)` for each) and `cancel(jid)`; the engine reports through
  `ctx.sink` (thread-safe) whenever it has chunks, results or errors.

A handler fails one job by raising `JobError(code, message)` (for example `invalid_input`); any other
exception fails that job with `handler_error` and a short traceback. The worker keeps serving either way.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from protocol.errors import INVALID_INPUT, JobError
from worker.transfers import HostTransfers, Transfers


class Progress:
    """How long the current step has run. The compute thread marks steps; heartbeats report the age, so
    the coordinator's watchdog can tell a long step from a hung one."""

    def __init__(self):
        self._since: float | None = None

    def begin(self) -> None:
        self._since = time.monotonic()

    tick = begin  # progress inside a long step (a streamed token) restarts the clock

    def end(self) -> None:
        self._since = None

    def age(self) -> float | None:
        since = self._since
        return None if since is None else time.monotonic() - since


class EventSink:
    """Thread-safe outbox an EngineHandler reports through. The worker's compute loop drains it.

    `notify` wakes the compute loop's poll (worker/process.py passes its eventfd's `set`), so an event is
    sent without waiting for a poll timeout.
    """

    def __init__(self, notify: Callable[[], None] = lambda: None):
        self._lock = threading.Lock()
        self._events: list[tuple] = []
        self._notify = notify

    def chunk(self, jid: int, data: Any) -> None:
        self._put(("chunk", jid, data))

    def result(self, jid: int, output: Any) -> None:
        self._put(("result", jid, output))

    def error(self, jid: int, code: str, message: str) -> None:
        self._put(("error", jid, (code, message)))

    def _put(self, event: tuple) -> None:
        with self._lock:
            self._events.append(event)
        self._notify()

    def drain(self) -> list[tuple]:
        with self._lock:
            events, self._events = self._events, []
        return events


@dataclass(frozen=True)
class WorkerContext:
    """What a handler knows about where it runs, and what it reports through. Built complete, once, by
    the worker (worker/process.py `build_context`) before the handler is constructed; frozen, so no
    module fills it in later. The defaults suit a handler run in-process (tests) on the CPU."""

    wid: str  # e.g. "gen/0"
    pool: str
    devices: list  # the physical device ids this worker owns ("0","1") or ["cpu"]
    device: str  # torch device string for this rank: "cuda:0" (after CUDA_VISIBLE_DEVICES) or "cpu"
    config: dict  # the pool's handler config from the server config
    rank: int = 0
    world_size: int = 1
    node: str | None = None  # the Ray node id when Ray placed this worker; None when launched locally
    group: Any = None  # worker.tp.GroupRuntime for tp > 1, else None
    # An EngineHandler reports chunks, results and errors here (thread-safe); the compute loop drains it.
    sink: EventSink = field(default_factory=EventSink)
    # An EngineHandler calls progress.tick() whenever its engine advances (a decode step, a finished
    # request), so the watchdog can tell a long generation from a hung one.
    progress: Progress = field(default_factory=Progress)
    stats_fn: Callable[[], dict | None] = lambda: None  # the figures heartbeats carry (memory, guard cost)
    # Host<->device copies of job payloads (worker/transfers.py): pooled CUDA streams on a GPU worker,
    # plain conversions on a CPU one. Handlers use to_device/to_host below.
    transfers: Transfers = field(default_factory=HostTransfers)

    def to_device(self, array):
        """A job's array input (NDArray or numpy) as a torch tensor on this worker's device. On a CUDA
        worker the copy runs on a pooled transfer stream that the current compute stream waits on."""
        return self.transfers.to_device(array)

    def to_host(self, tensor):
        """A tensor as a numpy array (an NDArray on the wire), copied device-to-host on a pooled transfer
        stream after the current compute stream's work on it; on a CPU worker, a plain conversion."""
        return self.transfers.to_host(tensor)


class Job:
    """One job as a handler sees it. `cancelled` turns true when the client cancels it."""

    __slots__ = ("jid", "input", "stream", "_cancelled", "received")

    def __init__(self, jid: int, input: Any, stream: bool, cancelled: set):
        self.jid = jid
        self.input = input
        self.stream = stream
        self._cancelled = cancelled
        # CLOCK_MONOTONIC (time.perf_counter on Linux): one clock for every process of the host, so a
        # client can line up its own timestamps with a job's path through the worker.
        self.received = time.perf_counter()

    @property
    def cancelled(self) -> bool:
        return self.jid in self._cancelled


class Handler:
    """Synchronous handler base. Override `run` (or `run_batch` to batch across jobs)."""

    capacity: int = 1  # credits: jobs the coordinator may keep in flight at this worker
    max_batch: int = 1  # jobs handed to one run_batch call
    replay_safe: bool = True  # a job that already streamed chunks may be replayed after a crash

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.config = ctx.config

    def load(self) -> None:
        """Slow setup; runs once before READY."""

    def run(self, job: Job) -> Any:
        raise NotImplementedError

    def run_batch(self, jobs: list[Job]) -> list[Any]:
        """Outcome per job, in order: an output, a generator (streaming) or a JobError/Exception."""
        out = []
        for job in jobs:
            try:
                out.append(self.run(job))
            except Exception as e:  # one job's failure must not fail its batch-mates
                out.append(e)
        return out

    def info(self) -> dict:
        """Extra facts reported with READY (model name, dtype...)."""
        return {}

    def close(self) -> None:
        """Release resources; called once when the worker stops."""


class EngineHandler(Handler):
    """Asynchronous handler: jobs join a running engine and finish in any order.

    `add` must not block for long (the compute thread also receives new jobs). Every added job must
    end in exactly one `ctx.sink.result` or `ctx.sink.error`, including cancelled ones
    (`error(jid, protocol.errors.CANCELLED, ...)`).
    """

    capacity = 32
    # Keep collecting new jobs while they arrive within this many seconds of each other, so a wave of
    # jobs joins the engine as one burst (see ComputeLoop._gather_burst). 0 turns it off.
    admit_window_s = 0.0

    def add(self, job: Job) -> None:
        raise NotImplementedError

    def add_many(self, jobs: list[Job]) -> list[BaseException | None]:
        """Add a burst of jobs; returns, per job, the exception that refused it (None: added).

        An engine starts a step as soon as it sees a request, so jobs of one burst should reach it back to
        back. An engine whose `add` does per-job work first (parsing, tokenising) overrides this to do that
        work for the whole burst before handing any job over."""
        refused: list[BaseException | None] = []
        for job in jobs:
            try:
                self.add(job)
                refused.append(None)
            except Exception as e:
                refused.append(e)
        return refused

    def cancel(self, jid: int) -> None:
        raise NotImplementedError

    def busy(self) -> bool:
        """True while any added job has not ended."""
        return False


def check(cond: bool, message: str, code: str = INVALID_INPUT) -> None:
    """Validate handler input: raise JobError(code, message) unless cond."""
    if not cond:
        raise JobError(code, message)

