"""The `orchestrator` command: its parser, and the client commands (submit, status, health, scale, reload,
stop) with keygen and demo; `serve` is orchestrator/cli/serve.py.

Exit codes: 0 success; 1 the request failed (an error reply, printed with its code); 2 bad usage or
config, or (serve) a pool failed to start; 3 no answer from the coordinator within the timeout.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from protocol import JobError

from orchestrator.cli import EXIT_FAILED, EXIT_NO_ANSWER, EXIT_OK, EXIT_USAGE
from orchestrator.cli.serve import add_serve
from orchestrator.config import DEFAULT_ADDRESS


# ---------------------------------------------------------------------------- client commands

def add_client_flags(p) -> None:
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"coordinator endpoint ({DEFAULT_ADDRESS})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer")
    p.add_argument("--curve-server-key", help="the server's public key file (enables CURVE)")
    p.add_argument("--curve-secret-key", help="this client's key pair file")


def make_client(args):
    from orchestrator.client.sync import Client

    curve = None
    if args.curve_server_key:
        curve = {"server_public_key": args.curve_server_key, "secret_key": args.curve_secret_key}
    return Client(args.address, curve=curve, timeout=args.timeout)


def add_submit(sub) -> None:
    p = sub.add_parser("submit", help="submit one job and print its result")
    p.add_argument("pool")
    p.add_argument("input", nargs="?", help="job input as JSON")
    p.add_argument("--text", help="shorthand: input {\"prompt\": TEXT} (generate) / {\"texts\": [TEXT]} "
                                  "(embed pools, with --texts)")
    p.add_argument("--texts", action="store_true", help="with --text: send {\"texts\": [TEXT]}")
    p.add_argument("--stream", action="store_true", help="print stream chunks as they arrive")
    p.add_argument("--job-timeout", type=float, help="server-side job timeout in seconds")
    add_client_flags(p)
    p.set_defaults(func=cmd_submit)


def job_input(args):
    if args.text is not None:
        return {"texts": [args.text]} if args.texts else {"prompt": args.text}
    return json.loads(args.input) if args.input else None


def cmd_submit(args) -> int:
    def submit(c) -> int:
        job = c.submit(args.pool, job_input(args), stream=args.stream, timeout=args.job_timeout)
        if args.stream:
            for chunk in job:
                print(json.dumps(chunk, default=_json_default), flush=True)
        print(json.dumps(job.result(timeout=args.timeout), default=_json_default))
        return EXIT_OK

    return _call(args, submit)


def _json_default(obj):
    if hasattr(obj, "dtype") and hasattr(obj, "shape"):
        return {"dtype": obj.dtype, "shape": list(obj.shape), "bytes": len(obj.data)}
    return repr(obj)


def add_simple(sub, name: str, help: str, func, extra=None) -> None:
    p = sub.add_parser(name, help=help)
    if extra:
        extra(p)
    add_client_flags(p)
    p.set_defaults(func=func)


def _call(args, fn) -> int:
    """Run a client call, mapping errors to exit codes."""
    from orchestrator.client.sync import RequestError

    try:
        with make_client(args) as c:
            return fn(c)
    except RequestError as e:
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NO_ANSWER


def cmd_status(args) -> int:
    from orchestrator.cli.status_table import render_status

    def once(c) -> int:
        st = c.status()
        print(json.dumps(st, indent=2) if args.json else render_status(st), flush=True)
        return EXIT_OK

    if not args.watch:
        return _call(args, once)
    while True:  # --watch: redraw until Ctrl-C
        print("\x1b[2J\x1b[H", end="")
        code = _call(args, once)
        if code:
            return code
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return EXIT_OK


def cmd_health(args) -> int:
    def once(c) -> int:
        h = c.health()
        print(json.dumps(h, indent=2))
        return EXIT_OK if h["status"] == "ready" else EXIT_FAILED

    return _call(args, once)


def cmd_scale(args) -> int:
    return _call(args, lambda c: print(json.dumps(c.scale(args.pool, args.replicas))) or EXIT_OK)


def cmd_reload(args) -> int:
    return _call(args, lambda c: print(json.dumps(c.reload(args.pool))) or EXIT_OK)


def cmd_stop(args) -> int:
    return _call(args, lambda c: print(json.dumps(c.stop(drain=not args.no_drain))) or EXIT_OK)


def cmd_keygen(args) -> int:
    from orchestrator.client.keys import keygen

    try:
        paths = keygen(args.dir, tuple(args.names))
    except OSError as e:
        print(f"orchestrator keygen: {e}", file=sys.stderr)
        return EXIT_USAGE
    for path in paths:
        print(path)
    return EXIT_OK


def cmd_demo(args) -> int:
    from orchestrator.cli.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve(sub)
    add_submit(sub)

    def status_flags(p):
        p.add_argument("--json", action="store_true", help="raw JSON instead of a table")
        p.add_argument("--watch", type=float, nargs="?", const=1.0, help="refresh every N s (default 1)")

    add_simple(sub, "status", "show pools and workers", cmd_status, status_flags)
    add_simple(sub, "health", "show readiness (exit 0 only when every pool is ready)", cmd_health)
    add_simple(sub, "scale", "set a pool's replica count", cmd_scale,
               lambda p: (p.add_argument("pool"), p.add_argument("replicas", type=int)))
    add_simple(sub, "reload", "restart a pool's workers with a fresh failure budget (retries a failed "
               "pool once its cause is fixed)", cmd_reload, lambda p: p.add_argument("pool"))
    add_simple(sub, "stop", "drain and stop the coordinator", cmd_stop,
               lambda p: p.add_argument("--no-drain", action="store_true",
                                        help="fail unfinished jobs instead of waiting for them"))
    kg = sub.add_parser("keygen", help="write CURVE key pairs (NAME.key, NAME.key_secret)")
    kg.add_argument("dir")
    kg.add_argument("--names", nargs="+", default=["server", "client"])
    kg.set_defaults(func=cmd_keygen)
    demo = sub.add_parser("demo", help="run the end-to-end demo (embeddings + streamed generation)")
    demo.add_argument("--devices", default="auto", help="auto (all GPUs, else 2 CPU workers), cpu:N, ids")
    demo.add_argument("--sentences", type=int, default=300)
    demo.add_argument("--prompts", type=int, default=8)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except JobError as e:
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as e:  # bad input JSON, unreadable CURVE key files
        print(f"orchestrator {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        logging.getLogger("orchestrator").info("interrupted")
        return EXIT_FAILED
