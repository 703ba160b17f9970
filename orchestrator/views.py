"""`status` and `health` answers, built from coordinator state alone (workers are never asked)."""
from __future__ import annotations

import os
import time

from .states import LIVE, SERVING, WorkerState as WS

UNHEALTHY = {WS.DEAD, WS.STUCK, WS.RESTARTING, WS.FAILED, WS.STARTING, WS.LOADING}


def _age(t: float | None, now: float) -> float | None:
    return None if t is None else round(now - t, 3)


def _proc_view(p, now: float) -> dict:
    step = p.current_step_age(now)
    return {"rank": p.rank, "pid": p.pid, "alive": p.alive,
            "heartbeat_age": round(now - p.last_seen, 3),
            "step_age": None if step is None else round(step, 3), "stats": p.stats}


def slot_view(slot, now: float) -> dict:
    procs = [_proc_view(p, now) for p in slot.procs]
    gpu = [g for p in slot.procs for g in ((p.stats or {}).get("gpu") or [])]
    return {
        "name": slot.name,
        "state": slot.state.value,
        "devices": list(slot.spec.devices),
        "pids": [p.pid for p in slot.procs if p.alive],
        "inflight": len(slot.inflight),
        "capacity": slot.capacity,
        "completed": slot.completed,
        "failed": slot.failed,
        "restarts": max(slot.incarnation - 1, 0),
        "last_exit_reason": slot.last_exit_reason,
        "heartbeat_age": max((p["heartbeat_age"] for p in procs if p["alive"]), default=None),
        "step_age": max((p["step_age"] for p in procs if p["step_age"] is not None), default=None),
        "state_age": round(now - slot.state_since, 3),
        "gpu_memory": gpu,
        "ranks": procs,
        "info": slot.info,
    }


def pool_view(pool, now: float) -> dict:
    slots = [s for s in pool.slots.values() if s.state != WS.STOPPED]
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
        "workers": [slot_view(s, now) for s in sorted(slots, key=lambda s: s.spec.index)],
    }


def pool_health(pool) -> str:
    """ready: all wanted slots serve; degraded: some serve; unavailable: none can take jobs."""
    slots = [s for s in pool.slots.values() if s.state != WS.STOPPED]
    serving = [s for s in slots if s.state in SERVING]
    if not serving:
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


def health(coord) -> dict:
    """Liveness of the coordinator itself, readiness per pool, and per worker: state, heartbeat age
    (is it alive?) and step age (is it making progress?)."""
    now = time.monotonic()
    pools = {}
    for name, pool in coord.pools.items():
        workers = {}
        for s in pool.slots.values():
            if s.state == WS.STOPPED:
                continue
            v = slot_view(s, now)
            workers[s.name] = {k: v[k] for k in ("state", "heartbeat_age", "step_age", "inflight",
                                                 "last_exit_reason")}
        pools[name] = {"status": pool_health(pool), "workers": workers}
    states = {p["status"] for p in pools.values()}
    overall = "ready" if states == {"ready"} else "unavailable" if states == {"unavailable"} else "degraded"
    return {"alive": True, "state": coord.state.value, "status": overall, "pools": pools}


__all__ = ["status", "health", "LIVE"]
