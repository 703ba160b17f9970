"""`status` and `health` answers, rendered from a `Snapshot` (snapshot.py) alone.

The snapshot is built on the event loop from in-memory state, so these answer while every worker is
busy or hung: no I/O, no locks, no waiting on a worker.
"""
from __future__ import annotations

from orchestrator.observe.snapshot import PoolSnapshot, RankSnapshot, Snapshot, WorkerSnapshot
from orchestrator.states import SlotState as WS


def _rank_view(r: RankSnapshot) -> dict:
    return {"rank": r.rank, "pid": r.pid, "alive": r.alive, "host": r.host, "node": r.node,
            "heartbeat_age": r.heartbeat_age, "step_age": r.step_age, "rss_bytes": r.rss_bytes,
            "gpu_memory": r.gpu_memory, "guard": r.guard, "transfers": r.transfers}


def _oldest(ranks: list, key: str) -> float | None:
    """The worst (largest) age over a slot's live ranks: a TP group is as alive as its slowest rank."""
    return max((getattr(r, key) for r in ranks if getattr(r, key) is not None), default=None)


def worker_view(w: WorkerSnapshot) -> dict:
    live = [r for r in w.ranks if r.alive]
    rss = [r.rss_bytes for r in live if r.rss_bytes is not None]
    return {
        "name": w.name,
        "state": w.state.value,
        "devices": list(w.devices),
        "pids": [r.pid for r in live],
        "hosts": sorted({r.host for r in live if r.host}),
        "nodes": sorted({r.node for r in live if r.node}),  # Ray node ids; [] when launched locally
        "inflight": w.running,  # running jobs; these add up to the pool's `inflight`
        "awaiting_ack": w.awaiting_ack,  # ended jobs still holding a credit until the worker answers
        "capacity": w.capacity,
        "completed": w.completed,
        "failed": w.failed,
        "restarts": w.restarts,
        "last_exit_reason": w.last_exit_reason,
        "heartbeat_age": _oldest(live, "heartbeat_age"),
        "step_age": _oldest(live, "step_age"),
        "state_age": w.state_age,
        "rss_bytes": sum(rss) if rss else None,
        "gpu_memory": [g for r in live for g in r.gpu_memory],
        "ranks": [_rank_view(r) for r in w.ranks],
        "info": w.info,
        "failure": w.failure,
    }


def _shown(p: PoolSnapshot) -> list:
    return [w for w in p.workers if w.state != WS.STOPPED]


def pool_view(p: PoolSnapshot) -> dict:
    return {
        "handler": p.handler,
        "tp": p.tp,
        "desired": p.desired,
        "health": p.health,
        "queue_depth": p.queued,
        "inflight": p.running,
        "completed": p.completed,
        "failed": p.failed,
        "cancelled": p.cancelled,
        "throughput_1m": p.throughput_1m,
        "queue_size": p.queue_size,
        "reason": p.reason,
        "workers": [worker_view(w) for w in _shown(p)],
    }


def status(snap: Snapshot) -> dict:
    return {
        "state": snap.state,
        "endpoint": snap.endpoint,
        "pid": snap.pid,
        "uptime": snap.uptime,
        "jobs_unfinished": snap.jobs_unfinished,
        "rejected": snap.rejected,
        "limits": snap.limits,
        "pools": {name: pool_view(p) for name, p in snap.pools.items()},
    }


HEALTH_KEYS = ("state", "state_age", "heartbeat_age", "step_age", "inflight", "restarts",
               "last_exit_reason", "failure")


def health(snap: Snapshot) -> dict:
    """Liveness of the coordinator itself, readiness per pool, and per worker: state, heartbeat age
    (is it alive?) and step age (is it making progress?).

    A hung process shows a heartbeat age that grows until `heartbeat_timeout`, when it is declared
    dead; a worker in a long step shows a fresh heartbeat and a growing step age.
    """
    pools = {}
    for name, p in snap.pools.items():
        workers = {}
        for w in _shown(p):
            v = worker_view(w)
            workers[w.name] = {k: v[k] for k in HEALTH_KEYS}
        pools[name] = {"status": p.health, "reason": p.reason, "workers": workers}
    states = {p["status"] for p in pools.values()}
    overall = "ready" if states == {"ready"} else \
        "unavailable" if states <= {"unavailable", "failed"} else "degraded"
    return {"alive": True, "state": snap.state, "status": overall,
            "heartbeat_timeout": snap.heartbeat_timeout, "limits": snap.limits, "pools": pools}


__all__ = ["status", "health", "worker_view", "pool_view"]
