"""The job table: every accepted job and every count derived from jobs, with one owner.

A job is, at any moment, in exactly one of three places:

    queued   in its pool's queue, waiting for a credit
    running  on a slot, holding one of its credits
    ended    its one terminal reply has been sent

A job that ends while running (cancel, timeout, drain expiry) is ended at once, but its credit stays
with the slot, in the slot's `awaiting_ack`, until the worker acknowledges the end with its result or
error: the worker is still busy with it until then. It is not counted as running any more. So for every
pool, and in total:

    accepted == queued + running + ended
    running  == the sum of its slots' running counts

Every change goes through one of the transition methods below; `end()` is the one place a job ends,
whatever the reason. `validate_state()` checks the invariants (the tests call it after every step).
"""
from __future__ import annotations

import heapq
import time
from collections import deque
from typing import Callable

from protocol import errors as E
from protocol.messages import Error
from orchestrator.core.jobs import Job
from orchestrator.states import JobState as JS

THROUGHPUT_WINDOW = 60.0  # seconds over which a pool's jobs/s is measured


class PoolJobs:
    """One pool's queue and job counts."""

    __slots__ = ("queue", "running", "accepted", "ended", "completed", "failed", "cancelled", "_done_times")

    def __init__(self):
        self.queue: deque = deque()
        self.running = 0
        self.accepted = 0
        self.ended = 0
        self.completed = 0  # ended with a result
        self.failed = 0  # ended otherwise (error, cancel, timeout)
        self.cancelled = 0  # of the failed: ended by their client's cancel
        self._done_times: deque = deque()  # end times within the throughput window

    def record_end(self, ok: bool, now: float, cancelled: bool = False) -> None:
        self.ended += 1
        if ok:
            self.completed += 1
        else:
            self.failed += 1
            self.cancelled += cancelled
        self._done_times.append(now)
        self._trim(now)

    def throughput(self, now: float) -> float:
        """Jobs ended per second over the last minute."""
        self._trim(now)
        return len(self._done_times) / THROUGHPUT_WINDOW

    def _trim(self, now: float) -> None:
        while self._done_times and self._done_times[0] < now - THROUGHPUT_WINDOW:
            self._done_times.popleft()


