"""Host<->device copies of job payloads on pooled CUDA streams: what a CUDA worker's `ctx.to_device` and
`ctx.to_host` use (worker/transfers.py), and so the embed handler's outputs.

Stream discipline (docs/background 001 and 002):

- No module keeps a process-wide "current stream". A compute stream is passed explicitly
  (`compute_stream=`); worker/transfers.py passes the calling thread's current stream.
- Each transfer takes a stream of its own from a bounded pool. A stream's queue holds about a
  thousand pending operations; when a shared one fills, enqueueing blocks the host thread.
- A device-to-host copy first waits on an event recorded on the compute stream, so it reads what
  that stream wrote rather than what was there before.
- Streams, events and pinned buffers return to the pool in `finally`, also when a copy or a job fails.

torch is imported lazily: the coordinator must never import it.

`torch.cuda.Stream()` hands out streams round-robin from a pool of 32 per device and priority. A
TransferPool of more than 32 default streams therefore aliases some of them: still correct, but
aliased transfers share one queue. `stats()["streams_distinct"]` says how many are distinct; pass
`ops` with a factory of dedicated streams to go past 32.
"""
from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager


class PoolState(enum.Enum):
    """TransferPool lifecycle: NEW -> STARTED -> CLOSED, or NEW -> CLOSED. Nothing leaves CLOSED."""

    NEW = "new"
    STARTED = "started"
    CLOSED = "closed"


_TRANSITIONS = {
    PoolState.NEW: {PoolState.STARTED, PoolState.CLOSED},
    PoolState.STARTED: {PoolState.CLOSED},
    PoolState.CLOSED: set(),
}


class PoolExhausted(TimeoutError):
    """No stream, event or buffer came free within the pool's acquire timeout."""


@dataclass(frozen=True)
class StreamOps:
    """How the pool makes and enters streams and events. Tests pass fakes for the CUDA objects."""

    new_stream: Callable[[], Any]  # has wait_event(event), synchronize(), cuda_stream
    new_event: Callable[[], Any]  # has record(stream), query(), synchronize()
    use_stream: Callable[[Any], ContextManager]  # current stream of the calling thread only
    alloc_host: Callable[[int, bool], Any]  # (nbytes, pinned) -> 1-D uint8 CPU tensor


def host_alloc(nbytes: int, pinned: bool):
    """A 1-D uint8 host tensor; page-locked when `pinned` (needs a CUDA build of torch)."""
    import torch

    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)


def torch_ops(device, priority: int = 0) -> StreamOps:
    """Real CUDA streams and events on `device`; streams come from torch's pool for `priority`."""
    import torch

    def new_stream():
        return torch.cuda.Stream(device=device, priority=priority)

    return StreamOps(new_stream, torch.cuda.Event, torch.cuda.stream, host_alloc)


