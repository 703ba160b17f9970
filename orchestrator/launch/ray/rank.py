"""One rank of a slot as a small Ray actor, pinned to its bundle of the slot's placement group.

The actor does no work itself: it starts the ordinary worker process (`python -m worker`) as its child,
with the devices Ray assigned it, and reports the child's exit. So the worker process, its handlers and
its protocol are the same as with the local launcher; only who starts it differs.

Imported only in Ray mode, inside Ray's own worker processes (every node needs this package installed).
Nothing here imports torch.

Why the child dies with the actor: it sets PR_SET_PDEATHSIG against its parent, and the spec's
`parent_pid` is this actor's pid; Ray also kills an actor's child processes when the actor exits. The
actor in turn fate-shares with the coordinator (the Ray driver): when the driver's job ends, Ray kills the
job's actors. And a worker that hears nothing from the coordinator for `coord_timeout` exits by itself.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque

from protocol.workerspec import WorkerSpec
from orchestrator.launch.base import TAIL_LINES
from orchestrator.launch.base import with_source_root


class RankActor:
    """Construct cheaply; `where()` says where Ray put us; `launch()` starts the worker; `wait()` blocks
    until it exits (run it on its own actor thread: the actor has max_concurrency > 1); `kill()`."""

    def __init__(self, wid: str):
        self.wid = wid
        self.proc: subprocess.Popen | None = None
        self.tail: deque = deque(maxlen=TAIL_LINES)
        self._pump: threading.Thread | None = None
        self._launched = threading.Event()

    def where(self) -> dict:
        """This actor's node, host and the accelerator ids Ray assigned to its bundle."""
        import ray

        ctx = ray.get_runtime_context()
        gpus = ctx.get_accelerator_ids().get("GPU", [])
        return {"node": ctx.get_node_id(), "host": socket.gethostname(), "actor_pid": os.getpid(),
                "gpus": [str(g) for g in gpus]}

    def launch(self, spec_text: str, env: dict, node: str) -> dict:
        """Start the worker process: {"pid", "nice"}. `env` is what the coordinator sets on top of this
        node's environment (CUDA_VISIBLE_DEVICES and the NCCL safety variables among them)."""
        # The worker's orphan checks watch this actor, and its boot time is measured on this host's clock.
        spec = dataclasses.replace(WorkerSpec.decode(spec_text), parent_pid=os.getpid(), node=node,
                                   spawned_at=time.monotonic())
        full = dict(os.environ)
        full.update(env)
        full["PYTHONPATH"] = with_source_root(os.environ.get("PYTHONPATH"))  # this node's checkout
        self.proc = subprocess.Popen([sys.executable, "-m", "worker", "--spec", spec.encode()], env=full,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, close_fds=True)
        nice = _unnice(self.proc.pid)
        self._pump = threading.Thread(target=self._copy_output, name="rank-output", daemon=True)
        self._pump.start()
        self._launched.set()
        return {"pid": self.proc.pid, "nice": nice}

    def _copy_output(self) -> None:
        """Keep the last lines for the exit report; echo each line to the actor's stderr, which Ray
        forwards to the coordinator (the Ray driver) and keeps in the node's logs."""
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.strip():
                self.tail.append(line)
                print(f"[{self.wid}] {line}", file=sys.stderr, flush=True)

    def wait(self) -> dict:
        """Block until the worker exits: {"returncode", "tail"} (returncode < 0: killed by that signal)."""
        self._launched.wait()
        code = self.proc.wait()
        if self._pump is not None:
            self._pump.join(2.0)  # its last lines are often the reason
        return {"returncode": code, "tail": list(self.tail)[-3:]}

    def kill(self) -> None:
        """SIGKILL the worker (idempotent); `wait()` then reports "killed by signal 9"."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _unnice(pid: int) -> int:
    """Ray runs its actors at a low priority (niceness 15, `RAY_worker_niceness`), and a child inherits
    it: on a busy node the worker would lose the CPU to every ordinary process, and its dispatch
    latency with it. Put the worker back at niceness 0 where we may (root or CAP_SYS_NICE; done before
    the new process starts threads, which inherit it). Returns the worker's niceness."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 0)
    except OSError:
        pass  # not permitted: it stays at Ray's niceness, and the coordinator says so
    try:
        return os.getpriority(os.PRIO_PROCESS, pid)
    except OSError:
        return 0
