"""Assemble and run one worker process: control thread + handler + compute loop.

Built in one order, each part complete when made, nothing filled in later: the control state (what the
coordinator says), the TP group runtime, the handler's context, the control thread, the handler, the
compute loop. Nothing here is slow; the slow work (rendezvous, model load) is in `ComputeLoop.start`.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import zmq

from protocol import Codec, JobError
from protocol.errors import HANDLER_ERROR, HANDLER_INIT_FAILED, LOAD_FAILED, UNKNOWN_HANDLER, WorkerFailure
from protocol.messages import WFatal
from protocol.workerspec import DATA, WorkerSpec
from worker.control import ControlState, ControlThread, connect
from worker.handler import EventSink, Progress, WorkerContext
from worker.handlers import resolve
from worker.guard import GroupError
from worker.runtime import ComputeLoop, Wakeup, short_traceback
from worker.stats import device_stats
from worker.transfers import make_transfers

log = logging.getLogger("worker")

EXIT_FATAL = 4  # a worker-level failure was reported (see _fatal)
# After reporting a fatal failure the worker waits this long for the coordinator to kill it, so that its
# report is always read before its exit is seen (an exit first would hide the reason behind "exit code 4").
FATAL_WAIT_S = 10.0


def rank_device(spec: WorkerSpec) -> str:
    """This rank's torch device. Inside the worker, CUDA_VISIBLE_DEVICES renumbers our devices from 0;
    a TP rank uses cuda:<rank>."""
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):
        return "cpu"
    return f"cuda:{spec.rank if spec.world_size > 1 else 0}"


def build_context(spec: WorkerSpec, state: ControlState, wakeup: Wakeup) -> WorkerContext:
    """The handler's whole context, in one place."""
    device = rank_device(spec)
    group = None
    if spec.world_size > 1:
        from worker.tp import GroupRuntime  # torch: only TP workers pay for it here

        group = GroupRuntime(spec, device, state)
    transfers = make_transfers(device)

    def stats() -> dict:
        # Heartbeats carry the device figures, the transfer pool's counts and, for TP, the guard's cost.
        out = {**device_stats(spec.devices), "transfers": transfers.stats()}
        if group is not None:
            out["guard"] = group.guard_stats()
        return out

    return WorkerContext(wid=spec.wid, pool=spec.pool, devices=spec.devices, device=device,
                         config=spec.config, rank=spec.rank, world_size=spec.world_size, node=spec.node,
                         group=group,
                         sink=EventSink(wakeup.set), progress=Progress(), stats_fn=stats,
                         transfers=transfers)


def serve(spec: WorkerSpec) -> int:
    """Run until told to stop. Returns the process exit code (0 on a graceful stop)."""
    # Ctrl-C in the terminal reaches the whole process group; only the coordinator decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    zctx = zmq.Context()
    wakeup = Wakeup()
    state = ControlState(wake=wakeup.set)
    ctx = build_context(spec, state, wakeup)
    control = ControlThread(zctx, spec, state, ctx.progress, ctx.stats_fn)
    control.start()
    loop = None
    try:
        try:
            loop = ComputeLoop(zctx, spec, _handler(spec, ctx), state, wakeup)
        except WorkerFailure as e:  # the loop (and its data socket) never existed
            return _fatal(zctx, None, spec, state, e)
        return _serve_loop(loop, spec, state)
    finally:
        # Close everything, then term() the context: it waits out the sockets' linger, so the last
        # results (or the fatal reason) are on the wire before the process exits.
        control.close()
        try:
            if loop is not None:
                loop.close()
        except Exception:
            log.exception("closing the handler failed")
        if not control.is_alive():  # term() would wait forever on a socket another thread still holds
            zctx.term()


def _handler(spec: WorkerSpec, ctx: WorkerContext):
    """The pool's handler, built; a failure here is permanent (it would recur on every restart)."""
    try:
        cls = resolve(spec.handler)
    except Exception as e:  # an unknown name, a module that does not import, a missing class
        raise WorkerFailure(UNKNOWN_HANDLER, f"handler {spec.handler!r}: {type(e).__name__}: {e}") from e
    try:
        return cls(ctx)
    except WorkerFailure:
        raise
    except Exception as e:  # a bug or a bad value in the handler's __init__: the same on every attempt
        raise WorkerFailure(HANDLER_INIT_FAILED, f"{spec.handler}: {type(e).__name__}: {e}") from e


def _serve_loop(loop: ComputeLoop, spec: WorkerSpec, state: ControlState) -> int:
    try:
        loop.start()
    except Exception as e:
        return _fatal(loop.zctx, loop.sock, spec, state, e, loading=True)
    log.info("ready: handler=%s devices=%s", spec.handler, spec.devices)
    try:
        if loop.group is not None and spec.rank > 0:
            loop.group.follow(loop)  # ranks > 0 take their work from rank 0, never from the coordinator
        else:
            loop.run()
    except Exception as e:
        return _fatal(loop.zctx, loop.sock, spec, state, e)
    log.info("stopped: %s", state.stop_reason)
    return 0


def fatal_report(exc: BaseException, loading: bool = False) -> tuple[str, str]:
    """(code, one-line reason) for a worker-level failure. A WorkerFailure carries its own code; any
    other exception while loading is `load_failed` (transient); later, a GroupError's code or
    `handler_error`."""
    if isinstance(exc, WorkerFailure):
        return exc.code, exc.message
    if isinstance(exc, JobError):  # a GroupError (its own code), or a JobError raised outside any job
        code, message = exc.code, exc.message
    else:
        code, message = HANDLER_ERROR, f"{type(exc).__name__}: {exc}"
    if loading and not isinstance(exc, GroupError):
        code = LOAD_FAILED
    return code, message


def _fatal(zctx: zmq.Context, sock, spec: WorkerSpec, state: ControlState, exc: Exception,
           loading: bool = False) -> int:
    """Report a worker-level failure (load error, collective mismatch) and wait to be killed.

    The report carries the one-line reason the coordinator shows in status and health, and the traceback
    (none for a WorkerFailure raised on purpose: its message says it all). The coordinator logs a
    traceback once, not again when the next attempt fails the same way; so this log line has none."""
    code, message = fatal_report(exc, loading)
    cause = exc.__cause__ if isinstance(exc, WorkerFailure) else exc
    details = {"traceback": short_traceback(cause, limit=12)} if cause is not None else None
    log.error("fatal: %s: %s", code, message)
    if sock is None:  # failed before the data socket existed: one with the data socket's routing id
        sock = connect(zctx.socket(zmq.DEALER), spec, DATA)
    sock.send(Codec().encode(WFatal(spec.wid, spec.incarnation, code, message[-4000:], details)))
    sock.close(linger=1000)  # the context's term() waits up to 1 s for the reason to be delivered
    sys.stderr.flush()
    state.stop_event.wait(FATAL_WAIT_S)  # normally the coordinator's kill ends us here
    return EXIT_FATAL
