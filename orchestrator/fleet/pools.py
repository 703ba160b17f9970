"""A pool: its slots, dispatch choice, health and scale decisions.

This module decides; it never touches sockets or processes (the Dispatcher, the Supervisor and its
Launcher do that), and its jobs (its queue and counts) belong to the JobTable.
"""
from __future__ import annotations

from orchestrator.config import PoolConfig
from orchestrator.fleet.placement import assign, check_replicas, parse_devices
from orchestrator.fleet.slots import Slot, SlotSpec
from orchestrator.states import LIVE, SERVING, SlotState

# Slots that are supposed to be serving but cannot: they make a pool `degraded`.
UNHEALTHY = {SlotState.DEAD, SlotState.STUCK, SlotState.RESTARTING, SlotState.FAILED,
             SlotState.STARTING, SlotState.LOADING}


class Pool:
    def __init__(self, cfg: PoolConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.device_set = parse_devices(cfg.devices)
        self.groups = assign(self.device_set.ids, cfg.tp, cfg.workers_per_device)
        self.desired = len(self.groups) if cfg.replicas is None else cfg.replicas
        check_replicas(len(self.groups), self.desired, cfg.tp, self.device_set)
        self.slots: dict[int, Slot] = {}
        self.cores: list[list[int]] = []  # one share per rank it can run (placement.pool_cores)
        self._rr = 0

    # ------------------------------------------------------------------ specs

    @property
    def rank_capacity(self) -> int:
        """Ranks the pool can ever run: one slot per device group, `tp` ranks each."""
        return len(self.groups) * self.cfg.tp

    def slot_cores(self, index: int) -> list:
        """Slot `index`'s shares of the pool's cores, one per rank (empty before cores are given)."""
        tp = self.cfg.tp
        return self.cores[index * tp:(index + 1) * tp]

    def slot_spec(self, index: int, cores: list) -> SlotSpec:
        cfg = self.cfg
        return SlotSpec(pool=self.name, index=index, devices=self.groups[index], handler=cfg.handler,
                        config=cfg.config, tp=cfg.tp, cores=tuple(tuple(c) for c in cores),
                        capacity=cfg.capacity, cpu_threads=cfg.cpu_threads, cpu_affinity=cfg.cpu_affinity,
                        env=cfg.env, guard_timeout=cfg.guard_timeout)

    def startup_outcome(self) -> tuple[bool, str | None]:
        """(settled, failure): settled once every slot served or failed; failure is the first failed
        slot's reason (a permanent failure, or a failure budget spent while loading)."""
        slots = self.live_slots()
        if any(s.state not in SERVING and s.state not in (SlotState.FAILED, SlotState.DRAINING)
               for s in slots):
            return False, None
        failed = [s for s in slots if s.state == SlotState.FAILED]
        failed.sort(key=lambda s: (not s.permanent, s.spec.index))
        return True, (f"{failed[0].name}: {failed[0].last_exit_reason}" if failed else None)

    def live_slots(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.state != SlotState.STOPPED]

    # ------------------------------------------------------------------ dispatch

    def pick_slot(self) -> Slot | None:
        """The serving slot with the most free credits; ties rotate so every worker gets work."""
        best, best_credits = None, 0
        slots = list(self.slots.values())
        n = len(slots)
        for k in range(n):
            s = slots[(self._rr + k) % n]
            if s.state in SERVING:
                credits = s.capacity - s.load.held  # free credits
                if credits > best_credits:
                    best, best_credits = s, credits
        if best is not None:
            self._rr = (self._rr + 1) % max(n, 1)
        return best

    def health(self) -> str:
        """`ready`, `degraded`, `unavailable` or `failed`: see `pool_health`."""
        return pool_health([s.state for s in self.slots.values()])

    def reason(self) -> str | None:
        """Why the pool is not ready, in words: the first failed (else dead) slot's last exit reason."""
        slots = sorted(self.live_slots(), key=lambda s: s.spec.index)
        down = (SlotState.DEAD, SlotState.RESTARTING, SlotState.STUCK)
        for states in ((SlotState.FAILED,), down):
            for s in slots:
                if s.state in states and s.last_exit_reason:
                    return f"{s.name}: {s.last_exit_reason}"
        return None

    def can_ever_serve(self) -> bool:
        """False when no slot is alive or coming back: jobs would wait forever (`unavailable`)."""
        return any(s.state in LIVE or s.state in (SlotState.DEAD, SlotState.RESTARTING)
                   for s in self.slots.values())

    # ------------------------------------------------------------------ scale

    def plan_scale(self, replicas: int) -> tuple[list[int], list[Slot]]:
        """Indices to start and slots to drain to reach `replicas`; raises ValueError (changing
        nothing) when the pool's devices cannot hold that many."""
        check_replicas(len(self.groups), replicas, self.cfg.tp, self.device_set)
        live = [s for s in self.live_slots() if s.state != SlotState.DRAINING]
        if replicas >= len(live):
            used = {s.spec.index for s in self.live_slots()}
            free = [i for i in range(len(self.groups)) if i not in used]
            need = replicas - len(live)
            if need > len(free):
                raise ValueError(f"scale {self.name} to {replicas}: {need} more slot(s) needed but only "
                                 f"{len(free)} device group(s) are free (others are still draining)")
            return free[:need], []
        # Drain the least useful first: failed/restarting, then the least loaded, newest first.
        order = sorted(live, key=lambda s: (s.state in SERVING, s.load.held, -s.spec.index))
        return [], order[:len(live) - replicas]


def pool_health(states: list) -> str:
    """`ready`: every slot it runs serves; `degraded`: at least one serves, but some are dead, stuck,
    restarting, failed or still starting; `failed`: every slot is failed (the pool's `reason` says why);
    `unavailable`: none can take jobs now.

    Draining slots (scale-down) are neither: they are on their way out by choice; stopped ones are gone.

    >>> S = SlotState
    >>> pool_health([S.READY, S.DRAINING]), pool_health([S.BUSY, S.DEAD]), pool_health([S.DRAINING])
    ('ready', 'degraded', 'unavailable')
    >>> pool_health([S.FAILED, S.STOPPED]), pool_health([S.FAILED, S.RESTARTING])
    ('failed', 'unavailable')
    """
    shown = [s for s in states if s != SlotState.STOPPED]
    if shown and all(s == SlotState.FAILED for s in shown):
        return "failed"
    if not any(s in SERVING for s in states):
        return "unavailable"
    if any(s in UNHEALTHY for s in states):
        return "degraded"
    return "ready"
