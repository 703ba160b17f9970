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

from protocol import Codec, curve
from protocol.errors import HANDLER_ERROR, LOAD_FAILED
from protocol.messages import WFatal
from protocol.workerspec import WorkerSpec
from worker.control import ControlState, ControlThread
from worker.handler import EventSink, Progress, WorkerContext
from worker.handlers import resolve
from worker.runtime import ComputeLoop, Wakeup, outcome_error
from worker.stats import device_stats
from worker.transfers import make_transfers

log = logging.getLogger("worker")


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
            loop = ComputeLoop(zctx, spec, resolve(spec.handler)(ctx), state, wakeup)
        except Exception as e:  # the handler's class could not be found or built
            return _fatal(zctx, None, spec, e)
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


def _serve_loop(loop: ComputeLoop, spec: WorkerSpec, state: ControlState) -> int:
    try:
        loop.start()
    except Exception as e:
        return _fatal(loop.zctx, loop.sock, spec, e)
    log.info("ready: handler=%s devices=%s", spec.handler, spec.devices)
    try:
        if loop.group is not None and spec.rank > 0:
            loop.group.follow(loop)  # ranks > 0 take their work from rank 0, never from the coordinator
        else:
            loop.run()
    except Exception as e:
        return _fatal(loop.zctx, loop.sock, spec, e)
    log.info("stopped: %s", state.stop_reason)
    return 0


def _fatal(zctx: zmq.Context, sock, spec: WorkerSpec, exc: Exception) -> int:
    """Report a worker-level failure (load error, collective mismatch) and exit non-zero."""
    code, message = outcome_error(exc)
    code = getattr(exc, "code", None) or (LOAD_FAILED if code == HANDLER_ERROR else code)
    log.error("fatal: %s", message)
    if sock is None:  # failed before the data socket existed: a throwaway socket still reaches home
        sock = zctx.socket(zmq.DEALER)
        curve.apply_client(sock, spec.curve_keys())
        sock.connect(spec.endpoint)
    sock.send(Codec().encode(WFatal(spec.wid, spec.incarnation, code, message[-4000:])))
    sock.close(linger=1000)  # the context's term() waits up to 1 s for the reason to be delivered
    sys.stderr.flush()
    return 4
