"""The coordinator's client socket: frames in, admission, and the client ops (submit, cancel, status,
health, ping, scale, stop). A mixin of `Coordinator`, which owns the state these methods use; kept apart
so that what a client can ask for reads in one place."""
from __future__ import annotations

import heapq
import logging
import time

import zmq

from protocol import ProtocolError, errors as E
from protocol.messages import Cancel, Error, Health, Ok, Ping, Scale, Status, Stop, Submit
from . import views
from .jobs import Job
from .states import CoordinatorState as CS, JobState as JS

log = logging.getLogger("orchestrator.coordinator")

RECV_BATCH = 256  # messages drained per socket per loop turn: fairness between clients and workers


class RateLimitedLog:
    """Log bad client input at most `per_second` lines a second (a fuzzer must not flood the log)."""

    def __init__(self, logger, per_second: int = 20):
        self.logger, self.per_second = logger, per_second
        self.window, self.count, self.suppressed = 0, 0, 0

    def warning(self, fmt: str, *args) -> None:
        now = int(time.monotonic())
        if now != self.window:
            if self.suppressed:
                self.logger.warning("(%d similar messages suppressed)", self.suppressed)
            self.window, self.count, self.suppressed = now, 0, 0
        self.count += 1
        if self.count <= self.per_second:
            self.logger.warning(fmt, *args)
        else:
            self.suppressed += 1


class ClientOps:
    """Client-facing half of the Coordinator (see coordinator.py for the state it reads)."""


    def _on_client(self) -> None:
        for _ in range(RECV_BATCH):
            try:
                frames = self.csock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._client_frames(frames)

    def _client_frames(self, frames: list) -> None:
        # DEALER clients send one frame (ROUTER prepends their identity); REQ adds an empty delimiter.
        route, body = tuple(frames[:-1]), frames[-1]
        if len(frames) == 3 and frames[1] == b"":
            pass
        elif len(frames) != 2:
            route = (frames[0],)
            self._reject(route, None, E.BAD_REQUEST, f"expected one message frame, got {len(frames) - 1}")
            return
        try:
            msg = self.codec.decode(body)
        except ProtocolError as e:
            self._reject(route, e.request_id, e.code, e.message)
            return
        op = self._ops.get(type(msg))
        if op is None:  # a reply or worker-only op: valid on the wire, but not a client request
            self._reject(route, getattr(msg, "id", None), E.UNKNOWN_OP,
                         f"op {msg.OP!r} is not a client request")
            return
        op(self, route, msg)

    def _reject(self, route: tuple, rid, code: str, message: str) -> None:
        self.rejected[code] += 1
        if len(message) > 500:  # it may quote client input (an op, a pool name) of up to max_str_len
            message = message[:500] + f"... ({len(message)} chars)"
        self.bad_log.warning("rejected request from client %s: %s: %s", route[0].hex()[:8], code, message)
        self._reply(route, Error(rid, code, message))

    def _reply(self, route: tuple, msg) -> None:
        self._out.append((self.csock, route, self.codec.encode(msg)))  # sent at the end of the turn

    def _op_submit(self, route: tuple, msg: Submit) -> None:
        err = self._admit(route, msg)
        if err:
            self._reject(route, msg.id, *err)
            return
        pool = self.pools[msg.pool]
        deadline = time.monotonic() + msg.timeout if msg.timeout else None
        retries = pool.cfg.retries if msg.retries is None else msg.retries
        # msg.input is the client's msgpack bytes, never decoded here: the worker decodes it.
        job = Job(self.next_jid, route, msg.id, msg.pool, msg.input, msg.stream, retries, deadline)
        self.next_jid += 1
        self.jobs[(route, msg.id)] = job
        self.per_client[route] += 1
        if deadline:
            heapq.heappush(self.timeouts, (deadline, job.jid, job))
            if len(self.timeouts) > 2 * len(self.jobs) + 1024:  # finished jobs wait for their deadline
                self.timeouts = [t for t in self.timeouts if not t[2].finished]
                heapq.heapify(self.timeouts)
        self._enqueue(pool, job)
        self.metrics.job_accepted(pool.name)
        self._dispatch(pool)

    def _admit(self, route: tuple, msg: Submit) -> tuple | None:
        """Why a submit cannot be accepted, as (code, message), or None."""
        pool = self.pools.get(msg.pool)
        if pool is None:
            return E.UNKNOWN_POOL, f"no pool named {msg.pool!r}; pools: {sorted(self.pools)}"
        if self.state != CS.RUNNING:
            return E.SHUTTING_DOWN, "the coordinator is shutting down and accepts no new jobs"
        if (route, msg.id) in self.jobs:
            return E.BAD_REQUEST, f"job id {msg.id!r} is already in flight for this client"
        # `not > 0` also rejects NaN, which would sit at the top of the deadline heap forever.
        if msg.timeout is not None and not msg.timeout > 0 or msg.retries is not None and msg.retries < 0:
            return E.BAD_REQUEST, "timeout must be > 0 and retries >= 0"
        if self.per_client.get(route, 0) >= self.cfg.max_pending_per_client:  # .get: no entry per stranger
            return E.OVERLOADED, f"this client already has {self.per_client[route]} unfinished jobs " \
                                 f"(max_pending_per_client={self.cfg.max_pending_per_client})"
        if len(pool.queue) >= pool.cfg.queue_size:
            return E.OVERLOADED, f"pool {pool.name} queue is full ({len(pool.queue)} queued, " \
                                 f"queue_size={pool.cfg.queue_size})"
        if self.queued_total >= self.cfg.max_queued_total:
            return E.OVERLOADED, f"{self.queued_total} jobs queued across pools " \
                                 f"(max_queued_total={self.cfg.max_queued_total})"
        if not pool.can_ever_serve():
            return E.UNAVAILABLE, f"pool {pool.name} has no live workers"
        return None

    def _op_cancel(self, route: tuple, msg: Cancel) -> None:
        job = self.jobs.get((route, msg.job))
        if job is None:
            self._reject(route, msg.id, E.UNKNOWN_JOB, f"no unfinished job {msg.job!r} for this client")
            return
        self._reply(route, Ok(msg.id, {"job": msg.job, "state": job.state.value}))
        self._abort(job, JS.CANCELLED, E.CANCELLED, "cancelled by client")

    def _op_status(self, route: tuple, msg: Status) -> None:
        self._reply(route, Ok(msg.id, views.status(self)))

    def _op_health(self, route: tuple, msg: Health) -> None:
        self._reply(route, Ok(msg.id, views.health(self)))

    def _op_ping(self, route: tuple, msg: Ping) -> None:
        self._reply(route, Ok(msg.id, {"pong": True, "state": self.state.value}))

    def _op_scale(self, route: tuple, msg: Scale) -> None:
        pool = self.pools.get(msg.pool)
        if pool is None:
            self._reject(route, msg.id, E.UNKNOWN_POOL, f"no pool named {msg.pool!r}")
            return
        try:
            self.scale(pool, msg.replicas)
        except ValueError as e:
            self._reject(route, msg.id, E.SCALE_ERROR, str(e))
            return
        self._reply(route, Ok(msg.id, {"pool": pool.name, "replicas": pool.desired}))

    def _op_stop(self, route: tuple, msg: Stop) -> None:
        self._reply(route, Ok(msg.id, {"state": "stopping", "drain": msg.drain}))
        self.request_stop(msg.reason, drain=msg.drain)

    _ops = {Submit: _op_submit, Cancel: _op_cancel, Status: _op_status, Health: _op_health,
            Ping: _op_ping, Scale: _op_scale, Stop: _op_stop}
