"""A pool: its slots, its bounded queue, dispatch choice and scale decisions.

This module decides; it never touches sockets or processes (the coordinator does that).
"""
from __future__ import annotations

import time
from collections import deque

from .config import PoolConfig
from .placement import assign, available_cores, check_replicas, parse_devices, split_cores
from .procs import Slot, SlotSpec
from .states import LIVE, SERVING, WorkerState

THROUGHPUT_WINDOW = 60.0


class Pool:
    def __init__(self, cfg: PoolConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.device_set = parse_devices(cfg.devices)
        self.groups = assign(self.device_set.ids, cfg.tp, cfg.workers_per_device)
        self.desired = len(self.groups) if cfg.replicas is None else cfg.replicas
        check_replicas(len(self.groups), self.desired, cfg.tp, self.device_set)
        self.slots: dict[int, Slot] = {}
        self.queue: deque = deque()
        self.completed = 0
        self.failed = 0
        self.cancelled = 0  # ended by their client's cancel (also counted in `failed`)
        self._done_times: deque = deque()  # completion times within the throughput window
        self._rr = 0

    # ------------------------------------------------------------------ specs

    def slot_spec(self, index: int, cores: list) -> SlotSpec:
        cfg = self.cfg
        return SlotSpec(pool=self.name, index=index, devices=self.groups[index], handler=cfg.handler,
                        config=cfg.config, tp=cfg.tp, cores=tuple(tuple(c) for c in cores),
                        capacity=cfg.capacity, cpu_threads=cfg.cpu_threads, cpu_affinity=cfg.cpu_affinity,
                        env=cfg.env,
                        guard_timeout=cfg.guard_timeout)

    def live_slots(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.state != WorkerState.STOPPED]

    # ------------------------------------------------------------------ dispatch

    def pick_slot(self) -> Slot | None:
        """The serving slot with the most free credits; ties rotate so every worker gets work."""
        best, best_credits = None, 0
        slots = list(self.slots.values())
        n = len(slots)
        for k in range(n):
            s = slots[(self._rr + k) % n]
            if s.state in SERVING and s.credits > best_credits:
                best, best_credits = s, s.credits
        if best is not None:
            self._rr = (self._rr + 1) % max(n, 1)
        return best

    def can_ever_serve(self) -> bool:
        """False when no slot is alive or coming back: jobs would wait forever (`unavailable`)."""
        return any(s.state in LIVE or s.state in (WorkerState.DEAD, WorkerState.RESTARTING)
                   for s in self.slots.values())

    # ------------------------------------------------------------------ scale

    def plan_scale(self, replicas: int) -> tuple[list[int], list[Slot]]:
        """Indices to start and slots to drain to reach `replicas`; raises ValueError (changing
        nothing) when the pool's devices cannot hold that many."""
        check_replicas(len(self.groups), replicas, self.cfg.tp, self.device_set)
        live = [s for s in self.live_slots() if s.state != WorkerState.DRAINING]
        if replicas >= len(live):
            used = {s.spec.index for s in self.live_slots()}
            free = [i for i in range(len(self.groups)) if i not in used]
            need = replicas - len(live)
            if need > len(free):
                raise ValueError(f"scale {self.name} to {replicas}: {need} more slot(s) needed but only "
                                 f"{len(free)} device group(s) are free (others are still draining)")
            return free[:need], []
        # Drain the least useful first: failed/restarting, then the least loaded, newest first.
        order = sorted(live, key=lambda s: (s.state in SERVING, len(s.inflight), -s.spec.index))
        return [], order[:len(live) - replicas]

    def cores_for(self, n_ranks: int, total_slots: int, index: int) -> list:
        """This slot's share of the CPU cores, one list per rank."""
        per_rank = split_cores(available_cores(), max(total_slots * n_ranks, 1))
        start = index * n_ranks
        return [per_rank[(start + r) % len(per_rank)] for r in range(n_ranks)]

    # ------------------------------------------------------------------ accounting

    def record_done(self, ok: bool, cancelled: bool = False) -> None:
        now = time.monotonic()
        if ok:
            self.completed += 1
        else:
            self.failed += 1
            self.cancelled += cancelled
        self._done_times.append(now)
        while self._done_times and self._done_times[0] < now - THROUGHPUT_WINDOW:
            self._done_times.popleft()

    def throughput(self) -> float:
        """Jobs finished per second over the last minute."""
        now = time.monotonic()
        while self._done_times and self._done_times[0] < now - THROUGHPUT_WINDOW:
            self._done_times.popleft()
        return len(self._done_times) / THROUGHPUT_WINDOW
