"""A snapshot of the coordinator's state, built on the event loop for `status`, `health` and metrics.

The views (views.py) and the Prometheus exporter read only these records, never the coordinator,
its pools, slots or jobs. Building one reads in-memory state only (no I/O, no worker is asked), which
is why `status` answers while every worker is busy or hung.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from orchestrator.states import SlotState


@dataclass(frozen=True)
class RankSnapshot:
    rank: int
    pid: int | None  # information only (a remote launcher may have none)
    host: str | None
    node: str | None
    alive: bool
    heartbeat_age: float | None  # None when not alive
    step_age: float | None
    rss_bytes: int | None
    gpu_memory: list
    guard: dict | None  # TP ranks: collective guard cost per step (worker/guard.py)
    transfers: dict | None  # ctx.to_device/to_host counts (worker/transfers.py)


@dataclass(frozen=True)
class WorkerSnapshot:
    name: str
    index: int
    state: SlotState
    devices: tuple
    running: int  # jobs running on it
    awaiting_ack: int  # jobs ended while running whose end the worker has not acknowledged
    capacity: int
    completed: int
    failed: int
    restarts: int
    last_exit_reason: str | None
    state_age: float
    info: dict
    ranks: tuple  # of RankSnapshot
    failure: dict | None  # when FAILED: reason, code, permanent, retry_in


@dataclass(frozen=True)
class PoolSnapshot:
    name: str
    handler: str
    tp: int
    desired: int
    health: str
    queued: int
    running: int
    completed: int
    failed: int
    cancelled: int  # of the failed: ended by their client's cancel
    throughput_1m: float
    queue_size: int
    reason: str | None  # why it is not ready: the first failed (else dead) slot's reason
    workers: tuple  # of WorkerSnapshot, every slot in index order (stopped ones too)


@dataclass(frozen=True)
class Snapshot:
    state: str
    endpoint: str | None
    pid: int
    uptime: float
    jobs_unfinished: int
    rejected: dict
    heartbeat_timeout: float
    limits: dict  # every client-facing cap by its config key (per-pool queue sizes are in the pools)
    pools: dict  # name -> PoolSnapshot


def _rounded(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def rank_snapshot(p, now: float) -> RankSnapshot:
    stats = p.stats or {}
    alive = p.alive
    return RankSnapshot(
        rank=p.rank, pid=p.handle.pid, host=p.handle.host, node=p.handle.node, alive=alive,
        heartbeat_age=round(now - p.last_seen, 3) if alive else None,
        step_age=_rounded(p.current_step_age(now)) if alive else None,
        rss_bytes=stats.get("rss_bytes"), gpu_memory=stats.get("gpu") or [], guard=stats.get("guard"),
        transfers=stats.get("transfers"))


def worker_snapshot(slot, now: float) -> WorkerSnapshot:
    load = slot.load
    return WorkerSnapshot(
        name=slot.name, index=slot.spec.index, state=slot.state, devices=tuple(slot.spec.devices),
        running=len(load.running), awaiting_ack=len(load.awaiting_ack), capacity=slot.capacity,
        completed=load.completed, failed=load.failed, restarts=max(slot.incarnation - 1, 0),
        last_exit_reason=slot.last_exit_reason, state_age=round(now - slot.state_since, 3),
        info=slot.info, ranks=tuple(rank_snapshot(p, now) for p in slot.procs),
        failure=_failure(slot, now))


def _failure(slot, now: float) -> dict | None:
    """Why a `failed` slot serves nothing, and whether anything but the operator will retry it."""
    if slot.state != SlotState.FAILED:
        return None
    return {"reason": slot.last_exit_reason, "code": slot.last_exit_code, "permanent": slot.permanent,
            "retry_in": None if slot.retry_at is None else round(max(slot.retry_at - now, 0.0), 3)}


def pool_snapshot(pool, jobs, now: float) -> PoolSnapshot:
    """`jobs`: the pool's PoolJobs record from the JobTable."""
    slots = sorted(pool.slots.values(), key=lambda s: s.spec.index)
    return PoolSnapshot(
        name=pool.name, handler=pool.cfg.handler, tp=pool.cfg.tp, desired=pool.desired,
        health=pool.health(), queued=len(jobs.queue), running=jobs.running, completed=jobs.completed,
        failed=jobs.failed, cancelled=jobs.cancelled, throughput_1m=round(jobs.throughput(now), 3),
        queue_size=pool.cfg.queue_size, reason=pool.reason(), workers=tuple(worker_snapshot(s, now) for s in slots))


def config_limits(cfg) -> dict:
    """Every client-facing cap, by its config key (protocol/README.md, "Limits")."""
    return {**dataclasses.asdict(cfg.limits), "max_pending_per_client": cfg.max_pending_per_client,
            "max_queued_total": cfg.max_queued_total}


def take(state: str, endpoint: str | None, uptime: float, heartbeat_timeout: float, rejected: dict,
         pools: dict, table, now: float, limits: dict | None = None) -> Snapshot:
    """Snapshot of the whole coordinator (called on the event loop); `limits`: `config_limits(cfg)`."""
    return Snapshot(
        state=state, endpoint=endpoint, pid=os.getpid(), uptime=round(uptime, 3),
        jobs_unfinished=table.unfinished(), rejected=dict(rejected), heartbeat_timeout=heartbeat_timeout,
        limits=dict(limits or {}),
        pools={name: pool_snapshot(p, table.pools[name], now) for name, p in pools.items()})
