"""Assemble and run one worker process: control thread + handler + compute loop."""
from __future__ import annotations

import logging
import signal
import sys

import zmq

from protocol import Codec, curve
from protocol.messages import WFatal
from worker.control import ControlThread, Progress
from worker.handlers import resolve
from worker.runtime import ComputeLoop, outcome_error
from worker.stats import device_stats

log = logging.getLogger("worker")


def serve(spec: dict, ctx) -> int:
    """Run until told to stop. Returns the process exit code (0 on a graceful stop)."""
    # Ctrl-C in the terminal reaches the whole process group; only the coordinator decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    zctx = zmq.Context()
    progress, cancelled = Progress(), set()
    control = ControlThread(zctx, spec, progress, cancelled)
    control.stats_fn = lambda: device_stats(ctx)
    control.start()
    handler = resolve(spec["handler"])(ctx)
    if ctx.world_size > 1:
        from worker.tp import GroupRuntime

        ctx.group = GroupRuntime(ctx, control, spec)
    loop = ComputeLoop(zctx, spec, handler, control, progress)
    try:
        return _serve_loop(loop, ctx, spec, control)
    finally:
        # Close everything, then term() the context: it waits out the sockets' linger, so the last
        # results (or the fatal reason) are on the wire before the process exits.
        control.close()
        try:
            loop.close()
        except Exception:
            log.exception("closing the handler failed")
        if not control.is_alive():  # term() would wait forever on a socket another thread still holds
            zctx.term()


def _serve_loop(loop: ComputeLoop, ctx, spec: dict, control: ControlThread) -> int:
    try:
        loop.start()
    except Exception as e:
        return _fatal(loop, spec, e)
    log.info("ready: handler=%s devices=%s", spec["handler"], spec["devices"])
    try:
        if ctx.group is not None and ctx.rank > 0:
            ctx.group.follow(loop)  # ranks > 0 take their work from rank 0, never from the coordinator
        else:
            loop.run()
    except Exception as e:
        return _fatal(loop, spec, e)
    log.info("stopped: %s", control.stop_reason)
    return 0


def _fatal(loop: ComputeLoop, spec: dict, exc: Exception) -> int:
    """Report a worker-level failure (load error, collective mismatch) and exit non-zero."""
    code, message = outcome_error(exc)
    code = getattr(exc, "code", None) or ("load_failed" if code == "handler_error" else code)
    log.error("fatal: %s", message)
    sock = loop.sock
    if sock is None:  # failed before the data socket existed: a throwaway socket still reaches home
        sock = loop.zctx.socket(zmq.DEALER)
        curve.apply_client(sock, curve.CurveClientKeys.from_spec(spec.get("curve")))
        sock.connect(spec["endpoint"])
    sock.send(Codec().encode(WFatal(spec["wid"], spec["incarnation"], code, message[-4000:])))
    sock.close(linger=1000)  # the context's term() waits up to 1 s for the reason to be delivered
    sys.stderr.flush()
    return 4
