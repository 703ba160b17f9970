"""Gateway process entry point: ``python -m orchestrator.http --spec JSON``. Started by the coordinator only.

1. die with the parent (PR_SET_PDEATHSIG, and a parent-pid check every second), so no gateway outlives
   its coordinator;
2. serve the app on the listening socket the coordinator bound and passed down (fd in the spec).
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import signal
import socket
import sys

PR_SET_PDEATHSIG = 1
PARENT_CHECK_S = 1.0
log = logging.getLogger("orchestrator.http")


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when our parent dies, then close the race where it already did."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(3)


async def watch_parent(parent_pid: int) -> None:
    """Belt and braces for PR_SET_PDEATHSIG (which follows the parent *thread*)."""
    while True:
        await asyncio.sleep(PARENT_CHECK_S)
        if os.getppid() != parent_pid:
            log.error("coordinator (pid %s) is gone; exiting", parent_pid)
            os._exit(3)


async def serve(spec: dict) -> None:
    import uvicorn

    from orchestrator.http.app import Gateway
    from orchestrator.config import load_keys

    keys = load_keys(spec["api_key_file"]) if spec.get("api_key_file") else None
    app = Gateway(spec, keys).app()
    sock = socket.socket(fileno=spec["fd"])  # bound and listening already (the coordinator owns the port)
    config = uvicorn.Config(app, loop="asyncio", http="h11", lifespan="on", access_log=False,
                            log_config=None, timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    watcher = asyncio.get_running_loop().create_task(watch_parent(spec["parent_pid"]))
    log.info("http gateway serving on %s (coordinator %s)", spec["url"], spec["endpoint"])
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.http", description=__doc__)
    parser.add_argument("--spec", required=True, help="gateway spec as JSON (written by the coordinator)")
    spec = json.loads(parser.parse_args(argv).spec)
    die_with_parent(spec["parent_pid"])
    from orchestrator import logs

    logs.setup(spec.get("log_format", "text"), spec.get("log_level", "INFO"))
    asyncio.run(serve(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
