"""Jobs between the job table and the workers: dispatch on free credits, the worker socket's messages,
and what a slot going down or coming up means for its jobs.

The Dispatcher acts; the JobTable (jobtable.py) owns the jobs and their counts, the Pool picks a slot,
and the Supervisor owns each slot's lifecycle (it gets the worker socket's lifecycle messages from here).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import zmq

from protocol.messages import (
    Chunk, Error, Result, WCancel, WChunk, WError, WFatal, WGroupReport, WHeartbeat, WHello, WReady,
    WResult, WRun,
)
from protocol import ProtocolError, errors as E
from orchestrator.core.jobtable import JobTable
from orchestrator.logs import ids
from orchestrator.states import JobState as JS, SlotState as WS

log = logging.getLogger("orchestrator.coordinator")

RECV_BATCH = 256  # messages drained per socket per loop turn: fairness between clients and workers


class Dispatcher:
    """`reply(route, message)` queues a message to a client; `out` is the loop turn's Outbox."""

    def __init__(self, pools: dict, table: JobTable, wsock: zmq.Socket, codec, wcodec, out,
                 reply: Callable, sup):
        self.pools, self.table, self.wsock, self.codec, self.wcodec = pools, table, wsock, codec, wcodec
        self.out, self.reply, self.sup = out, reply, sup

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, pool) -> None:
        """Give queued jobs of `pool` to its slots while they have credits."""
        queue = self.table.pools[pool.name].queue
        while queue:
            slot = pool.pick_slot()
            if slot is None:
                return
            job = self.table.start_next(pool.name, slot)
            self.sup.on_load_changed(slot)
            self.out.put((self.wsock, (slot.leader.data_id,),
                          self.codec.encode(WRun(job.jid, job.input, job.stream))))
            if job.crashes:  # a retry: logged so that recovery is visible (and measured by the bench)
                log.info("job %d: attempt %d dispatched to %s", job.jid, len(job.crashes) + 1,
                         slot.name, extra=ids(slot))

    def cancel_running(self, slot, job) -> None:
        """A running job ended early (cancel, timeout, drain expiry): the worker stops it; its credit
        returns when the worker answers."""
        self.sup.send_leader(slot, WCancel(job.jid))

    # ------------------------------------------------------------------ worker socket

    def on_readable(self) -> None:
        now = time.monotonic()
        by_id, decode, ops = self.sup.by_id, self.wcodec.decode, self._ops
        for _ in range(RECV_BATCH):
            try:
                frames = self.wsock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            entry = by_id.get(frames[0])
            if entry is None:
                continue  # a process already declared dead: its late messages are dropped
            slot, proc = entry
            proc.last_seen = now
            try:
                msg = decode(frames[-1]) if len(frames) == 2 else None
            except ProtocolError as e:
                msg, why = None, e.message
            else:
                why = f"{len(frames) - 1} frames" if msg is None else f"unexpected op {msg.OP!r}"
            op = ops.get(type(msg))
            if op is None:
                self._malformed(slot, proc, why)
                continue
            op(self, slot, proc, msg)

    def _malformed(self, slot, proc, why: str) -> None:
        """A worker that breaks the protocol cannot be trusted with its jobs: end its incarnation (its
        jobs are requeued, as after a crash) and go on serving everyone else."""
        log.error("%s: malformed message from worker: %s", proc.wid, why, extra=ids(slot))
        self.sup.fail(slot, f"malformed message from worker: {why}")

    def _w_result(self, slot, proc, msg: WResult) -> None:
        job = self.table.acknowledge(slot, msg.jid, ok=True)
        if job is not None:
            meta = {"worker": slot.name, "attempts": len(job.crashes) + 1, "run_ms": msg.run_ms}
            self.table.end(job, JS.DONE, Result(job.cid, msg.output, meta), acked=True)
        self._credit_back(slot)

    def _w_error(self, slot, proc, msg: WError) -> None:
        job = self.table.acknowledge(slot, msg.jid, ok=False)
        if job is not None:
            state = JS.CANCELLED if msg.code == E.CANCELLED else JS.FAILED
            self.table.end(job, state, Error(job.cid, msg.code, msg.message, msg.details), acked=True)
        self._credit_back(slot)

    def _credit_back(self, slot) -> None:
        self.sup.on_load_changed(slot)
        self.dispatch(self.pools[slot.spec.pool])

    def _w_chunk(self, slot, proc, msg: WChunk) -> None:
        job = slot.load.running.get(msg.jid)
        if job is None:
            return  # ended already: its one terminal reply was sent
        self.reply(job.client, Chunk(job.cid, self.table.chunk_sent(job), msg.data))

    def _w_hello(self, slot, proc, msg) -> None:
        self.sup.on_hello(slot, proc)

    def _w_ready(self, slot, proc, msg) -> None:
        self.sup.on_ready(slot, proc, msg)

    def _w_heartbeat(self, slot, proc, msg) -> None:
        self.sup.on_heartbeat(proc, msg)

    def _w_fatal(self, slot, proc, msg) -> None:
        self.sup.on_fatal(slot, proc, msg)

    def _w_group(self, slot, proc, msg) -> None:
        self.sup.on_group_report(slot, msg)

    _ops = {WResult: _w_result, WError: _w_error, WChunk: _w_chunk, WHello: _w_hello,
            WReady: _w_ready, WHeartbeat: _w_heartbeat, WFatal: _w_fatal, WGroupReport: _w_group}

    # ------------------------------------------------------------------ supervision callbacks

    def slot_down(self, slot, reason: str, code: str | None) -> None:
        """A slot died or stopped: its jobs go back to the queue (or fail); dispatch them elsewhere."""
        self.table.slot_down(slot, reason, code, stopping=self.sup.stopping)
        self.slot_changed(slot)

    def slot_changed(self, slot) -> None:
        """Credits or readiness changed: dispatch; fail the queue of a pool that can never serve."""
        pool = self.pools[slot.spec.pool]
        self.dispatch(pool)
        if self.table.queued(pool.name) and not pool.can_ever_serve():
            self.table.end_queued(pool.name, E.UNAVAILABLE, f"pool {pool.name} has no live workers")
