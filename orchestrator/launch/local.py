"""The local launcher: worker ranks as child processes of the coordinator (the `Launcher` seam's
reference implementation; see launch/base.py)."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys

from orchestrator.launch.base import TAIL_LINES, Launcher, RankHandle, RankLaunch, SlotHandle, SlotLaunch, exit_words

log = logging.getLogger("orchestrator.launcher")
wlog = logging.getLogger("worker")  # captured worker output


class LocalLauncher(Launcher):
    """Child processes of the coordinator: `python -m worker --spec <WorkerSpec.encode()>`, one per rank.

    Exit is seen the instant it happens through a pidfd per process registered in the event loop (or by
    polling where the kernel has no pidfd). Each worker sets PR_SET_PDEATHSIG on itself first, so none
    outlives a coordinator killed outright. stdout and stderr are pipes read by the loop, logged line by
    line under the rank's worker id, with the last lines kept for the exit report.
    """

    def __init__(self):
        super().__init__()
        self.host = socket.gethostname()
        self._procs: dict = {}  # RankHandle -> (SlotHandle, Popen, pidfd or None)
        self._partial: dict = {}  # (RankHandle, stream) -> unfinished last line

    def start(self, launch: SlotLaunch) -> SlotHandle:
        handle = SlotHandle(launch, [], node=None, host=self.host)
        for r in launch.ranks:
            handle.ranks.append(self._spawn(handle, r))
        return handle

    def _spawn(self, handle: SlotHandle, r: RankLaunch) -> RankHandle:
        popen = subprocess.Popen(
            [sys.executable, "-m", "worker", "--spec", r.spec.encode()],
            env=r.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
        )
        rank = RankHandle(r.rank, r.wid, pid=popen.pid, node=None, host=self.host)
        pidfd = _pidfd(popen.pid)
        self._procs[rank] = (handle, popen, pidfd)
        if pidfd is not None:
            self.loop.add(pidfd, lambda: self._exited(rank))
        for stream in ("stdout", "stderr"):
            pipe = getattr(popen, stream)
            os.set_blocking(pipe.fileno(), False)
            self.loop.add(pipe.fileno(), lambda p=pipe, s=stream: self._on_output(handle, rank, p, s))
        return rank

    def kill(self, handle: SlotHandle, reason: str) -> None:
        for rank in handle.ranks:
            first = rank.note_reason(reason)
            entry = self._procs.get(rank)
            if entry is None or not rank.alive:
                continue
            if first:
                log.info("killing %s: %s", rank.label, reason, extra={"wid": rank.wid, "pool": handle.pool})
            try:
                entry[1].send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass

    def tick(self, now: float) -> None:
        super().tick(now)
        for rank, (_handle, popen, pidfd) in list(self._procs.items()):
            if pidfd is None and popen.poll() is not None:
                self._exited(rank)  # no pidfd on this kernel: fall back to polling

    def close(self, reason: str) -> None:
        for rank, (handle, popen, _pidfd) in list(self._procs.items()):
            self.kill(handle, reason)
            popen.wait()
            self._reap(rank)

    def _reap(self, rank: RankHandle) -> None:
        """Collect the exit status of a process that has ended; forget it. Nothing if already reaped."""
        entry = self._procs.pop(rank, None)
        if entry is None:
            return
        handle, popen, pidfd = entry
        code = popen.wait()
        if pidfd is not None:
            self.loop.remove(pidfd)
            os.close(pidfd)
        rank.ended(exit_words(code))
        if not handle.alive:
            self.stopping.discard(handle)

    def _exited(self, rank: RankHandle) -> None:
        handle = self._procs[rank][0]
        self._reap(rank)
        self._report_exit(handle, rank, rank.log_tail[-3:])

    def _on_output(self, handle: SlotHandle, rank: RankHandle, pipe, stream: str) -> None:
        fd = pipe.fileno()
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF: the process closed it (exiting)
            self.loop.remove(fd)
            pipe.close()
            return
        # Keep a partial last line for the next read, so a traceback's lines are never split.
        text = self._partial.pop((rank, stream), "") + data.decode("utf-8", "replace")
        lines = text.split("\n")
        if lines[-1]:
            self._partial[(rank, stream)] = lines[-1]
        for line in lines[:-1]:
            if line.strip():
                rank.log_tail = (rank.log_tail + [line])[-TAIL_LINES:]
                wlog.info("%s", line, extra={"wid": rank.wid, "pool": handle.pool, "stream": stream})


def _pidfd(pid: int) -> int | None:
    """A pidfd becomes readable the instant the process exits: detection with no polling delay."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