def _round_up(n: int, to: int = 64) -> int:
    return max(to, -(-n // to) * to)


class _Buffer:
    """A host staging buffer. It may grow (replaced by a larger allocation) but never multiplies."""

    def __init__(self, data):
        self.data = data

    def view(self, like, alloc: Callable[[int, bool], Any], pinned: bool):
        nbytes = like.numel() * like.element_size()
        if self.data.numel() < nbytes:
            self.data = alloc(_round_up(nbytes, 1 << 12), pinned)
        return self.data[:nbytes].view(like.dtype).view(like.shape)


@dataclass
class _Lease:
    stream: Any
    events: list  # [done, ready]: recorded after the copy on its stream, and on the compute stream before
    buffer: _Buffer
    released: bool = False


class Ticket:
    """One transfer in flight.

    `wait()` blocks until the copy is done, returns its result (a host tensor for `to_host_async`,
    the device tensor for `to_device`) and gives the stream, events and buffer back, in `finally`,
    also when waiting raises. It is idempotent and thread-safe. A ticket nobody waits on is finished
    by the pool once its copy is done (`TransferPool.reap`).
    """

    def __init__(self, pool: TransferPool, lease: _Lease, value, keep, to_host: bool):
        self._pool = pool
        self._lease = lease
        self._value = value
        self._keep = keep  # the source must outlive the copy, or its memory could be reused under it
        self._to_host = to_host
        self._lock = threading.Lock()
        self._finished = False
        self._error: BaseException | None = None

    def done(self) -> bool:
        """True once the copy is done; never blocks."""
        if not self._lock.acquire(blocking=False):
            return False  # another thread is finishing it right now
        try:
            return self._finished or self._copy_done()
        finally:
            self._lock.release()

    def wait(self):
        with self._lock:
            if not self._finished:
                self._finish()
        if self._error is not None:
            raise self._error
        return self._value

    def try_finish(self) -> bool:
        """Finish if the copy is done and no other thread is waiting on this ticket."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._finished or not self._copy_done():
                return False
            self._finish()
            return True
        finally:
            self._lock.release()

    def _copy_done(self) -> bool:
        try:
            return self._lease.events[0].query()
        except Exception:
            return True  # let _finish's synchronize raise the error and record it

    def _finish(self) -> None:
        try:
            self._lease.events[0].synchronize()
            if self._to_host:
                self._value = self._value.clone()  # the pinned buffer goes back to the pool
        except BaseException as e:
            self._error = e
        finally:
            self._finished = True
            self._keep = None
            self._pool._settle(self, failed=self._error is not None)


class TransferPool:
    """Bounded pool of transfer streams, events and host staging buffers on one device.

    Every transfer holds one stream, its done event, its ready event, and
    one buffer, from enqueue until its ticket is finished. At most `max_streams` transfers are in
    flight; beyond that, acquiring finishes done tickets and otherwise waits up to
    `acquire_timeout` seconds, then raises PoolExhausted. The pool never creates more.
    The constructor is cheap; `start()` creates the CUDA objects and the pinned buffers.
    """

    def __init__(self, device, *, max_streams: int = 32, num_buffers: int | None = None,
                 buffer_bytes: int = 1 << 20, pinned: bool = True, acquire_timeout: float = 30.0,
                 priority: int = -1, ops: StreamOps | None = None):
        if max_streams < 1 or (num_buffers is not None and num_buffers < 1):
            raise ValueError(f"max_streams={max_streams} and num_buffers={num_buffers} must be >= 1")
        self.device = device
        self.max_streams = max_streams
        self.num_buffers = max_streams if num_buffers is None else num_buffers
        self.buffer_bytes = _round_up(buffer_bytes)
        self.pinned = pinned
        self.acquire_timeout = acquire_timeout
        self.priority = priority  # not compute's 0: torch's pools then never alias the two
        self._ops = ops
        self._cond = threading.Condition()
        self._state = PoolState.NEW
        self._free_streams: list = []
        self._free_events: list = []
        self._free_buffers: list[_Buffer] = []
        self._totals = (0, 0, 0)
        self._streams_distinct = 0
        self._in_flight: dict[int, Ticket] = {}
        self._counts = {"transfers": 0, "failures": 0, "reaped": 0}

    # lifecycle

    def start(self) -> TransferPool:
        """Create every stream, event and buffer now (slow: CUDA, pinned memory). Returns self."""
        ops = self._ops or torch_ops(self.device, self.priority)
        streams = [ops.new_stream() for _ in range(self.max_streams)]
        events = [ops.new_event() for _ in range(2 * self.max_streams)]
        slab = ops.alloc_host(self.num_buffers * self.buffer_bytes, self.pinned)  # one allocation
        size = self.buffer_bytes
        buffers = [_Buffer(slab[i * size:(i + 1) * size]) for i in range(self.num_buffers)]
        with self._cond:
            self._transition(PoolState.STARTED)
            self._ops = ops
            self._free_streams, self._free_events, self._free_buffers = streams, events, buffers
            self._totals = (len(streams), len(events), len(buffers))
            self._streams_distinct = len({s.cuda_stream for s in streams})
        return self

    def close(self) -> None:
        """Wait for every transfer in flight, then drop the pool's streams, events and buffers."""
        self.drain()
        with self._cond:
            self._transition(PoolState.CLOSED)
            self._free_streams, self._free_events, self._free_buffers = [], [], []
            self._cond.notify_all()

    def _transition(self, new: PoolState) -> None:
        if new not in _TRANSITIONS[self._state]:
            raise RuntimeError(f"TransferPool cannot go from {self._state.value} to {new.value}")
        self._state = new

    # transfers

    def to_host(self, tensor, *, compute_stream):
        """Copy a device tensor to a new host tensor and return it once the copy is done."""
        return self.to_host_async(tensor, compute_stream=compute_stream).wait()

    def to_host_async(self, tensor, *, compute_stream) -> Ticket:
        """Copy a device tensor into a pinned buffer on a stream of its own; don't wait.

        `compute_stream` is the stream that wrote `tensor`: the copy waits on an event recorded there,
        so it reads the final values.
        """
        lease = self._acquire()
        try:
            ready = lease.events[1]
            if not tensor.is_contiguous():
                with self._ops.use_stream(compute_stream):
                    tensor = tensor.contiguous()
            ready.record(compute_stream)
            view = lease.buffer.view(tensor, self._ops.alloc_host, self.pinned)
            self._copy(lease, ready, view, tensor)
            return self._launch(lease, value=view, keep=tensor, to_host=True)
        except BaseException:
            self._abort(lease)
            raise

    def to_device(self, tensor, *, compute_stream) -> tuple[Any, Ticket]:
        """Copy a host tensor to the device on a stream of its own. Returns (device tensor, ticket).

        `compute_stream` waits for the copy on the device, so work issued there afterwards sees the
        data while the host goes on. The ticket holds the staging buffer until the copy is done:
        wait on it, or leave it to the pool, which reaps it once done.
        """
        import torch

        if tensor.device.type != "cpu":
            raise ValueError(f"to_device needs a host tensor, got one on {tensor.device}")
        lease = self._acquire()
        try:
            staging = lease.buffer.view(tensor, self._ops.alloc_host, self.pinned)
            staging.copy_(tensor)  # a host copy, so the caller may reuse `tensor` at once
            with self._ops.use_stream(compute_stream):  # the memory block then belongs to it
                out = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
            ready = lease.events[1]
            ready.record(compute_stream)  # earlier compute work on out's memory finishes first
            self._copy(lease, ready, out, staging)
            compute_stream.wait_event(lease.events[0])
            return out, self._launch(lease, value=out, keep=None, to_host=False)
        except BaseException:
            self._abort(lease)
            raise

    def _copy(self, lease: _Lease, ready, dst, src) -> None:
        lease.stream.wait_event(ready)
        with self._ops.use_stream(lease.stream):
            dst.copy_(src, non_blocking=True)
        lease.events[0].record(lease.stream)

    def _launch(self, lease: _Lease, value, keep, to_host: bool) -> Ticket:
        ticket = Ticket(self, lease, value, keep, to_host)
        with self._cond:
            self._in_flight[id(ticket)] = ticket
            self._counts["transfers"] += 1
        return ticket

    def _abort(self, lease: _Lease) -> None:
        try:
            lease.stream.synchronize()  # a copy into the buffer may be queued; let it land first
        except Exception:
            pass  # the device is failing already; returning the lease matters more
        finally:
            self._release(lease, failed=True)

    # bookkeeping

    def _acquire(self) -> _Lease:
        """Take all the resources a transfer needs (a stream, two events, a buffer) at once, so no thread
        holds some while waiting."""
        deadline = time.monotonic() + self.acquire_timeout
        delay = 1e-4
        while True:
            with self._cond:
                if self._state is not PoolState.STARTED:
                    raise RuntimeError(f"TransferPool is {self._state.value}; call start() first")
                if self._fits():
                    return self._take()
            if self.reap():
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise PoolExhausted(self._exhausted_message())
            with self._cond:
                self._cond.wait(min(delay, left))
            delay = min(2 * delay, 2e-3)

    def _fits(self) -> bool:
        return bool(self._free_streams) and len(self._free_events) >= 2 and bool(self._free_buffers)

    def _take(self) -> _Lease:
        return _Lease(stream=self._free_streams.pop(), events=[self._free_events.pop() for _ in range(2)],
                      buffer=self._free_buffers.pop())

    def _release(self, lease: _Lease, failed: bool = False) -> None:
        with self._cond:
            if lease.released:
                return
            lease.released = True
            if self._state is PoolState.STARTED:
                self._free_streams.append(lease.stream)
                self._free_events.extend(lease.events)
                self._free_buffers.append(lease.buffer)
            self._counts["failures"] += failed
            self._cond.notify_all()

    def _settle(self, ticket: Ticket, failed: bool) -> None:
        with self._cond:
            self._in_flight.pop(id(ticket), None)
        self._release(ticket._lease, failed)

    def _exhausted_message(self) -> str:
        s = self.stats()
        return (f"no transfer resources free after {self.acquire_timeout:.2f} s: {s['in_flight']} "
                f"transfers in flight (max_streams={self.max_streams}), streams free "
                f"{s['streams_free']}/{s['streams_total']}, events free {s['events_free']}/"
                f"{s['events_total']}, buffers free {s['buffers_free']}/{s['buffers_total']}")

    def reap(self) -> int:
        """Finish in-flight tickets whose copies are done, including abandoned ones; how many."""
        with self._cond:
            tickets = list(self._in_flight.values())
        finished = sum(t.try_finish() for t in tickets)
        with self._cond:
            self._counts["reaped"] += finished
        return finished

    def drain(self) -> None:
        """Wait for every transfer in flight. Their owners can still read results with wait()."""
        with self._cond:
            tickets = list(self._in_flight.values())
        for ticket in tickets:
            try:
                ticket.wait()
            except Exception:
                pass  # counted as a failure; its owner sees the error on wait()

    def stats(self) -> dict:
        with self._cond:
            streams, events, buffers = self._totals
            return {
                "streams_free": len(self._free_streams), "streams_total": streams,
                "streams_distinct": self._streams_distinct,
                "events_free": len(self._free_events), "events_total": events,
                "buffers_free": len(self._free_buffers), "buffers_total": buffers,
                "in_flight": len(self._in_flight), **self._counts,
            }
