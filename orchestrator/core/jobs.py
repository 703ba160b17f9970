"""Accepted jobs as the coordinator tracks them."""
from __future__ import annotations

import time
from typing import Any

from orchestrator.states import JOB_TRANSITIONS, TERMINAL, JobState, move


class Job:
    """One accepted job. `client` (the client's ZMQ routing frames) + `cid` (its request id) address its
    replies; `jid` names it to workers."""

    __slots__ = ("jid", "client", "cid", "pool", "input", "stream", "retries", "state", "slot",
                 "crashes", "chunks_sent", "accepted_at", "started_at", "first_chunk_at",
                 "deadline")

    def __init__(self, jid: int, client: tuple, cid: Any, pool: str, input: Any, stream: bool,
                 retries: int, deadline: float | None):
        self.jid = jid
        self.client, self.cid, self.pool = client, cid, pool
        self.input, self.stream, self.retries = input, stream, retries
        self.state = JobState.QUEUED
        self.slot = None  # the Slot running it, while RUNNING (and after, while its end is unacknowledged)
        self.crashes: list[str] = []  # exit reasons of workers that died while running it
        self.chunks_sent = 0
        self.accepted_at = time.monotonic()
        self.started_at: float | None = None
        self.first_chunk_at: float | None = None
        self.deadline = deadline

    @property
    def name(self) -> str:
        """For the message of an invalid transition (states.move); built only then, off the job path."""
        return f"job {self.jid}"

    def set_state(self, new: JobState) -> None:
        move(self, new, JOB_TRANSITIONS)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL
