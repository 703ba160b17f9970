"""Prometheus metrics for `orchestrator serve --metrics-port P` (P = 0 picks a free port).

Counters and histograms are updated by the coordinator's hooks as jobs end; gauges are copied from
a snapshot in `tick()`, at most every REFRESH seconds. prometheus_client answers scrapes on its
own thread, and that thread only ever reads the metric objects (each has its own lock). It never walks
the coordinator's pools, slots or jobs: those belong to the event loop, so the loop publishes, from a
snapshot (snapshot.py) it builds.

Every metric is documented in README.md ("Metrics").
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from protocol.messages import Error
from orchestrator.observe import views
from orchestrator.states import JobState, SlotState

log = logging.getLogger("orchestrator.metrics")

REFRESH = 0.5  # seconds between gauge refreshes (a scrape sees values at most this old)
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
POOL_HEALTH = ("ready", "degraded", "unavailable", "failed")


class _Published:
    """A gauge whose series are replaced wholesale on each refresh. A series not published again is
    removed, so a dead worker's heartbeat age or a gone device does not linger as a stale number."""

    def __init__(self, gauge: Gauge):
        self.gauge = gauge
        self.last: set = set()

    def publish(self, values: dict) -> None:
        for labels, value in values.items():
            self.gauge.labels(*labels).set(value)
        for labels in self.last - values.keys():
            self.gauge.remove(*labels)
        self.last = set(values)


def completion_tokens(output) -> int:
    """Tokens a generate-style result reports in `usage.completion_tokens` (0 when absent)."""
    usage = output.get("usage") if isinstance(output, dict) else None
    n = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


