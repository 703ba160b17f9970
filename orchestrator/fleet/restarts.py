"""Restart policy: what a slot's failure costs, and when a failed slot may try again.

Decides only; the supervisor acts. A failure is one of two kinds (protocol/errors.py, PERMANENT_CODES):
- permanent (a bad config key, an unknown handler, a missing model, a constructor error): it would
  happen again on every attempt, so the slot is `failed` at once and only the operator retries it
  (`scale`, `reload POOL`);
- transient (a crash, a lost heartbeat, a CUDA error, a load that raised): restarted with exponential
  backoff, within a failure budget of `max_restarts` failures per `restart_window` seconds. Past it the
  slot is `failed`, and the reconcile step retries it once a failure has left the window (and no sooner
  than the backoff cap), so a long-lived server recovers from a bad hour without looping forever.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from protocol.errors import is_permanent

# A slot ready this long has its consecutive-failure count (and so its backoff) reset.
HEALTHY_RESET = 30.0


class FailureBudget:
    """Transient failures of one slot within a sliding window. The slot owns the record; the limit and
    the window are the pool's config (`max_restarts`, `restart_window`), passed in.

    >>> b = FailureBudget()
    >>> [b.spend(t, limit=2, window=10.0) for t in (0.0, 1.0, 2.0)]  # the third is over the budget
    [True, True, False]
    >>> b.refill_at(limit=2, window=10.0)  # the failures at t=0 and t=1 have left the window at t=11
    11.0
    >>> b.spend(11.5, limit=2, window=10.0)  # then one more attempt is allowed
    True
    """

    def __init__(self):
        self.times: deque = deque()

    def spend(self, now: float, limit: int, window: float) -> bool:
        """Record a failure at `now`; True while the failures in the window are within the limit."""
        while self.times and self.times[0] <= now - window:
            self.times.popleft()
        self.times.append(now)
        return len(self.times) <= limit

    def refill_at(self, limit: int, window: float) -> float:
        """When enough failures will have left the window for one more attempt."""
        # The window must drop to limit - 1 failures, so that the next one is within the limit.
        n = len(self.times)
        return self.times[min(max(n - limit, 0), n - 1)] + window

    def reset(self) -> None:
        self.times.clear()


@dataclass(frozen=True)
class Decision:
    """What to do with a slot whose processes are all gone after a failure."""

    restart_in: float | None  # seconds until a restart; None: the slot is `failed`
    permanent: bool = False
    retry_at: float | None = None  # failed for a transient reason: when the reconcile step retries it
    why: str = ""


def decide(slot, cfg, code: str | None, now: float) -> Decision:
    """Restart (with backoff), or fail: permanently, or until the failure budget refills."""
    if is_permanent(code):
        return Decision(None, permanent=True, why="a permanent failure")
    if slot.ready_at is not None and now - slot.ready_at > HEALTHY_RESET:
        slot.consecutive_failures = 0
    slot.consecutive_failures += 1
    if not slot.budget.spend(now, cfg.max_restarts, cfg.restart_window):
        retry_at = max(slot.budget.refill_at(cfg.max_restarts, cfg.restart_window),
                       now + cfg.restart_backoff_max)
        return Decision(None, retry_at=retry_at, why=f"failure budget spent ({cfg.max_restarts + 1} failures "
                                                     f"within {cfg.restart_window:g} s)")
    delay = min(cfg.restart_backoff * 2 ** (slot.consecutive_failures - 1), cfg.restart_backoff_max)
    return Decision(delay)
