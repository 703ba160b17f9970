"""`status` and `health` answers, built from coordinator state alone (workers are never asked).

Both run on the event loop between two socket reads, so they only read in-memory state: no I/O, no
locks, no waiting on a worker. That is why they answer while every worker is busy or hung.
"""
from __future__ import annotations

import os
import time

from .states import LIVE, SERVING, WorkerState as WS

# Slots that are supposed to be serving but cannot: they make a pool `degraded`.
UNHEALTHY = {WS.DEAD, WS.STUCK, WS.RESTARTING, WS.FAILED, WS.STARTING, WS.LOADING}


def _rounded(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _proc_view(p, now: float) -> dict:
    stats = p.stats or {}
    return {"rank": p.rank, "pid": p.handle.pid, "alive": p.alive,
            "host": p.handle.host, "node": p.handle.node,
            "heartbeat_age": round(now - p.last_seen, 3) if p.alive else None,
            "step_age": _rounded(p.current_step_age(now)) if p.alive else None,
            "rss_bytes": stats.get("rss_bytes"), "gpu_memory": stats.get("gpu") or [],
            "guard": stats.get("guard")}  # TP ranks: collective guard cost per step (worker/guard.py)


def _oldest(procs: list, key: str) -> float | None:
    """The worst (largest) age over a slot's live ranks: a TP group is as alive as its slowest rank."""
    return max((p[key] for p in procs if p[key] is not None), default=None)


def slot_view(slot, now: float) -> dict:
    procs = [_proc_view(p, now) for p in slot.procs]
    live = [p for p in procs if p["alive"]]
    rss = [p["rss_bytes"] for p in live if p["rss_bytes"] is not None]
    return {
        "name": slot.name,
        "state": slot.state.value,
        "devices": list(slot.spec.devices),
        # Where it runs: this host (node None), or the Ray node the cluster placed it on.
        "host": slot.handle.host if slot.handle else None,
        "node": slot.handle.node if slot.handle else None,
        "pids": [p["pid"] for p in live],
        "inflight": len(slot.inflight),
        "capacity": slot.capacity,
        "completed": slot.completed,
        "failed": slot.failed,
        "restarts": max(slot.incarnation - 1, 0),
        "last_exit_reason": slot.last_exit_reason,
        "heartbeat_age": _oldest(live, "heartbeat_age"),
        "step_age": _oldest(live, "step_age"),
        "state_age": round(now - slot.state_since, 3),
        "rss_bytes": sum(rss) if rss else None,
        "gpu_memory": [g for p in live for g in p["gpu_memory"]],
        "ranks": procs,
        "info": slot.info,
    }


def _slots(pool) -> list:
    return sorted((s for s in pool.slots.values() if s.state != WS.STOPPED), key=lambda s: s.spec.index)


def pool_view(pool, now: float) -> dict:
    slots = _slots(pool)
    inflight = sum(1 for s in slots for j in s.inflight.values() if not j.finished)
    return {
        "handler": pool.cfg.handler,
        "tp": pool.cfg.tp,
        "desired": pool.desired,
        "health": pool_health(pool),
        "queue_depth": len(pool.queue),
        "inflight": inflight,
        "completed": pool.completed,
        "failed": pool.failed,
        "throughput_1m": round(pool.throughput(), 3),
        "workers": [slot_view(s, now) for s in slots],
    }


def pool_health(pool) -> str:
    """`ready`: every slot it runs serves; `degraded`: at least one serves, but some are dead, stuck,
    restarting, failed or still starting; `unavailable`: none can take jobs.

    Draining slots (scale-down) are neither: they are on their way out by choice.
    """
    slots = _slots(pool)
    if not any(s.state in SERVING for s in slots):
        return "unavailable"
    if any(s.state in UNHEALTHY for s in slots):
        return "degraded"
    return "ready"


def status(coord) -> dict:
    now = time.monotonic()
    return {
        "state": coord.state.value,
        "endpoint": coord.endpoint,
        "pid": os.getpid(),
        "uptime": round(now - coord.started_at, 3),
        "jobs_unfinished": len(coord.jobs),
        "rejected": dict(coord.rejected),
        "pools": {name: pool_view(p, now) for name, p in coord.pools.items()},
    }


HEALTH_KEYS = ("state", "state_age", "heartbeat_age", "step_age", "inflight", "restarts",
               "last_exit_reason")


def health(coord) -> dict:
    """Liveness of the coordinator itself, readiness per pool, and per worker: state, heartbeat age
    (is it alive?) and step age (is it making progress?).

    A hung process shows a heartbeat age that grows until `heartbeat_timeout`, when it is declared
    dead; a worker in a long step shows a fresh heartbeat and a growing step age.
    """
    now = time.monotonic()
    pools = {}
    for name, pool in coord.pools.items():
        workers = {}
        for s in _slots(pool):
            v = slot_view(s, now)
            workers[s.name] = {k: v[k] for k in HEALTH_KEYS}
        pools[name] = {"status": pool_health(pool), "workers": workers}
    states = {p["status"] for p in pools.values()}
    overall = "ready" if states == {"ready"} else "unavailable" if states == {"unavailable"} else "degraded"
    return {"alive": True, "state": coord.state.value, "status": overall,
            "heartbeat_timeout": coord.cfg.hb_timeout, "pools": pools}


__all__ = ["status", "health", "slot_view", "pool_health", "LIVE"]
