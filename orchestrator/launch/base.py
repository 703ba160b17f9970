"""How worker processes are started, watched and stopped: the `Launcher` seam.

Supervision policy (supervisor.py: readiness, heartbeats, stuck steps, restart budget) decides *when* a
slot starts or stops; a launcher decides *how*. The policy sees only the handles and exit events below,
never a pid, so a second launcher (Ray actors on other nodes) plugs in without editing the policy.

    launcher.attach(loop, on_exit, send_stop)   once, before any start
    handle = launcher.start(SlotLaunch(...))     all ranks of one slot, placed together
    launcher.stop(handle, reason, budget)        staged: stop message, join, kill, join
    launcher.kill(handle, reason)                at once (a slot declared down)
    launcher.tick(now)                           every timer tick (50 ms): escalates staged stops
    launcher.close(reason)                       coordinator shutdown: kill and reap what is left

Every `on_exit(ExitEvent)` call is made on the event-loop thread. The local launcher (launch/local.py)
gets there with pidfds registered in the loop. A launcher whose events come from a background thread (a
remote one) posts them through a `LoopWaker`, which it registers in the loop at `attach`.
"""
from __future__ import annotations

import abc
import logging
import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

TAIL_LINES = 20  # output lines kept per rank, quoted when it dies


class LaunchError(RuntimeError):
    """`start` could not start the slot (no room to place it, a remote node refused). The message says
    why in words; the supervisor fails the slot with it, which counts against its restart budget."""


@dataclass(frozen=True)
class RankLaunch:
    """One rank to start: its worker id, the spec the worker starts from, and its environment."""

    rank: int
    wid: str
    spec: object  # the worker's start spec (procs.worker_spec); the launcher only serialises it
    env: dict  # the whole environment of the rank (procs.worker_env)


@dataclass(frozen=True)
class SlotLaunch:
    """What `Launcher.start` starts: every rank of one slot, which must be placed together (one TP
    group: a Ray launcher makes one placement group of `len(ranks)` bundles)."""

    name: str  # the slot's name (`pool/index`), for logs
    pool: str
    incarnation: int
    devices: tuple  # the slot's devices (CUDA_VISIBLE_DEVICES entries, or cpuN names)
    ranks: tuple  # of RankLaunch, rank order


class RankHandle:
    """One started rank, as its launcher sees it. `pid`, `node`, `host` and `label` are information for
    status and logs; policy code reads only `alive` and `started` (why it ended comes as an ExitEvent)."""

    def __init__(self, rank: int, wid: str, pid: int | None = None, node: str | None = None,
                 host: str | None = None):
        self.rank, self.wid = rank, wid
        self.pid, self.node, self.host = pid, node, host
        self.exit_reason: str | None = None  # the first stop/kill reason given, else its exit status
        self.exit_status: str | None = None  # how it ended, in words, once it has
        self.log_tail: list[str] = []

    @property
    def alive(self) -> bool:
        return self.exit_status is None

    @property
    def started(self) -> bool:
        """Its process exists (a remote launcher may first wait for room in the cluster)."""
        return self.pid is not None

    @property
    def label(self) -> str:
        """Where it runs, for logs: `pid 123`, or `pid 123 on node-2`."""
        where = f"pid {self.pid}" if self.pid is not None else "no pid"
        return where if self.node is None else f"{where} on {self.node}"

    def note_reason(self, reason: str) -> bool:
        """Record why it is being ended; the first reason given is the one reported. True if first."""
        if self.exit_reason is None:
            self.exit_reason = reason
            return True
        return False

    def ended(self, status: str, lines: list = ()) -> None:
        """It has ended: how, in words (also its reason if none was given), and its last output lines."""
        self.exit_status = status
        self.note_reason(status)
        if lines:
            self.log_tail = (self.log_tail + list(lines))[-TAIL_LINES:]


class SlotHandle:
    """One started slot: its ranks (rank order) and, while a staged stop runs, that stop's state."""

    def __init__(self, launch: SlotLaunch, ranks: list, node: str | None = None,
                 host: str | None = None):
        self.name, self.pool, self.incarnation = launch.name, launch.pool, launch.incarnation
        self.ranks = ranks
        self.node, self.host = node, host
        self.stop_reason: str | None = None  # set by stop(): a staged stop is under way
        self.stop_budget = 0.0
        self.stop_deadline: float | None = None  # end of the current stage's join

    @property
    def alive(self) -> bool:
        """True while any rank runs."""
        return any(r.alive for r in self.ranks)

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None


@dataclass(frozen=True)
class ExitEvent:
    """A rank has ended. Delivered on the event-loop thread, once per rank."""

    handle: SlotHandle
    rank: int
    reason: str  # why, in words: the first stop/kill reason given, else its exit status
    status: str  # how it ended, in words: "exited normally", "exit code 7", "killed by signal 9 ..."
    clean: bool  # it exited by itself with status 0 (a completed stop)