class PrometheusMetrics:
    """The coordinator's metrics hooks, exported over HTTP. Construct cheaply; `start()` binds."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.url: str | None = None  # http://host:port/metrics once started
        self.registry = CollectorRegistry()
        self._server = self._thread = None
        self._next_refresh = 0.0
        self._define_job_metrics(self.registry)
        self._define_state_gauges(self.registry)

    def _define_job_metrics(self, r: CollectorRegistry) -> None:
        self.accepted = Counter("orchestrator_jobs_accepted", "Jobs accepted into a pool's queue",
                                ["pool"], registry=r)
        self.jobs = Counter("orchestrator_jobs", "Jobs ended, by outcome (done, failed, cancelled)",
                            ["pool", "outcome"], registry=r)
        self.errors = Counter("orchestrator_job_errors", "Jobs ended with an error reply, by error code",
                              ["pool", "code"], registry=r)
        self.queue_wait = Histogram("orchestrator_job_queue_wait_seconds",
                                    "Accepted until (last) dispatched to a worker", ["pool"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.run_time = Histogram("orchestrator_job_run_seconds", "Dispatched until the result, done jobs",
                                  ["pool"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("orchestrator_job_latency_seconds", "Accepted until the result, done jobs",
                                 ["pool"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("orchestrator_time_to_first_token_seconds",
                              "Accepted until the first stream chunk, streamed jobs", ["pool"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.tokens = Counter("orchestrator_generated_tokens", "Tokens generated (usage.completion_tokens "
                              "of results)", ["pool"], registry=r)
        self.restarts = Counter("orchestrator_worker_restarts", "Times a worker slot was declared down "
                                "(exit, lost heartbeat, stuck step) and restarted or failed",
                                ["pool", "worker"], registry=r)

    def _define_state_gauges(self, r: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, labels: list) -> _Published:
            return _Published(Gauge(name, doc, labels, registry=r))

        self.queue_depth = gauge("orchestrator_queue_depth", "Jobs waiting in the pool's queue", ["pool"])
        self.inflight = gauge("orchestrator_jobs_inflight", "Jobs running on the pool's workers", ["pool"])
        self.pool_health = gauge("orchestrator_pool_health", "1 for the pool's current health (ready, "
                                 "degraded, unavailable, failed), 0 for the others", ["pool", "status"])
        self.worker_state = gauge("orchestrator_worker_state", "1 for the worker slot's current state, "
                                  "0 for the others", ["pool", "worker", "state"])
        self.worker_inflight = gauge("orchestrator_worker_inflight", "Jobs in flight on the worker",
                                     ["pool", "worker"])
        self.heartbeat_age = gauge("orchestrator_worker_heartbeat_age_seconds", "Seconds since the worker "
                                   "last sent anything (largest over its ranks)", ["pool", "worker"])
        self.step_age = gauge("orchestrator_worker_step_age_seconds", "Seconds the worker's current step "
                              "has run; 0 when idle", ["pool", "worker"])
        self.rss = gauge("orchestrator_worker_rss_bytes", "Resident memory of the worker's processes",
                         ["pool", "worker"])
        self.gpu_used = gauge("orchestrator_gpu_memory_used_bytes", "GPU memory in use, as the worker "
                              "reports it", ["pool", "worker", "device"])
        self.gpu_total = gauge("orchestrator_gpu_memory_total_bytes", "GPU memory in total",
                               ["pool", "worker", "device"])
        self.worker_node = gauge("orchestrator_worker_node", "1 for each host and Ray node a worker slot's "
                                 "live ranks run on (node empty when launched locally)",
                                 ["pool", "worker", "host", "node"])

    # ------------------------------------------------------------------ lifecycle

    def start(self, snapshot: Callable) -> None:
        """Bind the HTTP endpoint (port 0 picks a free one: read `url`). Raises ValueError if it can't."""
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as e:
            raise ValueError(f"cannot serve metrics on {self.host}:{self.port}: {e.strerror or e}") from e
        host, port = self._server.server_address[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
        log.info("metrics: serving on %s", self.url)
        self.tick(snapshot, time.monotonic())

    def stop(self) -> None:
        """Close the HTTP endpoint. Idempotent; safe if `start()` never ran."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    # ------------------------------------------------------------------ hooks (event loop thread)

    def job_accepted(self, pool: str) -> None:
        self.accepted.labels(pool).inc()

    def job_finished(self, job, state: JobState, reply) -> None:
        now = time.monotonic()
        pool = job.pool
        self.jobs.labels(pool, state.value).inc()
        if isinstance(reply, Error):
            self.errors.labels(pool, reply.code).inc()
        if job.started_at is not None:
            self.queue_wait.labels(pool).observe(job.started_at - job.accepted_at)
        if job.stream and job.first_chunk_at is not None:
            self.ttft.labels(pool).observe(job.first_chunk_at - job.accepted_at)
        if state == JobState.DONE:
            self.run_time.labels(pool).observe(now - job.started_at)
            self.latency.labels(pool).observe(now - job.accepted_at)
            tokens = completion_tokens(reply.output)
            if tokens:
                self.tokens.labels(pool).inc(tokens)

    def worker_restart(self, pool: str, slot: str) -> None:
        self.restarts.labels(pool, slot).inc()

    def tick(self, snapshot: Callable, now: float) -> None:
        """Refresh the gauges from `snapshot()` (a snapshot.Snapshot), at most every REFRESH s."""
        if now < self._next_refresh:
            return
        self._next_refresh = now + REFRESH
        snap = snapshot()
        self._refresh_pools(snap)
        self._refresh_workers(snap)

    # ------------------------------------------------------------------ gauges

    def _refresh_pools(self, snap) -> None:
        depth, inflight, health = {}, {}, {}
        for name, pool in snap.pools.items():
            depth[(name,)] = pool.queued
            inflight[(name,)] = pool.running
            health.update({(name, h): int(h == pool.health) for h in POOL_HEALTH})
        self.queue_depth.publish(depth)
        self.inflight.publish(inflight)
        self.pool_health.publish(health)

    def _refresh_workers(self, snap) -> None:
        state, inflight, hb, step, rss, used, total, where = {}, {}, {}, {}, {}, {}, {}, {}
        for name, pool in snap.pools.items():
            for w in pool.workers:
                v = views.worker_view(w)
                key = (name, w.name)
                state.update({(*key, s.value): int(s == w.state) for s in SlotState})
                inflight[key] = v["inflight"]
                where.update({(*key, r["host"] or "", r["node"] or ""): 1 for r in v["ranks"] if r["alive"]})
                if v["heartbeat_age"] is not None:  # no live process: no heartbeat to age
                    hb[key] = v["heartbeat_age"]
                    step[key] = v["step_age"] or 0.0
                if v["rss_bytes"] is not None:
                    rss[key] = v["rss_bytes"]
                for g in v["gpu_memory"]:
                    used[(*key, str(g["device"]))] = g["used_bytes"]
                    total[(*key, str(g["device"]))] = g["total_bytes"]
        for gauge, values in ((self.worker_state, state), (self.worker_inflight, inflight),
                              (self.heartbeat_age, hb), (self.step_age, step), (self.rss, rss),
                              (self.gpu_used, used), (self.gpu_total, total), (self.worker_node, where)):
            gauge.publish(values)
