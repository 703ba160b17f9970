"""The coordinator's client socket: frames in, admission, and the client ops (submit, cancel, status,
health, ping, scale, reload, stop), so that what a client can ask for reads in one place.

ClientOps decides what a request means; it changes jobs only through the JobTable, and reads state for
`status` and `health` only from a snapshot."""
from __future__ import annotations

import logging
import time
from typing import Callable

import zmq

from protocol import ProtocolError, errors as E
from protocol.logthrottle import LogThrottle
from protocol.messages import Cancel, Error, Health, Ok, Ping, Reload, Scale, Status, Stop, Submit
from orchestrator.observe import views
from orchestrator.core.dispatch import RECV_BATCH
from orchestrator.core.jobtable import JobTable
from orchestrator.states import CoordinatorState as CS, JobState as JS

log = logging.getLogger("orchestrator.coordinator")


def replier(sock: zmq.Socket, codec, out) -> Callable:
    """`reply(route, message)`: encode and queue a message to a client for the end of the loop turn."""
    encode, put = codec.encode, out.put

    def reply(route: tuple, msg) -> None:
        put((sock, route, encode(msg)))
    return reply


class ClientOps:
    """Answers client requests. Its collaborators are explicit:

    - `table`: the JobTable (accept, find, end); `dispatch(pool)` runs queued jobs of a pool;
    - `scale(pool, n)` reconciles a pool (raises ValueError); `reload(pool)` restarts its slots with a
      fresh failure budget; `request_stop(reason, drain)`;
    - `state()`: the coordinator's CoordinatorState; `snapshot()`: a snapshot.Snapshot for views.
    """

    def __init__(self, cfg, sock: zmq.Socket, codec, reply: Callable, table: JobTable, pools: dict,
                 dispatch: Callable, scale: Callable, reload: Callable, request_stop: Callable,
                 state: Callable, snapshot: Callable, metrics):
        self.cfg, self.sock, self.codec, self.reply = cfg, sock, codec, reply
        self.table, self.pools, self.dispatch, self.scale = table, pools, dispatch, scale
        self.reload = reload
        self.request_stop, self.state, self.snapshot, self.metrics = request_stop, state, snapshot, metrics
        self.rejected: dict[str, int] = {}  # error code -> count of rejected requests
        self.bad_log = LogThrottle(log, per_second=20)  # a fuzzer must not flood the log

    def on_readable(self) -> None:
        for _ in range(RECV_BATCH):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
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

    def _reject(self, route: tuple, rid, code: str, message: str, details=None) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1
        if len(message) > 500:  # it may quote client input (an op, a pool name) of up to max_str_len
            message = message[:500] + f"... ({len(message)} chars)"
        self.bad_log("rejected request from client %s: %s: %s", route[0].hex()[:8], code, message)
        self.reply(route, Error(rid, code, message, details))

    def _op_submit(self, route: tuple, msg: Submit) -> None:
        err = self._admit(route, msg)
        if err:
            self._reject(route, msg.id, *err)
            return
        pool = self.pools[msg.pool]
        deadline = time.monotonic() + msg.timeout if msg.timeout else None
        retries = pool.cfg.retries if msg.retries is None else msg.retries
        # msg.input is the client's msgpack bytes, never decoded here: the worker decodes it.
        self.table.accept(route, msg.id, msg.pool, msg.input, msg.stream, retries, deadline)
        self.metrics.job_accepted(pool.name)
        self.dispatch(pool)

    def _admit(self, route: tuple, msg: Submit) -> tuple | None:
        """Why a submit cannot be accepted, as (code, message[, details]), or None."""
        pool = self.pools.get(msg.pool)
        if pool is None:
            return E.UNKNOWN_POOL, f"no pool named {msg.pool!r}; pools: {sorted(self.pools)}"
        if self.state() != CS.RUNNING:
            return E.SHUTTING_DOWN, "the coordinator is shutting down and accepts no new jobs"
        table = self.table
        original = table.find(route, msg.id)
        if original is not None:
            # Its own code, so that a client matching replies by id never reads this as the end of
            # the original job, which goes on and ends with its own result or error.
            return E.DUPLICATE_ID, f"job id {msg.id!r} is already in flight for this client; this " \
                                   f"submit was refused and the original job goes on", \
                {"job": msg.id, "state": original.state.value, "pool": original.pool}
        # `not > 0` also rejects NaN, which would sit at the top of the deadline heap forever.
        if msg.timeout is not None and not msg.timeout > 0 or msg.retries is not None and msg.retries < 0:
            return E.BAD_REQUEST, "timeout must be > 0 and retries >= 0"
        pending = table.pending(route)
        if pending >= self.cfg.max_pending_per_client:
            return E.OVERLOADED, f"this client already has {pending} unfinished jobs " \
                                 f"(max_pending_per_client={self.cfg.max_pending_per_client})"
        queued = table.queued(pool.name)
        if queued >= pool.cfg.queue_size:
            return E.OVERLOADED, f"pool {pool.name} queue is full ({queued} queued, " \
                                 f"queue_size={pool.cfg.queue_size})"
        if table.queued_total >= self.cfg.max_queued_total:
            return E.OVERLOADED, f"{table.queued_total} jobs queued across pools " \
                                 f"(max_queued_total={self.cfg.max_queued_total})"
        if not pool.can_ever_serve():
            return E.UNAVAILABLE, f"pool {pool.name} has no live workers"
        return None

    def _op_cancel(self, route: tuple, msg: Cancel) -> None:
        job = self.table.find(route, msg.job)
        if job is None:
            self._reject(route, msg.id, E.UNKNOWN_JOB, f"no unfinished job {msg.job!r} for this client")
            return
        self.reply(route, Ok(msg.id, {"job": msg.job, "state": job.state.value}))
        self.table.end(job, JS.CANCELLED, Error(job.cid, E.CANCELLED, "cancelled by client"))

    def _op_status(self, route: tuple, msg: Status) -> None:
        self.reply(route, Ok(msg.id, views.status(self.snapshot())))

    def _op_health(self, route: tuple, msg: Health) -> None:
        self.reply(route, Ok(msg.id, views.health(self.snapshot())))

    def _op_ping(self, route: tuple, msg: Ping) -> None:
        self.reply(route, Ok(msg.id, {"pong": True, "state": self.state().value}))

    def _named_pool(self, route: tuple, msg):
        """The pool a scale or reload names; None, the request rejected with `unknown_pool`, if none."""
        pool = self.pools.get(msg.pool)
        if pool is None:
            self._reject(route, msg.id, E.UNKNOWN_POOL, f"no pool named {msg.pool!r}")
        return pool

    def _op_scale(self, route: tuple, msg: Scale) -> None:
        pool = self._named_pool(route, msg)
        if pool is None:
            return
        try:
            self.scale(pool, msg.replicas)
        except ValueError as e:
            self._reject(route, msg.id, E.SCALE_ERROR, str(e))
            return
        self.reply(route, Ok(msg.id, {"pool": pool.name, "replicas": pool.desired}))

    def _op_reload(self, route: tuple, msg: Reload) -> None:
        pool = self._named_pool(route, msg)
        if pool is None:
            return
        self.reload(pool)
        self.reply(route, Ok(msg.id, {"pool": pool.name, "replicas": pool.desired}))

    def _op_stop(self, route: tuple, msg: Stop) -> None:
        self.reply(route, Ok(msg.id, {"state": "stopping", "drain": msg.drain}))
        self.request_stop(msg.reason, drain=msg.drain)

    _ops = {Submit: _op_submit, Cancel: _op_cancel, Status: _op_status, Health: _op_health,
            Ping: _op_ping, Scale: _op_scale, Reload: _op_reload, Stop: _op_stop}
