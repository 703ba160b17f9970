"""The coordinator: one event loop over the client socket, the worker socket, process fds and timers.

It wires the parts and runs the loop; the parts decide: ClientOps (client requests), Dispatcher (jobs
to and from workers), JobTable (every job and its counts), Fleet (start, scale, stop), Supervisor (slot
lifecycle) over a Launcher (processes). It never imports torch and never blocks on a worker: every
socket is read with NOBLOCK after a poll, and every wait (drain, restart backoff, staged stop, job
timeout) is a timer checked by the loop.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time

import zmq

from protocol import Codec, errors as E
from protocol.codec import INTERNAL_LIMITS
from protocol.messages import CLIENT_REQUEST_OPS
from orchestrator.launch import cluster
from orchestrator.security import curve as security
from orchestrator.security.refusals import HandshakeMonitor
from orchestrator.observe import snapshot
from orchestrator.core.client_ops import ClientOps, replier
from orchestrator.config import ServerConfig, validate
from orchestrator.core.dispatch import Dispatcher
from orchestrator.core.jobtable import JobTable
from orchestrator.core.eventloop import EventLoop, Outbox, Signals, send_frames
from orchestrator.fleet.fleet import Fleet
from orchestrator.http.supervise import Gateway  # [http gateway hook] no web framework: that lives in the gateway process
from orchestrator.launch.local import LocalLauncher
from orchestrator.observe.metrics import make_metrics
from orchestrator.fleet.pools import Pool
from orchestrator.states import COORDINATOR_TRANSITIONS, CoordinatorState as CS, move
from orchestrator.fleet.supervisor import Supervisor

log = logging.getLogger("orchestrator.coordinator")

TICK = 0.05  # timer resolution (heartbeats, watchdogs, timeouts) in seconds
RECONCILE_S = 1.0  # how often each pool is moved toward its desired replica count
EXIT_STARTUP_FAILED = 2  # a pool failed while loading at startup (and keep_going is off)


class Coordinator:
    """Construct cheaply; `start()` binds and spawns; `run()` serves until stopped."""

    def __init__(self, cfg: ServerConfig, launcher=None, on_startup=None):
        validate(cfg)
        self.cfg = cfg
        self.name = "coordinator"
        self.state = CS.RUNNING
        # Client socket: only client requests decode (a reply or `w_*` op from a client is `unknown_op`);
        # a job's input is forwarded unread, as bytes.
        self.codec = Codec(cfg.limits, opaque_input=True, accept=CLIENT_REQUEST_OPS)
        # Worker traffic is private and already passed the client limits on its way in; a result
        # may be larger than the request (and must never crash the loop by being so).
        self.wcodec = Codec(INTERNAL_LIMITS)
        self.launcher = launcher or LocalLauncher()
        self.metrics = make_metrics(cfg)
        self.out = Outbox()
        self.pools: dict[str, Pool] = {}
        self.started_at = time.monotonic()
        self.drain_deadline: float | None = None
        self.stop_reason: str | None = None
        # Created by start(); None until then so shutdown() is safe after a failed start.
        self.zctx = self.auth = self.csock = self.wsock = self.loop = self.monitor = None
        self.endpoint = self.worker_endpoint = self.run_dir = None
        self.sup = self.table = self.dispatcher = self.fleet = self.client = self.signals = None
        self._reply = None  # set by _wire(): queues a message to a client for the turn's flush
        # Debug/test mode: the job table's and the slots' invariants are checked after every loop turn,
        # and a violation stops the coordinator (tests run with it on; it costs O(jobs) per turn).
        self.validate = os.environ.get("ORCHESTRATOR_VALIDATE") == "1"
        self.wmonitor: HandshakeMonitor | None = None  # Ray mode: refusals on the worker socket
        self.worker_keys: security.WorkerKeys | None = None  # Ray mode: the worker socket's CURVE keys
        # Startup: every pool's first load settles (served or failed), then on_startup({pool: reason})
        # is called once; a failure without keep_going stops everything and run() returns 2.
        self.on_startup = on_startup
        self.starting = True
        self.exit_code = 0
        self._next_reconcile = 0.0
        self.gateway = Gateway(cfg) if cfg.http.port is not None else None  # [http gateway hook]

    # ------------------------------------------------------------------ start

    def start(self) -> str:
        """Bind sockets, spawn every pool's workers. Returns the client endpoint actually bound."""
        self.pools = {p.name: Pool(p) for p in self.cfg.pools}  # raises ValueError on bad placement
        self.run_dir = tempfile.mkdtemp(prefix="orchestrator-", dir=self.cfg.run_dir)
        os.chmod(self.run_dir, 0o700)  # only this user may reach the worker socket
        if self.cfg.ray is not None:  # Ray mode: join the cluster (ValueError if we cannot)
            self.worker_keys = security.WorkerKeys(self.run_dir)
            self.launcher = cluster.make_launcher(self.cfg, self.run_dir, self.worker_keys)
        self.zctx = zmq.Context()
        self.auth = security.setup(self.zctx, self.cfg, self.worker_keys)
        self.csock = self._bind_client()
        self.wsock = self._bind_workers()
        self.loop = EventLoop()
        self.monitor = HandshakeMonitor(self.csock, self.csock.getsockopt(zmq.MAXMSGSIZE))
        self.loop.add(self.monitor.sock, self.monitor.on_readable)
        if self.wmonitor is not None:
            self.loop.add(self.wmonitor.sock, self.wmonitor.on_readable)
        self._wire()
        self.signals = Signals(self.loop, self._on_signal)
        cluster.reserve(self.cfg, self.launcher, self.pools)  # Ray: every first slot placed, or ValueError
        self.fleet.start()
        self.metrics.start(self.snapshot)
        if self.gateway is not None:  # [http gateway hook] a ZMQ client of ours, in its own process
            self.gateway.start(self.loop, self.endpoint, {p.name: p.cfg.handler for p in self.pools.values()},
                               self.metrics.url)
        return self.endpoint

    def _wire(self) -> None:
        self._reply = reply = replier(self.csock, self.codec, self.out)
        # The supervisor and the table report to the dispatcher, built last, which needs both.
        self.sup = Supervisor(self.cfg, self.worker_endpoint, self._send_worker, self.launcher, self.loop,
                              lambda *a: self.dispatcher.slot_down(*a), self._slot_changed, self.metrics)
        self.table = JobTable(self.pools, self._job_ended, lambda *a: self.dispatcher.cancel_running(*a))
        self.dispatcher = Dispatcher(self.pools, self.table, self.wsock, self.codec, self.wcodec, self.out,
                                     reply, self.sup)
        self.fleet = Fleet(self.pools, self.sup)
        self.client = ClientOps(self.cfg, self.csock, self.codec, reply, self.table, self.pools,
                                self.dispatcher.dispatch, self.fleet.scale, self.fleet.reload,
                                self.request_stop, lambda: self.state, self.snapshot, self.metrics)
        self.loop.add(self.csock, self.client.on_readable)
        self.loop.add(self.wsock, self.dispatcher.on_readable)

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
        if self.worker_keys is not None:  # Ray mode: TCP, so only this run's worker key may connect
            self.worker_keys.apply_server(sock)
            self.wmonitor = HandshakeMonitor(sock, 0, who="worker", log_closes=False)
        sock.bind(cluster.worker_bind_address(self.cfg, self.run_dir, self.launcher))
        self.worker_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.worker_keys is not None:
            log.info("worker socket %s: CURVE, this run's worker key only", self.worker_endpoint)
        return sock

    def _job_ended(self, job, state, message) -> None:
        """The JobTable ended a job: its one reply goes out."""
        self._reply(job.client, message)
        self.metrics.job_finished(job, state, message)

    def _send_worker(self, identity: bytes, msg) -> None:
        """Control messages (ping, stop, cancel, group info) go at once, not with the turn's batch."""
        send_frames(self.wsock, (identity,), self.codec.encode(msg))

    def snapshot(self) -> snapshot.Snapshot:
        """The state `status`, `health` and the metrics read (built on the loop thread)."""
        now = time.monotonic()
        return snapshot.take(self.state.value, self.endpoint, now - self.started_at, self.cfg.hb_timeout,
                             self.client.rejected, self.pools, self.table, now,
                             snapshot.config_limits(self.cfg))

    def validate_state(self) -> None:
        """Raise AssertionError unless the job table and every slot agree (ORCHESTRATOR_VALIDATE=1)."""
        slots = self.fleet.slots()
        self.table.validate_state({name: [s for s in slots if s.spec.pool == name] for name in self.pools})
        for slot in slots:
            slot.validate_state()

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
                if self.out:
                    self.out.flush()
                if self.validate:
                    self.validate_state()
        finally:
            self.shutdown()
        return self.exit_code

    def _tick(self, now: float) -> None:
        self.sup.tick(self.fleet.slots(), now)
        if self.starting:
            self._check_startup()
        if now >= self._next_reconcile and self.state == CS.RUNNING:
            self._next_reconcile = now + RECONCILE_S
            self.fleet.reconcile(now)
        self.table.expire(now)
        for monitor in (self.monitor, self.wmonitor):
            if monitor is not None:  # suppressed-refusal counts reach the log without a next refusal
                monitor.flush()
        if self.state == CS.SHUTTING_DOWN:
            self._check_drained(now)
        if self.state == CS.STOPPING and self.fleet.stopped():
            move(self, CS.STOPPED, COORDINATOR_TRANSITIONS)
        self.metrics.tick(self.snapshot, now)
        if self.gateway is not None:  # [http gateway hook] restart it if it died (not while stopping)
            self.gateway.tick(now, stopping=self.state in (CS.STOPPING, CS.STOPPED))

    def shutdown(self) -> None:
        """Kill anything still running, close sockets, remove the run directory. Idempotent."""
        if self.gateway is not None:  # [http gateway hook] first, while it can still reach us
            self.gateway.stop(self.stop_reason or "coordinator shutdown")
        self.launcher.close(self.stop_reason or "coordinator shutdown")  # normally nothing is left
        self.metrics.stop()
        for monitor in (self.monitor, self.wmonitor):
            if monitor is not None:
                monitor.close()
        self.monitor = self.wmonitor = None
        if self.csock is not None:
            if self.out:
                self.out.flush()  # the last replies (results, the stop's ok)
            self.csock.close(linger=1000)  # let them reach the clients
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

    # ------------------------------------------------------------------ startup

    def _slot_changed(self, slot) -> None:
        self.dispatcher.slot_changed(slot)
        if self.starting:  # now, not at the next tick: no client may see a pool ready before the outcome
            self._check_startup()

    def _check_startup(self) -> None:
        """Once every pool's first load settled: report, and without keep_going stop on a failure."""
        settled, failures = self.fleet.startup_outcome()
        if not settled and self.state == CS.RUNNING:
            return
        self.starting = False
        for name, why in failures.items():
            log.error("pool %s failed to start: %s", name, why, extra={"pool": name})
        if self.on_startup is not None:
            self.on_startup(failures)
        if failures and not self.cfg.keep_going and self.state == CS.RUNNING:
            self.exit_code = EXIT_STARTUP_FAILED
            self.request_stop(f"pool(s) {sorted(failures)} failed to start", drain=False)

    # ------------------------------------------------------------------ stop

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.state == CS.RUNNING:
            self.request_stop(f"received {name}", drain=True)
        elif self.state == CS.SHUTTING_DOWN and signum == signal.SIGINT:
            self.request_stop(f"received {name} again", drain=False)

    def request_stop(self, reason: str, drain: bool = True) -> None:
        """Stop accepting jobs; with drain, let accepted ones finish (up to drain_timeout) first."""
        if self.state in (CS.STOPPING, CS.STOPPED):
            return
        self.stop_reason = reason
        if drain and self.state == CS.RUNNING:
            log.info("draining (%s): %d unfinished job(s), up to %.0f s", reason,
                     self.table.unfinished(), self.cfg.drain_timeout)
            move(self, CS.SHUTTING_DOWN, COORDINATOR_TRANSITIONS)
            self.drain_deadline = time.monotonic() + self.cfg.drain_timeout
            return
        self._stop_workers(reason)

    def _check_drained(self, now: float) -> None:
        unfinished = self.table.unfinished()
        if unfinished and now < self.drain_deadline:
            return
        if unfinished:
            log.warning("drain timeout: failing %d unfinished job(s)", unfinished)
        self._stop_workers(self.stop_reason or "stop")

    def _stop_workers(self, reason: str) -> None:
        self.table.end_all(E.SHUTTING_DOWN, f"coordinator stopping: {reason}")
        move(self, CS.STOPPING, COORDINATOR_TRANSITIONS)
        self.fleet.stop(reason)
