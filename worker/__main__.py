"""Worker process entry point: ``python -m worker --spec SPEC``. Started by the coordinator only.

Order matters and is the reason this file exists:
1. die with the parent (PR_SET_PDEATHSIG) before anything slow, so no orphan can outlive a SIGKILLed
   coordinator;
2. pin CPU affinity, before torch sizes its thread pools;
3. CUDA_VISIBLE_DEVICES is already in our environment (the coordinator set it), so CUDA, if a handler
   starts it, only ever sees this worker's devices;
4. connect, load the handler, report READY, serve.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys

from protocol import ProtocolError
from protocol.workerspec import WorkerSpec

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when our parent dies, then close the race where it already did."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(3)


def pin_cores(cores: list | None) -> None:
    if cores:
        try:
            os.sched_setaffinity(0, cores)
        except (AttributeError, OSError) as e:  # containers may forbid it; placement stays advisory
            logging.getLogger("worker").warning("could not set CPU affinity %s: %s", cores, e)


def setup_logging(spec: WorkerSpec) -> None:
    # The coordinator prefixes each captured line with the worker id; JSON mode keeps lines parseable.
    fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=spec.log_level.upper(), format=fmt, stream=sys.stderr)


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--spec", required=True,
                        help="worker spec, msgpack in URL-safe base64 (protocol/workerspec.py)")
    try:
        spec = WorkerSpec.decode(parser.parse_args(argv).spec)
    except ProtocolError as e:  # a coordinator of another version, or a hand-made spec: one line
        print(f"python -m worker: bad --spec: {e.message}", file=sys.stderr)
        return 2
    die_with_parent(spec.parent_pid)
    pin_cores(spec.cores)
    setup_logging(spec)
    from worker.process import serve

    code = serve(spec)
    # Skip interpreter teardown (torch, NCCL and gloo can take seconds to unwind); everything we own
    # was closed by serve() and the coordinator is waiting to reap us.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
