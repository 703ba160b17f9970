"""The pools' slots as desired state: start them all, scale a pool, reload it, reconcile, stop them all.

`scale(pool, n)` edits the desired count, and one reconcile step starts what is missing and drains what
is extra; `reconcile(now)`, about once a second, also retries slots whose failure budget refilled. The
Pool decides which indices (`plan_scale`); the Supervisor runs each slot's lifecycle.
"""
from __future__ import annotations

import logging

from orchestrator.fleet.placement import available_cores, pool_cores
from orchestrator.fleet.pools import Pool
from orchestrator.fleet.slots import Slot
from orchestrator.states import SlotState as WS

log = logging.getLogger("orchestrator.coordinator")


class Fleet:
    def __init__(self, pools: dict, sup):
        self.pools, self.sup = pools, sup

    def slots(self) -> list[Slot]:
        return [s for p in self.pools.values() for s in p.slots.values()]

    def start(self) -> None:
        """Split the CPU cores once over every rank the pools can ever run, then start each pool's
        desired slots."""
        shares = pool_cores(available_cores(), {p.name: p.rank_capacity for p in self.pools.values()})
        for pool in self.pools.values():
            pool.cores = shares[pool.name]
        for pool in self.pools.values():
            for index in range(pool.desired):
                self._start_slot(pool, index)

    def startup_outcome(self) -> tuple[bool, dict]:
        """(settled, failures): settled once every pool's first load served or failed; failures maps
        each pool that failed so far to why (`Pool.startup_outcome`)."""
        outcomes = {name: pool.startup_outcome() for name, pool in self.pools.items()}
        settled = all(done for done, _ in outcomes.values())
        return settled, {name: why for name, (_, why) in outcomes.items() if why}

    def _start_slot(self, pool: Pool, index: int) -> None:
        slot = pool.slots.get(index)
        if slot is None or slot.state == WS.STOPPED:
            slot = Slot(pool.slot_spec(index, pool.slot_cores(index)))
            pool.slots[index] = slot
        self.sup.start_slot(slot, pool.cfg)

    def scale(self, pool: Pool, replicas: int) -> None:
        """Set the desired replica count and reconcile at once. Raises ValueError, changing nothing,
        when the pool's free devices cannot hold it. A failed slot that stays is retried with a fresh
        failure budget: scaling is one of the operator's ways to retry a permanent failure."""
        start, drain = pool.plan_scale(replicas)
        pool.desired = replicas
        reason = f"scale {pool.name} to {replicas}"
        self._apply(pool, start, drain, reason)
        for slot in list(pool.slots.values()):
            if slot not in drain:
                self.sup.retry(slot, reason, fresh_budget=True)
        log.info("pool %s: scale to %d (start %s, drain %s)", pool.name, replicas, start,
                 [s.name for s in drain], extra={"pool": pool.name})

    def _apply(self, pool: Pool, start: list, drain: list, reason: str) -> None:
        for index in start:
            self._start_slot(pool, index)
        for slot in drain:
            self.sup.drain_slot(slot, reason)

    def reload(self, pool: Pool) -> None:
        """Restart every slot of the pool with a fresh failure budget: failed ones at once, serving ones
        after a drain (their jobs finish first). Retries a permanent failure once its cause is fixed."""
        for slot in list(pool.slots.values()):
            self.sup.reload(slot, f"reload {pool.name}")
        log.info("pool %s: reload", pool.name, extra={"pool": pool.name})

    def reconcile(self, now: float) -> None:
        for pool in self.pools.values():
            self._reconcile(pool, now)

    def _reconcile(self, pool: Pool, now: float) -> None:
        """Move the pool toward its desired replica count: retry slots whose failure budget refilled,
        start missing slots, drain extra ones. A permanent failure waits for the operator."""
        for slot in list(pool.slots.values()):
            self.sup.retry_if_due(slot, now)
        active = [s for s in pool.live_slots() if s.state != WS.DRAINING or s.restart_on_stop]
        if len(active) == pool.desired:
            return
        try:
            start, drain = pool.plan_scale(pool.desired)
        except ValueError:
            return  # devices still held by draining slots: try again next round
        self._apply(pool, start, drain, f"reconcile {pool.name} to {pool.desired}")

    def stop(self, reason: str) -> None:
        """Staged stop of every slot; no restarts from here on."""
        self.sup.stop_all(self.slots(), reason)

    def stopped(self) -> bool:
        return all(s.state == WS.STOPPED for s in self.slots())