class Launcher(abc.ABC):
    """Starts, watches and stops worker slots. All methods run on the event-loop thread."""

    log = logging.getLogger("orchestrator.launcher")  # a subclass may log under its own name

    def __init__(self):
        self.loop = self.on_exit = self.send_stop = None  # set by attach()
        self.stopping: set = set()  # handles whose staged stop is under way

    def attach(self, loop, on_exit: Callable[[ExitEvent], None],
               send_stop: Callable[[SlotHandle, int, str], None]) -> None:
        """Connect to the event loop (`loop.add(fd_or_zmq_socket, callback)`), the exit callback, and
        `send_stop(handle, rank, reason)`, which sends a rank the stop message over the worker socket
        (the first stage of a staged stop)."""
        self.loop, self.on_exit, self.send_stop = loop, on_exit, send_stop

    @abc.abstractmethod
    def start(self, launch: SlotLaunch) -> SlotHandle:
        """Start every rank of the slot; return at once (readiness comes over the worker socket).
        Raises LaunchError, having started nothing that still runs, when it cannot."""

    @abc.abstractmethod
    def kill(self, handle: SlotHandle, reason: str) -> None:
        """End every rank of the slot now. Idempotent; the first reason given is the one reported.
        Each rank's end still arrives as an ExitEvent."""

    def stop(self, handle: SlotHandle, reason: str, budget: float) -> None:
        """Staged stop of every rank. Budget: `budget` seconds for the stop message to end the ranks,
        then a kill and another `budget` seconds to see them end (so at most 2 x budget). Idempotent:
        a second call while one runs changes nothing."""
        if handle.stopping:
            return
        handle.stop_reason, handle.stop_budget = reason, budget
        handle.stop_deadline = time.monotonic() + budget
        for r in handle.ranks:
            if r.alive:
                self.send_stop(handle, r.rank, reason)
        self.stopping.add(handle)

    def tick(self, now: float) -> None:
        """Escalate staged stops whose stage ran past its budget. Called every timer tick (the
        coordinator's TICK, through Supervisor.tick)."""
        for handle in list(self.stopping):
            if handle.stop_deadline is not None and now >= handle.stop_deadline:
                self._escalate(handle, now)

    def close(self, reason: str) -> None:
        """Coordinator shutdown: kill what is still running and wait for it. Normally nothing is."""

    def _report_exit(self, handle: SlotHandle, rank: RankHandle, last: list) -> None:
        """Log a rank's end, quoting its `last` output lines, and deliver its ExitEvent. Call it once
        per rank, after `rank.ended(...)`, on the loop thread."""
        clean = rank.exit_status == exit_words(0)
        text = " | ".join(last)
        self.log.log(logging.INFO if handle.stopping or clean else logging.WARNING, "%s %s exited: %s%s",
                     rank.wid, rank.label, rank.exit_status, f" (last output: {text})" if text else "",
                     extra={"wid": rank.wid, "pool": handle.pool})
        self.on_exit(ExitEvent(handle, rank.rank, rank.exit_reason, rank.exit_status, clean))

    def _escalate(self, handle: SlotHandle, now: float) -> None:
        if not handle.alive:
            handle.stop_deadline = None
            self.stopping.discard(handle)
            return
        self.kill(handle, f"{handle.stop_reason}: did not exit within {handle.stop_budget:g} s of stop")
        handle.stop_deadline = now + handle.stop_budget  # join again after the kill


class LoopWaker:
    """Run callbacks on the event-loop thread, posted from any thread.

    A launcher whose processes are watched from a background thread (a remote launcher waiting on
    actor futures) calls `post(fn)` there; the loop, woken through a socketpair it polls, runs `fn()`.
    """

    def __init__(self, loop):
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._pending: deque = deque()  # deque appends and pops are thread-safe
        self._loop = loop
        loop.add(self._r.fileno(), self._drain)

    def post(self, fn: Callable[[], None]) -> None:
        self._pending.append(fn)
        try:
            self._w.send(b"x")
        except BlockingIOError:
            pass  # the pipe is full, so a wake-up is already pending

    def _drain(self) -> None:
        try:
            while self._r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while self._pending:
            self._pending.popleft()()

    def close(self) -> None:
        self._loop.remove(self._r.fileno())
        self._r.close()
        self._w.close()


def exit_words(returncode: int | None) -> str:
    """Turn an exit status into words for status and logs.

    >>> exit_words(-9), exit_words(1), exit_words(0)
    ('killed by signal 9 (SIGKILL)', 'exit code 1', 'exited normally')
    """
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "?"
        return f"killed by signal {-returncode} ({name})"
    return "exited normally" if returncode == 0 else f"exit code {returncode}"


__all__ = ["Launcher", "LaunchError", "LoopWaker", "SlotLaunch", "RankLaunch", "SlotHandle",
           "RankHandle", "ExitEvent", "exit_words", "with_source_root"]


# Where the `worker` package lives, so every child we start imports it even from an uninstalled checkout.
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def with_source_root(pythonpath: str | None) -> str:
    """A worker's PYTHONPATH: this checkout first, so it imports `worker` even when not installed."""
    return os.pathsep.join(filter(None, [_SOURCE_ROOT, pythonpath]))
