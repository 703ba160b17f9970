"""The job table's invariants (orchestrator/core/jobtable.py).

1. A random walk over the real JobTable, Pool and Slot objects: submits, dispatches, results, errors,
   cancels, timeouts, crashes (requeue or fail), scale-downs and scale-ups, restarts and late
   acknowledgements. After every step `validate_state()` holds (per-slot running counts sum to the
   pool's; queued + running + ended == accepted), every job has had at most one terminal reply, and the
   `status` view built from a snapshot shows per-worker counts that add up to the pool's.
2. A real server: a running job cancelled while its handler cannot stop keeps the slot's credit (the
   next job waits) until the worker answers, and `status` adds up throughout.
"""
from __future__ import annotations

import random

import pytest

from orchestrator.observe import snapshot, views
from orchestrator.client.sync import RequestError
from orchestrator.config import PoolConfig
from orchestrator.core.jobtable import JobTable
from orchestrator.fleet.pools import Pool
from orchestrator.fleet.slots import Slot
from orchestrator.states import JobState as JS, SERVING, SlotState as WS
from protocol.messages import Error, Result
from tests.conftest import poll_until

UP = (WS.STARTING, WS.LOADING, WS.READY)


class Model:
    """Real pools, slots and a JobTable, moved by hand the way the coordinator moves them."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.pools = {c.name: Pool(c) for c in (PoolConfig(name="a", devices="cpu:3"),
                                                   PoolConfig(name="b", devices="cpu:2"))}
        self.replies: dict[int, list] = {}  # jid -> terminal replies sent
        self.cancels: list = []  # (slot name, jid) told to stop
        self.table = JobTable(self.pools, self._reply, lambda slot, job: self.cancels.append(
            (slot.name, job.jid, job.state)))
        self.now = 0.0
        self.clients = [(b"c%d" % i,) for i in range(3)]
        self.next_cid = 0
        self.most_awaiting = 0  # most ended-but-unacknowledged jobs seen at once
        for pool in self.pools.values():
            for i in range(len(pool.groups)):
                self._up(pool, i)

    def _reply(self, job, state, message) -> None:
        assert job.state == state and isinstance(message, (Result, Error))
        self.replies.setdefault(job.jid, []).append(message)

    def _up(self, pool: Pool, index: int) -> None:
        slot = pool.slots.get(index)
        if slot is None or slot.state == WS.STOPPED:
            slot = Slot(pool.slot_spec(index, []))
            pool.slots[index] = slot
        if slot.state == WS.RESTARTING:
            slot.set_state(WS.STARTING)
        for s in UP:
            slot.set_state(s)
        slot.capacity = self.rng.choice([1, 2, 3])

    def slots(self, pred=lambda s: True) -> list:
        return [s for p in self.pools.values() for s in p.slots.values() if pred(s)]

    def dispatch(self, pool: Pool) -> None:
        while self.table.queued(pool.name):
            slot = pool.pick_slot()
            if slot is None:
                return
            self.table.start_next(pool.name, slot)

    # ------------------------------------------------------------------ steps

    def submit(self) -> None:
        pool = self.rng.choice(list(self.pools.values()))
        deadline = self.now + self.rng.uniform(1, 20) if self.rng.random() < 0.3 else None
        self.next_cid += 1
        self.table.accept(self.rng.choice(self.clients), self.next_cid, pool.name, {"x": 1}, False,
                          self.rng.choice([0, 1, 2]), deadline)
        self.dispatch(pool)

    def answer(self) -> None:
        """A worker answers one of the jobs it holds a credit for (a result or an error)."""
        held = [(s, jid) for s in self.slots() for jid in [*s.load.running, *s.load.awaiting_ack]]
        if not held:
            return
        slot, jid = self.rng.choice(held)
        ok = self.rng.random() < 0.8
        job = self.table.acknowledge(slot, jid, ok)
        if job is not None:
            msg = Result(job.cid, "out", {}) if ok else Error(job.cid, "handler_error", "no")
            self.table.end(job, JS.DONE if ok else JS.FAILED, msg, acked=True)
        assert jid not in slot.load.running and jid not in slot.load.awaiting_ack  # credit returned
        self._settled(slot)
        self.dispatch(self.pools[slot.spec.pool])

    def _settled(self, slot) -> None:
        if slot.state == WS.DRAINING and not slot.load.held:  # a drained slot stops
            self.table.slot_down(slot, "scale down", None, stopping=False)
            slot.set_state(WS.STOPPED)

    def cancel(self) -> None:
        if self.table.jobs:
            job = self.rng.choice(list(self.table.jobs.values()))
            self.table.end(job, JS.CANCELLED, Error(job.cid, "cancelled", "by client"))

    def time_passes(self) -> None:
        self.now += self.rng.uniform(0, 5)
        self.table.expire(self.now)

    def crash(self) -> None:
        live = self.slots(lambda s: s.state in SERVING or s.state == WS.DRAINING)
        if live:
            slot = self.rng.choice(live)
            slot.set_state(WS.DEAD)
            self.table.slot_down(slot, "exit code 1", None, stopping=False)
            slot.set_state(WS.RESTARTING)
            for pool in self.pools.values():
                self.dispatch(pool)

    def restart(self) -> None:
        for pool in self.pools.values():
            for i, slot in pool.slots.items():
                if slot.state == WS.RESTARTING:
                    self._up(pool, i)
            self.dispatch(pool)

    def scale(self) -> None:
        pool = self.rng.choice(list(self.pools.values()))
        try:
            start, drain = pool.plan_scale(self.rng.randint(0, len(pool.groups)))
        except ValueError:  # devices still held by draining slots: the real `scale` refuses too
            return
        for i in start:
            self._up(pool, i)
        for slot in drain:
            if slot.state in SERVING:
                slot.set_state(WS.DRAINING)
                self._settled(slot)
            else:  # restarting: it holds nothing; it just stops
                slot.set_state(WS.STOPPED)
        self.dispatch(pool)

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        self.most_awaiting = max(self.most_awaiting, sum(len(s.load.awaiting_ack) for s in self.slots()))
        self.table.validate_state({n: list(p.slots.values()) for n, p in self.pools.items()})
        for jid, replies in self.replies.items():
            assert len(replies) == 1, f"job {jid} got {len(replies)} terminal replies"
        assert all(state == JS.RUNNING for _, _, state in self.cancels)  # only running jobs
        snap = snapshot.take("running", None, 0.0, 2.5, {}, self.pools, self.table, self.now)
        st = views.status(snap)
        for name, pool in st["pools"].items():
            assert sum(w["inflight"] for w in pool["workers"]) == pool["inflight"], (name, pool)
        total = sum(pj.accepted for pj in self.table.pools.values())
        assert total == self.next_cid
        assert total == sum(p["queue_depth"] + p["inflight"] + p["completed"] + p["failed"]
                            for p in st["pools"].values())


@pytest.mark.parametrize("seed", range(8))
def test_invariants_hold_at_every_step(seed):
    model = Model(random.Random(seed))
    steps = [model.submit] * 6 + [model.answer] * 5 + [model.cancel, model.time_passes, model.crash,
                                                        model.restart, model.scale]
    seen = set()
    for _ in range(1500):
        step = model.rng.choice(steps)
        step()
        model.check()
        seen.add(step.__name__)
    assert seen == {s.__name__ for s in steps}
    ended = [r[0] for r in model.replies.values()]
    # The walk did reach every kind of ending, so the checks above covered them.
    codes = {m.code for m in ended if isinstance(m, Error)}
    assert any(isinstance(m, Result) for m in ended)
    assert {"cancelled", "timeout", "handler_error"} <= codes
    assert codes & {"worker_crashed"}  # some job used up its retries on crashing slots
    assert model.most_awaiting > 0 and model.cancels  # running jobs ended before their worker answered


# ---------------------------------------------------------------------------- a real server


def test_cancelled_running_job_keeps_its_credit_until_the_worker_answers(serve, tmp_path):
    server = serve(["--handler", "tests.handlers_for_tests:HoldUntilFile", "--pool", "hold",
                    "--devices", "cpu:2"])  # two workers of one credit each
    client = server.client()
    release = tmp_path / "release"
    jobs = [client.submit("hold", {"until": str(release)}) for _ in range(3)]

    def pool() -> dict:
        p = server.status()["pools"]["hold"]
        assert sum(w["inflight"] for w in p["workers"]) == p["inflight"], p  # adds up, always
        return p

    poll_until(lambda: pool()["inflight"] == 2, 30, what="two jobs to run")
    for job in jobs[:2]:
        job.cancel()
        with pytest.raises(RequestError) as ended:
            job.result(timeout=30)
        assert ended.value.code == "cancelled"
    p = pool()
    # Ended for the client at once, but each handler is still in its job, so the credits stay with the
    # workers: the third job waits in the queue, and nothing counts as running.
    assert (p["inflight"], p["queue_depth"], p["failed"]) == (0, 1, 2), p
    assert [(w["inflight"], w["awaiting_ack"]) for w in p["workers"]] == [(0, 1), (0, 1)], p
    release.touch()
    assert jobs[2].result(timeout=30) == {"done": True}
    p = poll_until(lambda: (lambda p: p if not any(w["awaiting_ack"] for w in p["workers"]) else None)(
        pool()), 30, what="both workers to answer their cancelled jobs")
    assert (p["inflight"], p["queue_depth"], p["completed"], p["failed"]) == (0, 0, 1, 2), p
    # A worker counts only what it answered while the job was running: the third job's result.
    assert sorted((w["completed"], w["failed"]) for w in p["workers"]) == [(0, 0), (1, 0)], p


def test_slot_check_catches_a_flag_that_disagrees_with_its_credits():
    """The coordinator's per-turn check (ORCHESTRATOR_VALIDATE=1) fails loudly on a slot whose BUSY/READY
    flag disagrees with the credits it holds."""
    pool = Pool(PoolConfig(name="p", handler="echo", devices="cpu:1"))
    slot = Slot(pool.slot_spec(0, []))
    slot.validate_state()  # a new slot: STOPPED, nothing held
    slot.load.held = 1
    with pytest.raises(AssertionError, match="stopped while holding 1 credit"):
        slot.validate_state()
