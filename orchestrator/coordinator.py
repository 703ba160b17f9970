"""The coordinator: one event loop over the client socket, the worker socket, process fds and timers.

It never imports torch and never blocks on a worker: every socket is read with NOBLOCK after a poll,
and every wait (drain, restart backoff, staged stop, job timeout) is a timer checked by the loop.
"""
from __future__ import annotations

import heapq
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections import defaultdict

import zmq

from protocol import Codec, errors as E
from protocol.codec import INTERNAL_LIMITS
from protocol.messages import (
    Chunk, Error, Result, WCancel, WChunk, WError, WFatal, WGroupReport, WHeartbeat, WHello, WReady,
    WResult, WRun,
)
from . import cluster, security
from .client_ops import RECV_BATCH, ClientOps, RateLimitedLog
from .config import ServerConfig, validate
from .eventloop import EventLoop
from .jobs import Job
from .launcher import LocalLauncher
from .metrics import make_metrics
from .placement import available_cores, split_cores
from .pools import Pool
from .procs import Slot
from .states import (
    COORDINATOR_TRANSITIONS, CoordinatorState as CS, JobState as JS, WorkerState as WS, move,
)
from .supervisor import Supervisor

log = logging.getLogger("orchestrator.coordinator")

TICK = 0.05  # timer resolution (heartbeats, watchdogs, timeouts) in seconds


def _send_frames(sock: zmq.Socket, route: tuple, body: bytes) -> None:
    """send_multipart(route + [body]) without its per-call type checks and flag-enum arithmetic, which
    cost about 2 us a message on the job path (scripts/bench_dispatch.py)."""
    for frame in route:
        sock.send(frame, _SNDMORE)
    sock.send(body)


_SNDMORE = zmq.SNDMORE


