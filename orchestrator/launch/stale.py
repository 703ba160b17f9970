"""Find leftover worker processes of earlier runs (their coordinator is gone) and optionally kill them.

PR_SET_PDEATHSIG normally makes this a no-op; it catches workers whose parent died in a way the kernel
did not report (e.g. PID namespaces) and anything started by hand.
"""
from __future__ import annotations

import logging
import os

import psutil

from protocol import ProtocolError
from protocol.workerspec import WorkerSpec

log = logging.getLogger("orchestrator.stale")


def find_stale() -> list[dict]:
    """Worker processes (`python -m worker --spec ...`) whose recorded coordinator is not running."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        spec = _worker_spec(proc.info.get("cmdline") or [])
        if spec is None or proc.info["pid"] == os.getpid():
            continue
        parent = spec.parent_pid
        if parent and psutil.pid_exists(parent) and _is_parent(proc, parent):
            continue  # a live worker of a live coordinator (possibly another run): not ours to touch
        found.append({"pid": proc.info["pid"], "wid": spec.wid, "devices": spec.devices,
                      "endpoint": spec.endpoint, "proc": proc})
    return found


def _worker_spec(cmdline: list) -> WorkerSpec | None:
    if "-m" not in cmdline or "--spec" not in cmdline:
        return None
    i = cmdline.index("-m")
    if i + 1 >= len(cmdline) or cmdline[i + 1] != "worker":
        return None
    try:
        return WorkerSpec.decode(cmdline[cmdline.index("--spec") + 1])
    except (IndexError, ProtocolError):  # not one of ours (or of another version): leave it alone
        return None


def _is_parent(proc: psutil.Process, parent_pid: int) -> bool:
    try:
        return proc.ppid() == parent_pid
    except psutil.Error:
        return False


def handle_stale(cfg) -> list[dict]:
    """Report leftovers; kill them when cfg.kill_stale. Returns what was found."""
    stale = find_stale()
    for s in stale:
        action = "killing" if cfg.kill_stale else "found (use --kill-stale to end it)"
        log.warning("stale worker pid %s (%s, devices %s, from %s): %s", s["pid"], s["wid"],
                    s["devices"], s["endpoint"], action)
        if cfg.kill_stale:
            try:
                s["proc"].kill()
                s["proc"].wait(5)
            except psutil.Error:
                pass
    return stale
