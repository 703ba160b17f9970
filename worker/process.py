"""Assemble and run one worker process: control thread + handler + compute loop."""
from __future__ import annotations

import logging
import signal
import sys

import zmq

from protocol import Codec, JobError
from protocol.errors import HANDLER_INIT_FAILED, LOAD_FAILED, UNKNOWN_HANDLER, WorkerFailure
from protocol.messages import WFatal
from worker.control import ControlThread, Progress
from worker.guard import GroupError
from worker.handlers import resolve
from worker.runtime import ComputeLoop, outcome_error, short_traceback
from worker.stats import device_stats

log = logging.getLogger("worker")

EXIT_FATAL = 4  # a worker-level failure was reported (see _fatal)


# After reporting a fatal failure the worker waits this long for the coordinator to kill it, so that its
# report is always read before its exit is seen (an exit first would hide the reason behind "exit code 4").
FATAL_WAIT_S = 10.0


def serve(spec: dict, ctx) -> int:
    """Run until told to stop. Returns the process exit code (0 on a graceful stop)."""
    # Ctrl-C in the terminal reaches the whole process group; only the coordinator decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    zctx = zmq.Context()
    progress, cancelled = Progress(), set()
    control = ControlThread(zctx, spec, progress, cancelled)
    control.stats_fn = lambda: device_stats(ctx)
    control.start()
    loop = None
    try:
        loop = _build(zctx, spec, ctx, control, progress)
        return _serve_loop(loop, ctx, spec, control)
    except WorkerFailure as e:  # the handler's class or constructor: the loop (and its socket) never existed
        return _fatal(zctx, None, spec, control, e)
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


def _build(zctx, spec: dict, ctx, control: ControlThread, progress: Progress) -> ComputeLoop:
    """The handler and its compute loop; a failure here is permanent (it would recur on every restart)."""
    try:
        cls = resolve(spec["handler"])
    except Exception as e:  # an unknown name, a module that does not import, a missing class
        raise WorkerFailure(UNKNOWN_HANDLER, f"handler {spec['handler']!r}: {type(e).__name__}: {e}") from e
    try:
        handler = cls(ctx)
    except WorkerFailure:
        raise
    except Exception as e:  # a bug or a bad value in the handler's __init__: the same on every attempt
        raise WorkerFailure(HANDLER_INIT_FAILED, f"{spec['handler']}: {type(e).__name__}: {e}") from e
    if ctx.world_size > 1:
        from worker.tp import GroupRuntime

        ctx.group = GroupRuntime(ctx, control, spec)
    return ComputeLoop(zctx, spec, handler, control, progress)


def _serve_loop(loop: ComputeLoop, ctx, spec: dict, control: ControlThread) -> int:
    try:
        loop.start()
    except Exception as e:
        return _fatal(loop.zctx, loop.sock, spec, control, e, loading=True)
    log.info("ready: handler=%s devices=%s", spec["handler"], spec["devices"])
    try:
        if ctx.group is not None and ctx.rank > 0:
            ctx.group.follow(loop)  # ranks > 0 take their work from rank 0, never from the coordinator
        else:
            loop.run()
    except Exception as e:
        return _fatal(loop.zctx, loop.sock, spec, control, e)
    log.info("stopped: %s", control.stop_reason)
    return 0


def fatal_report(exc: BaseException, loading: bool = False) -> tuple[str, str]:
    """(code, one-line reason) for a worker-level failure. A WorkerFailure carries its own code; any
    other exception while loading is `load_failed` (transient); later, a GroupError's code or
    `handler_error`."""
    if isinstance(exc, WorkerFailure):
        return exc.code, exc.message
    code, _ = outcome_error(exc)
    if loading and not isinstance(exc, GroupError):
        code = LOAD_FAILED
    message = exc.message if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"
    return code, message


def _fatal(zctx, sock, spec: dict, control: ControlThread, exc: Exception, loading: bool = False) -> int:
    """Report a worker-level failure (load error, collective mismatch) and wait to be killed.

    The report carries the one-line reason the coordinator shows in status and health, and the traceback
    (none for a WorkerFailure raised on purpose: its message says it all). The coordinator logs a
    traceback once, not again when the next attempt fails the same way; so this log line has none."""
    code, message = fatal_report(exc, loading)
    cause = exc.__cause__ if isinstance(exc, WorkerFailure) else exc
    details = {"traceback": short_traceback(cause, limit=12)} if cause is not None else None
    log.error("fatal: %s: %s", code, message)
    if sock is None:  # failed before the data socket existed: one with the data socket's routing id
        sock = zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, f"d:{spec['wid']}:{spec['incarnation']}".encode())
        sock.connect(spec["endpoint"])
    sock.send(Codec().encode(WFatal(spec["wid"], spec["incarnation"], code, message[-4000:], details)))
    sock.close(linger=1000)  # the context's term() waits up to 1 s for the reason to be delivered
    sys.stderr.flush()
    control.stop_event.wait(FATAL_WAIT_S)  # normally the coordinator's kill ends us here
    return EXIT_FATAL