class Coordinator(ClientOps):
    """Construct cheaply; `start()` binds and spawns; `run()` serves until stopped."""

    def __init__(self, cfg: ServerConfig):
        validate(cfg)
        self.cfg = cfg
        self.name = "coordinator"
        self.state = CS.RUNNING
        self.codec = Codec(cfg.limits)
        # Worker traffic is private and already passed the client limits on its way in; a result
        # may be larger than the request (and must never crash the loop by being so).
        self.wcodec = Codec(INTERNAL_LIMITS)
        self.pools: dict[str, Pool] = {}
        self.jobs: dict[tuple, Job] = {}  # (route, client id) -> unfinished job
        self.per_client: dict[tuple, int] = defaultdict(int)  # route -> unfinished jobs
        self.timeouts: list = []  # heap of (deadline, jid, job)
        self.next_jid = 1
        self.queued_total = 0
        self.endpoint: str | None = None
        self.run_dir: str | None = None
        self.started_at = time.monotonic()
        self.drain_deadline: float | None = None
        self.stop_reason: str | None = None
        self.bad_log = RateLimitedLog(log)
        self.metrics = make_metrics(cfg)
        self.rejected = defaultdict(int)  # error code -> count of rejected requests
        # Jobs and replies of one loop turn go out together at its end, so that a worker or a client
        # wakes once for the lot rather than once per message (scripts/bench_dispatch.py, 4 echo
        # workers on 2 cores: 9k -> 13k jobs/s). Entries are (socket, route frames, body), in order.
        self._out: list = []
        # Created by start(); None until then so shutdown() is safe after a failed start.
        self.zctx = self.auth = self.csock = self.wsock = self.loop = self.sup = None
        self.monitor: security.HandshakeMonitor | None = None
        self.wmonitor: security.HandshakeMonitor | None = None  # Ray mode: refusals on the worker socket
        self.worker_endpoint: str | None = None
        self.worker_keys: security.WorkerKeys | None = None  # Ray mode: the worker socket's CURVE keys
        self.launcher = LocalLauncher()  # start() replaces it with a Ray launcher in Ray mode

    # ------------------------------------------------------------------ start

    def start(self) -> str:
        """Bind sockets, spawn every pool's workers. Returns the client endpoint actually bound."""
        self.pools = {p.name: Pool(p) for p in self.cfg.pools}  # raises ValueError on bad placement
        self.run_dir = tempfile.mkdtemp(prefix="orchestrator-", dir=self.cfg.run_dir)
        os.chmod(self.run_dir, 0o700)  # only this user may reach the worker socket
        if self.cfg.ray is not None:  # joins the Ray cluster (ValueError if it cannot)
            self.worker_keys = security.WorkerKeys(self.run_dir)
            self.launcher = cluster.make_launcher(self.cfg, self.run_dir, self.worker_keys)
        self.zctx = zmq.Context()
        self.auth = security.setup(self.zctx, self.cfg, self.worker_keys)
        self.csock = self._bind_client()
        self.wsock = self._bind_workers()
        self.loop = EventLoop()
        self.loop.add(self.csock, self._on_client)
        self.loop.add(self.wsock, self._on_worker)
        self.monitor = security.HandshakeMonitor(self.csock, self.csock.getsockopt(zmq.MAXMSGSIZE))
        self.loop.add(self.monitor.sock, self.monitor.on_readable)
        if self.wmonitor is not None:
            self.loop.add(self.wmonitor.sock, self.wmonitor.on_readable)
        self.sup = Supervisor(self.cfg, self.worker_endpoint, self._send_worker, self.launcher, self.loop,
                              self._on_slot_down, self._on_slot_change, self.metrics)
        self._install_signals()
        cluster.reserve(self.cfg, self.launcher, self.pools)  # Ray: all first slots placed, or ValueError
        self._start_slots()
        self.metrics.start(self)
        return self.endpoint

    def _bind_client(self) -> zmq.Socket:
        sock = self.zctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        # libzmq drops (and disconnects) anything larger outright; below this the codec answers
        # `too_large`, so the hard cap sits above the configured message limit.
        sock.setsockopt(zmq.MAXMSGSIZE, self.cfg.limits.max_message_bytes * 2 + 1024)
        security.apply_server(sock, self.cfg, self.auth)
        sock.bind(self.cfg.address)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock

    def _bind_workers(self) -> zmq.Socket:
        sock = self.zctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop a job or a stop message to a worker
        sock.setsockopt(zmq.RCVHWM, 0)
        if self.worker_keys is not None:  # Ray mode: TCP, so only this run's key may connect
            self.worker_keys.apply_server(sock)
            self.wmonitor = security.HandshakeMonitor(sock, 0, who="worker", log_closes=False)
        sock.bind(cluster.worker_bind_address(self.cfg, self.run_dir, self.launcher))
        self.worker_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.worker_keys is not None:
            log.info("worker socket %s: CURVE, this run's worker key only", self.worker_endpoint)
        return sock

    def _start_slots(self) -> None:
        plan = [(pool, i) for pool in self.pools.values() for i in range(pool.desired)]
        total_procs = sum(pool.cfg.tp for pool, _ in plan)
        cores = split_cores(available_cores(), max(total_procs, 1))
        k = 0
        for pool, index in plan:
            ranks = [cores[(k + r) % len(cores)] for r in range(pool.cfg.tp)]
            k += pool.cfg.tp
            self._start_new_slot(pool, index, ranks)

    def _start_new_slot(self, pool: Pool, index: int, cores: list) -> None:
        slot = pool.slots.get(index)
        if slot is None or slot.state == WS.STOPPED:
            slot = Slot(pool.slot_spec(index, cores))
            pool.slots[index] = slot
        self.sup.start_slot(slot, pool.cfg)

    def _install_signals(self) -> None:
        """Signals only set flags; a socketpair wakes the poll so the loop acts on them at once."""
        self._sig_r, sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        sig_w.setblocking(False)
        self._sig_w = sig_w
        signal.set_wakeup_fd(sig_w.fileno(), warn_on_full_buffer=False)
        self._signals: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self._signals.append(signum))
        self.loop.add(self._sig_r.fileno(), self._on_signal_fd)

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        """Serve until stopped. Always ends in `shutdown()`."""
        try:
            next_tick = 0.0
            while self.state != CS.STOPPED:
                now = time.monotonic()
                self.loop.poll(max(0.0, min(TICK, next_tick - now)))
                now = time.monotonic()
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + TICK
                if self._out:
                    self._send_out()
        finally:
            self.shutdown()
        return 0

    def _tick(self, now: float) -> None:
        slots = [s for p in self.pools.values() for s in p.slots.values()]
        self.sup.tick(slots, now)
        self._expire_jobs(now)
        self.monitor.flush()  # suppressed-refusal counts reach the log without waiting for a next one
        if self.wmonitor is not None:
            self.wmonitor.flush()
        if self.state == CS.DRAINING:
            self._check_drained(now)
        if self.state == CS.STOPPING and all(s.state == WS.STOPPED for s in slots):
            move(self, CS.STOPPED, COORDINATOR_TRANSITIONS)
        self.metrics.tick(self, now)

    def shutdown(self) -> None:
        """Kill anything still running, close sockets, remove the run directory. Idempotent."""
        self.launcher.close(self.stop_reason or "coordinator shutdown")  # normally nothing is left
        self.metrics.stop()
        for monitor in (self.monitor, self.wmonitor):
            if monitor is not None:
                monitor.close()
        self.monitor = self.wmonitor = None
        if self.csock is not None:
            self.csock.close(linger=1000)  # let the last replies (results, the stop's ok) flush
        if self.wsock is not None:
            self.wsock.close(linger=0)
        self.csock = self.wsock = None
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
        log.info("stopped: %s", self.stop_reason or "done")

    # ------------------------------------------------------------------ jobs

    def _enqueue(self, pool: Pool, job: Job, front: bool = False) -> None:
        (pool.queue.appendleft if front else pool.queue.append)(job)
        self.queued_total += 1

    def _dispatch(self, pool: Pool) -> None:
        queue = pool.queue
        while queue:
            slot = pool.pick_slot()
            if slot is None:
                return
            job = queue.popleft()
            self.queued_total -= 1
            job.set_state(JS.RUNNING)
            job.slot, job.incarnation = slot, slot.incarnation
            job.started_at = time.monotonic()
            slot.inflight[job.jid] = job
            if slot.state == WS.READY:
                slot.set_state(WS.BUSY)
            self._out.append((self.wsock, (slot.leader.data_id,),
                              self.codec.encode(WRun(job.jid, job.input, job.stream))))
            if job.crashes:  # a retry: logged so that recovery is visible (and measured by the bench)
                log.info("job %d: attempt %d dispatched to %s", job.jid, len(job.crashes) + 1,
                         slot.name, extra={"wid": slot.name, "pool": slot.spec.pool})

    def _send_out(self) -> None:
        out, self._out = self._out, []
        for sock, route, body in out:
            _send_frames(sock, route, body)

    def _finish(self, job: Job, state: JS, reply) -> None:
        """The one place a job ends: exactly one terminal reply, then forget it."""
        job.set_state(state)
        job.input = None  # the timeout heap may hold the job until its deadline: not its payload
        self.jobs.pop((job.client, job.cid), None)
        self.per_client[job.client] -= 1
        if self.per_client[job.client] <= 0:
            del self.per_client[job.client]
        self._reply(job.client, reply)
        pool = self.pools[job.pool]
        pool.record_done(state == JS.DONE)
        self.metrics.job_finished(job, state, reply)

    def _abort(self, job: Job, state: JS, code: str, message: str) -> None:
        """End a job that has not finished (cancel, timeout, drain expiry)."""
        if job.finished:
            return
        if job.state == JS.QUEUED:
            self.pools[job.pool].queue.remove(job)
            self.queued_total -= 1
        elif job.state == JS.RUNNING and job.slot is not None:
            # It stays in the slot's in-flight set (holding its credit) until the worker reports.
            leader = job.slot.leader
            if leader is not None and leader.ctl_id in self.sup.by_id:
                self._send_worker(leader.ctl_id, WCancel(job.jid))
        self._finish(job, state, Error(job.cid, code, message))

    def _expire_jobs(self, now: float) -> None:
        while self.timeouts and self.timeouts[0][0] <= now:
            _, _, job = heapq.heappop(self.timeouts)
            self._abort(job, JS.FAILED, E.TIMEOUT, "job timeout passed before it finished")

    # ------------------------------------------------------------------ worker socket

    def _send_worker(self, identity: bytes, msg) -> None:
        _send_frames(self.wsock, (identity,), self.codec.encode(msg))

    def _on_worker(self) -> None:
        now = time.monotonic()
        for _ in range(RECV_BATCH):
            try:
                frames = self.wsock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            entry = self.sup.by_id.get(frames[0])
            if entry is None:
                continue  # a process already declared dead: its late messages are dropped
            slot, proc = entry
            proc.last_seen = now
            msg = self.wcodec.decode(frames[-1])
            handler = self._worker_ops.get(type(msg))
            if handler is not None:
                handler(self, slot, proc, msg)

    def _w_result(self, slot, proc, msg: WResult) -> None:
        job = self._settle_job(slot, msg.jid)
        if job is not None:
            slot.completed += 1
            meta = {"worker": slot.name, "attempts": len(job.crashes) + 1, "run_ms": msg.run_ms}
            self._finish(job, JS.DONE, Result(job.cid, msg.output, meta))

    def _w_error(self, slot, proc, msg: WError) -> None:
        job = self._settle_job(slot, msg.jid)
        if job is not None:
            slot.failed += 1
            state = JS.CANCELLED if msg.code == E.CANCELLED else JS.FAILED
            self._finish(job, state, Error(job.cid, msg.code, msg.message, msg.details))

    def _w_chunk(self, slot, proc, msg: WChunk) -> None:
        job = slot.inflight.get(msg.jid)
        if job is None or job.finished:
            return
        if job.first_chunk_at is None:
            job.first_chunk_at = time.monotonic()
        self._reply(job.client, Chunk(job.cid, job.chunks_sent, msg.data))
        job.chunks_sent += 1

    def _settle_job(self, slot, jid: int) -> Job | None:
        """Return the slot's credit for `jid`; the job if it still awaits its reply."""
        job = slot.inflight.pop(jid, None)
        self.sup.on_job_settled(slot)
        self._dispatch(self.pools[slot.spec.pool])
        if job is None or job.finished:
            return None  # cancelled or timed out already: its one reply was sent
        return job

    def _w_hello(self, slot, proc, msg) -> None:
        self.sup.on_hello(slot, proc)

    def _w_ready(self, slot, proc, msg) -> None:
        self.sup.on_ready(slot, proc, msg)

    def _w_heartbeat(self, slot, proc, msg) -> None:
        self.sup.on_heartbeat(proc, msg)

    def _w_fatal(self, slot, proc, msg) -> None:
        self.sup.on_fatal(slot, proc, msg)

    def _w_group(self, slot, proc, msg) -> None:
        self.sup.on_group_report(slot, msg)

    _worker_ops = {WResult: _w_result, WError: _w_error, WChunk: _w_chunk, WHello: _w_hello,
                   WReady: _w_ready, WHeartbeat: _w_heartbeat, WFatal: _w_fatal,
                   WGroupReport: _w_group}

    # ------------------------------------------------------------------ supervision callbacks

    def _on_slot_down(self, slot, reason: str, code: str | None) -> None:
        """Requeue (or fail) the jobs a dead slot held, oldest first at the front of the queue."""
        pool = self.pools[slot.spec.pool]
        jobs = sorted((j for j in slot.inflight.values() if not j.finished), key=lambda j: j.jid)
        slot.inflight.clear()
        for job in reversed(jobs):
            self._requeue_or_fail(pool, slot, job, reason, code)
        self._dispatch(pool)
        self._fail_if_unservable(pool)

    def _requeue_or_fail(self, pool: Pool, slot, job: Job, reason: str, code: str | None) -> None:
        job.crashes.append(reason)
        job.slot = None
        if self.state == CS.STOPPING:
            self._finish(job, JS.FAILED, Error(job.cid, E.SHUTTING_DOWN, "coordinator stopped"))
        elif len(job.crashes) > job.retries:
            fail_code = E.COLLECTIVE_MISMATCH if code == E.COLLECTIVE_MISMATCH else E.WORKER_CRASHED
            self._finish(job, JS.FAILED, Error(
                job.cid, fail_code, f"job failed on {len(job.crashes)} worker(s) (retries="
                f"{job.retries}): " + "; ".join(job.crashes), {"reasons": job.crashes}))
        elif job.chunks_sent and not slot.replay_safe:
            self._finish(job, JS.FAILED, Error(
                job.cid, E.WORKER_CRASHED, f"worker died after streaming {job.chunks_sent} chunk(s) "
                f"({reason}); the handler is not replay-safe, so the job was not replayed"))
        else:
            job.set_state(JS.QUEUED)
            self._enqueue(pool, job, front=True)

    def _on_slot_change(self, slot) -> None:
        pool = self.pools[slot.spec.pool]
        self._dispatch(pool)
        self._fail_if_unservable(pool)

    def _fail_if_unservable(self, pool: Pool) -> None:
        if pool.queue and not pool.can_ever_serve():
            for job in list(pool.queue):
                self._abort(job, JS.FAILED, E.UNAVAILABLE, f"pool {pool.name} has no live workers")

    # ------------------------------------------------------------------ scale

    def scale(self, pool: Pool, replicas: int) -> None:
        """Set the desired replica count and reconcile at once. Raises ValueError, changing nothing,
        when the pool's free devices cannot hold it."""
        start, drain = pool.plan_scale(replicas)
        pool.desired = replicas
        cores = split_cores(available_cores(), max(len(pool.groups) * pool.cfg.tp, 1))
        for index in start:
            ranks = [cores[(index * pool.cfg.tp + r) % len(cores)] for r in range(pool.cfg.tp)]
            self._start_new_slot(pool, index, ranks)
        for slot in drain:
            self.sup.drain_slot(slot, f"scale {pool.name} to {replicas}")
        log.info("pool %s: scale to %d (start %s, drain %s)", pool.name, replicas, start,
                 [s.name for s in drain], extra={"pool": pool.name})

    # ------------------------------------------------------------------ stop

    def _on_signal_fd(self) -> None:
        try:
            self._sig_r.recv(512)
        except BlockingIOError:
            pass
        while self._signals:
            signum = self._signals.pop(0)
            name = signal.Signals(signum).name
            if self.state == CS.RUNNING:
                self.request_stop(f"received {name}", drain=True)
            elif self.state == CS.DRAINING and signum == signal.SIGINT:
                self.request_stop(f"received {name} again", drain=False)

    def request_stop(self, reason: str, drain: bool = True) -> None:
        """Stop accepting jobs; with drain, let accepted ones finish (up to drain_timeout) first."""
        if self.state in (CS.STOPPING, CS.STOPPED):
            return
        self.stop_reason = reason
        if drain and self.state == CS.RUNNING:
            log.info("draining (%s): %d unfinished job(s), up to %.0f s", reason, len(self.jobs),
                     self.cfg.drain_timeout)
            move(self, CS.DRAINING, COORDINATOR_TRANSITIONS)
            self.drain_deadline = time.monotonic() + self.cfg.drain_timeout
            return
        self._stop_workers(reason)

    def _check_drained(self, now: float) -> None:
        if self.jobs and now < self.drain_deadline:
            return
        if self.jobs:
            log.warning("drain timeout: failing %d unfinished job(s)", len(self.jobs))
        self._stop_workers(self.stop_reason or "stop")

    def _stop_workers(self, reason: str) -> None:
        for job in list(self.jobs.values()):
            self._abort(job, JS.FAILED, E.SHUTTING_DOWN, f"coordinator stopping: {reason}")
        move(self, CS.STOPPING, COORDINATOR_TRANSITIONS)
        self.sup.stopping = True
        for pool in self.pools.values():
            for slot in pool.slots.values():
                self.sup.stop_slot(slot, reason)
