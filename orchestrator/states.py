"""Lifecycle state machines. Each enum's docstring lists the allowed transitions; `move` enforces them."""
from __future__ import annotations

import enum


class InvalidTransition(RuntimeError):
    pass


class SlotState(str, enum.Enum):
    """State of a worker slot (one process, or one TP group of processes).

    STARTING   -> LOADING, DEAD, STOPPED      process(es) spawned, no hello yet
    LOADING    -> READY, DEAD, STUCK, STOPPED all ranks said hello; handler is loading
    READY      -> BUSY, DRAINING, DEAD, STUCK, STOPPED    every rank reported READY, nothing in flight
    BUSY       -> READY, DRAINING, DEAD, STUCK, STOPPED   jobs in flight
    DRAINING   -> STOPPED, DEAD, STUCK        takes no new jobs; stops once its jobs finish
    STUCK      -> DEAD                        a step exceeded its budget; being killed
    DEAD       -> RESTARTING, FAILED, STOPPED a process exited or was killed; jobs requeued
    RESTARTING -> STARTING, STOPPED           waiting out its backoff
    FAILED     -> STARTING, STOPPED           a permanent failure, or the failure budget spent; serves
                                              nothing until retried (budget refilled, scale, reload)
    STOPPED    -> STARTING                    stopped on purpose (scale down, reload, shutdown); also
                                              the state of a new slot; scale-up starts it again, and
                                              reload as soon as its staged stop completes
    """

    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    STUCK = "stuck"
    DEAD = "dead"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


S = SlotState
SLOT_TRANSITIONS = {
    S.STARTING: {S.LOADING, S.DEAD, S.STOPPED},
    S.LOADING: {S.READY, S.DEAD, S.STUCK, S.STOPPED},
    S.READY: {S.BUSY, S.DRAINING, S.DEAD, S.STUCK, S.STOPPED},
    S.BUSY: {S.READY, S.DRAINING, S.DEAD, S.STUCK, S.STOPPED},
    S.DRAINING: {S.STOPPED, S.DEAD, S.STUCK},
    S.STUCK: {S.DEAD},
    S.DEAD: {S.RESTARTING, S.FAILED, S.STOPPED},
    S.RESTARTING: {S.STARTING, S.STOPPED},
    S.FAILED: {S.STARTING, S.STOPPED},
    S.STOPPED: {S.STARTING},
}
LIVE = {S.STARTING, S.LOADING, S.READY, S.BUSY, S.DRAINING, S.STUCK}
SERVING = {S.READY, S.BUSY}


class JobState(str, enum.Enum):
    """State of one accepted job. Exactly one terminal state is ever reached.

    QUEUED  -> RUNNING, DONE, FAILED, CANCELLED   waiting in its pool's queue
    RUNNING -> QUEUED, DONE, FAILED, CANCELLED    on a worker; QUEUED again when requeued after a crash
    DONE, FAILED, CANCELLED                       terminal: its one reply has been sent
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


J = JobState
JOB_TRANSITIONS = {
    J.QUEUED: {J.RUNNING, J.DONE, J.FAILED, J.CANCELLED},
    J.RUNNING: {J.QUEUED, J.DONE, J.FAILED, J.CANCELLED},
    J.DONE: set(),
    J.FAILED: set(),
    J.CANCELLED: set(),
}
TERMINAL = {J.DONE, J.FAILED, J.CANCELLED}


class CoordinatorState(str, enum.Enum):
    """RUNNING -> SHUTTING_DOWN -> STOPPING -> STOPPED (or RUNNING -> STOPPING without drain).

    SHUTTING_DOWN: new submits are refused (`shutting_down`) while accepted jobs drain."""

    RUNNING = "running"
    SHUTTING_DOWN = "shutting_down"
    STOPPING = "stopping"
    STOPPED = "stopped"


C = CoordinatorState
COORDINATOR_TRANSITIONS = {
    C.RUNNING: {C.SHUTTING_DOWN, C.STOPPING},
    C.SHUTTING_DOWN: {C.STOPPING},
    C.STOPPING: {C.STOPPED},
    C.STOPPED: set(),
}


def move(obj, new, table: dict, attr: str = "state") -> None:
    """Set obj.<attr> to `new`, raising InvalidTransition if the table forbids it."""
    old = getattr(obj, attr)
    if new == old:
        return
    if new not in table[old]:
        raise InvalidTransition(f"{type(obj).__name__} {getattr(obj, 'name', '')}: {old.value} -> "
                                f"{new.value} is not allowed")
    setattr(obj, attr, new)