class JobTable:
    """Owns the accepted jobs. `reply(job, state, message)` sends a job's one terminal reply;
    `cancel(slot, job)` tells a slot to stop a running job that has just ended."""

    def __init__(self, pools, reply: Callable, cancel: Callable):
        self.reply, self.cancel = reply, cancel
        self.jobs: dict[tuple, Job] = {}  # (client route, client job id) -> unfinished job
        self.per_client: dict[tuple, int] = {}  # route -> unfinished jobs (no entry at 0)
        self.pools: dict[str, PoolJobs] = {name: PoolJobs() for name in pools}
        self.timeouts: list = []  # heap of (deadline, jid, job); ended jobs stay until popped
        self.queued_total = 0
        self.next_jid = 1

    # ------------------------------------------------------------------ reads

    def find(self, route: tuple, cid) -> Job | None:
        return self.jobs.get((route, cid))

    def pending(self, route: tuple) -> int:
        return self.per_client.get(route, 0)

    def queued(self, pool: str) -> int:
        return len(self.pools[pool].queue)

    def unfinished(self) -> int:
        return len(self.jobs)

    # ------------------------------------------------------------------ transitions

    def accept(self, route: tuple, cid, pool: str, payload, stream: bool, retries: int,
               deadline: float | None) -> Job:
        """A new job, queued at the back of its pool's queue."""
        job = Job(self.next_jid, route, cid, pool, payload, stream, retries, deadline)
        self.next_jid += 1
        self.jobs[(route, cid)] = job
        self.per_client[route] = self.per_client.get(route, 0) + 1
        if deadline:
            self._push_deadline(job)
        pj = self.pools[pool]
        pj.accepted += 1
        pj.queue.append(job)
        self.queued_total += 1
        return job

    def start_next(self, pool: str, slot) -> Job:
        """Move the oldest queued job of `pool` onto `slot`, taking one of its credits."""
        pj = self.pools[pool]
        job = pj.queue.popleft()
        self.queued_total -= 1
        pj.running += 1
        job.set_state(JS.RUNNING)
        job.slot = slot
        job.started_at = time.monotonic()
        load = slot.load
        load.running[job.jid] = job
        load.held += 1
        return job

    def chunk_sent(self, job: Job) -> int:
        """A chunk of `job` goes to its client: returns its seq. The count decides replay (a stream that
        sent chunks cannot start over), so only the table changes it."""
        if job.first_chunk_at is None:
            job.first_chunk_at = time.monotonic()
        seq = job.chunks_sent
        job.chunks_sent = seq + 1
        return seq

    def end(self, job: Job, state: JS, message, acked: bool = False) -> None:
        """The one place a job ends: leave the queue or the slot, send its one reply, forget it.

        A running job keeps its slot's credit (in `awaiting_ack`) unless `acked`: the worker's own
        result or error is what ends it."""
        if job.finished:
            return
        pj = self.pools[job.pool]
        if job.state == JS.QUEUED:
            pj.queue.remove(job)
            self.queued_total -= 1
        else:
            self._leave_slot(job, pj, state, acked)
        job.set_state(state)
        job.input = None  # the timeout heap may hold the job until its deadline: not its payload
        del self.jobs[(job.client, job.cid)]
        n = self.per_client[job.client] - 1
        if n:
            self.per_client[job.client] = n
        else:
            del self.per_client[job.client]
        pj.record_end(state == JS.DONE, time.monotonic(), cancelled=state == JS.CANCELLED)
        self.reply(job, state, message)

    def _leave_slot(self, job: Job, pj: PoolJobs, state: JS, acked: bool) -> None:
        slot, load = job.slot, job.slot.load
        del load.running[job.jid]
        pj.running -= 1
        if acked:
            load.held -= 1
        else:
            load.awaiting_ack[job.jid] = job
            self.cancel(slot, job)

    def acknowledge(self, slot, jid: int, ok: bool) -> Job | None:
        """The worker answered `jid` with a result (`ok`) or an error. Returns the job if it is still
        running, for the caller to end with `acked=True` at once; else frees the credit of an ended
        job and returns None."""
        load = slot.load
        job = load.running.get(jid)
        if job is None:
            if load.awaiting_ack.pop(jid, None) is not None:
                load.held -= 1
        elif ok:
            load.completed += 1
        else:
            load.failed += 1
        return job

    def slot_down(self, slot, reason: str, code: str | None, stopping: bool) -> None:
        """A slot died or stopped: it holds no credit any more. Its running jobs go back to the front
        of the queue, oldest first, or end when they have used up their retries (or cannot be
        replayed, or the coordinator is stopping)."""
        load = slot.load
        load.held -= len(load.awaiting_ack)
        load.awaiting_ack.clear()  # the worker is gone: it will never acknowledge them
        jobs = sorted(load.running.values(), key=lambda j: j.jid)
        for job in reversed(jobs):
            job.crashes.append(reason)
            failure = self._requeue_failure(job, slot, code, stopping)
            if failure is not None:
                self.end(job, JS.FAILED, failure, acked=True)
            else:
                self._requeue(job)

    def _requeue_failure(self, job: Job, slot, code: str | None, stopping: bool):
        """Why a job from a dead slot cannot run again, as an Error reply; None if it can."""
        if stopping:
            return Error(job.cid, E.SHUTTING_DOWN, "coordinator stopped")
        if len(job.crashes) > job.retries:
            fail_code = E.COLLECTIVE_MISMATCH if code == E.COLLECTIVE_MISMATCH else E.WORKER_CRASHED
            return Error(job.cid, fail_code, f"job failed on {len(job.crashes)} worker(s) (retries="
                         f"{job.retries}): " + "; ".join(job.crashes), {"reasons": job.crashes})
        if job.chunks_sent and not slot.replay_safe:
            return Error(job.cid, E.WORKER_CRASHED, f"worker died after streaming {job.chunks_sent} "
                         f"chunk(s) ({job.crashes[-1]}); the handler is not replay-safe, so the job was "
                         f"not replayed")
        return None

    def _requeue(self, job: Job) -> None:
        pj = self.pools[job.pool]
        load = job.slot.load
        del load.running[job.jid]
        load.held -= 1
        pj.running -= 1
        job.slot = None
        job.set_state(JS.QUEUED)
        pj.queue.appendleft(job)
        self.queued_total += 1

    def expire(self, now: float) -> None:
        """End every job whose deadline has passed."""
        heap = self.timeouts
        while heap and heap[0][0] <= now:
            job = heapq.heappop(heap)[2]
            self.end(job, JS.FAILED, Error(job.cid, E.TIMEOUT, "job timeout passed before it finished"))

    def end_queued(self, pool: str, code: str, message: str) -> None:
        for job in list(self.pools[pool].queue):
            self.end(job, JS.FAILED, Error(job.cid, code, message))

    def end_all(self, code: str, message: str) -> None:
        for job in list(self.jobs.values()):
            self.end(job, JS.FAILED, Error(job.cid, code, message))

    def _push_deadline(self, job: Job) -> None:
        heapq.heappush(self.timeouts, (job.deadline, job.jid, job))
        if len(self.timeouts) > 2 * len(self.jobs) + 1024:  # ended jobs wait for their deadline
            self.timeouts = [t for t in self.timeouts if not t[2].finished]
            heapq.heapify(self.timeouts)

    # ------------------------------------------------------------------ invariants

    def validate_state(self, slots_by_pool: dict) -> None:
        """Raise AssertionError unless every count agrees with the jobs. `slots_by_pool`: pool name ->
        every slot of that pool (any state)."""
        total_running = total_ended = total_accepted = 0
        for name, pj in self.pools.items():
            slots = slots_by_pool[name]
            running = sum(len(s.load.running) for s in slots)
            assert running == pj.running, f"{name}: slots run {running}, pool counts {pj.running}"
            assert pj.accepted == len(pj.queue) + pj.running + pj.ended, \
                f"{name}: accepted {pj.accepted} != queued {len(pj.queue)} + running {pj.running} + " \
                f"ended {pj.ended}"
            assert pj.ended == pj.completed + pj.failed, f"{name}: ended != completed + failed"
            for job in pj.queue:
                assert job.state == JS.QUEUED and job.slot is None and job.pool == name, job.jid
            for s in slots:
                assert s.load.held == len(s.load.running) + len(s.load.awaiting_ack), s.name
                for jid, job in s.load.running.items():
                    assert job.jid == jid and job.state == JS.RUNNING and job.slot is s, jid
                for jid, job in s.load.awaiting_ack.items():
                    assert job.finished and jid not in s.load.running, jid
            total_running += pj.running
            total_ended += pj.ended
            total_accepted += pj.accepted
        queued = sum(len(pj.queue) for pj in self.pools.values())
        assert queued == self.queued_total, f"queued_total {self.queued_total} != {queued}"
        assert total_accepted == queued + total_running + total_ended
        assert len(self.jobs) == queued + total_running, "unfinished jobs != queued + running"
        assert sum(self.per_client.values()) == len(self.jobs) and all(self.per_client.values())
        for (route, cid), job in self.jobs.items():
            assert not job.finished and job.client == route and job.cid == cid, job.jid
        in_heap = {t[1] for t in self.timeouts}
        assert all(j.jid in in_heap for j in self.jobs.values() if j.deadline), "deadline lost"
