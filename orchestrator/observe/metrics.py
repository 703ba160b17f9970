"""Metrics hooks called by the coordinator's event loop. `NullMetrics` when no --metrics-port is set."""
from __future__ import annotations


class NullMetrics:
    """Every hook is a no-op; the coordinator calls them unconditionally."""

    url: str | None = None  # where metrics are served (none here)

    def start(self, snapshot) -> None: ...

    def stop(self) -> None: ...

    def tick(self, snapshot, now: float) -> None: ...

    def job_accepted(self, pool: str) -> None: ...

    def job_finished(self, job, state, reply) -> None: ...

    def worker_restart(self, pool: str, slot: str) -> None: ...


def make_metrics(cfg):
    if cfg.metrics_port is None:
        return NullMetrics()
    from orchestrator.observe.prometheus import PrometheusMetrics  # imported only when enabled

    return PrometheusMetrics(cfg.metrics_host, cfg.metrics_port)
