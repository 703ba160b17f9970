"""The `orchestrator` command: serve, submit, status, health, scale, reload, stop, keygen, demo.

Exit codes: 0 success; 1 the request failed (an error reply, printed with its code); 2 bad usage or
config, or (serve) a pool failed to start; 3 no answer from the coordinator within the timeout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from protocol import JobError, Limits

from orchestrator import logs
from orchestrator.config import DEFAULT_ADDRESS, PoolConfig, ServerConfig, load_toml, validate

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3
# serve holds its log lines while the pools first load, so that a startup failure is the first line on
# stderr; a load still going after this many seconds releases them (a slow model is not silent for long).
LOG_HOLD_S = 15.0


# ---------------------------------------------------------------------------- serve


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run a coordinator and its workers in the foreground",
                       description="Run a coordinator. With no --config/--handler it serves an `embed` "
                                   "pool on the bundled MiniLM, on every visible GPU or 2 CPU workers.")
    p.add_argument("--config", help="TOML file declaring [server], [limits] and [pools.NAME] tables")
    p.add_argument("--address", help=f"client endpoint (default {DEFAULT_ADDRESS}; tcp://HOST:0 picks "
                                     f"a free port; ipc:// works too)")
    p.add_argument("--devices", help="auto | cpu:N | GPU ids like 0,1,2,3 (default auto)")
    p.add_argument("--pool", help="pool name for a single flag-defined pool (default: handler name); with "
                   "--config, the file's pool that the pool flags and --model apply to")
    p.add_argument("--handler", help="built-in handler name or module:Class (default embed)")
    p.add_argument("--model", help="model path or hub id for generate/embed handlers")
    p.add_argument("--handler-config", help="extra handler config as JSON")
    p.add_argument("--tp", type=int, help="tensor-parallel ranks per group")
    p.add_argument("--replicas", type=int, help="worker slots to start (default: all the devices allow)")
    p.add_argument("--workers-per-device", type=int)
    p.add_argument("--capacity", type=int, help="credits (in-flight jobs) per worker")
    p.add_argument("--retries", type=int, help="retry budget per job (default 2)")
    p.add_argument("--step-budget", type=float, help="seconds before a busy worker is declared stuck")
    p.add_argument("--max-restarts", type=int,
                   help="failure budget per worker slot: transient failures per --restart-window (10)")
    p.add_argument("--restart-window", type=float, metavar="S",
                   help="seconds over which --max-restarts failures are counted (600)")
    p.add_argument("--keep-going", action="store_true",
                   help="serve the pools that loaded even if another failed to start (else exit 2)")
    p.add_argument("--hb-interval", type=float)
    p.add_argument("--hb-timeout", type=float)
    p.add_argument("--drain-timeout", type=float)
    p.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics on this port (0: a free port, printed as `metrics: URL`)")
    p.add_argument("--http-port", type=int, help="serve the OpenAI-compatible HTTP API on this port "
                                                 "(0: a free port, printed as `http: URL`)")
    p.add_argument("--http-host", help="HTTP bind host (default 127.0.0.1; any other needs --api-key-file "
                                       "or --insecure)")
    p.add_argument("--api-key-file", help="HTTP API keys, one per line, checked as `Authorization: Bearer KEY`")
    p.add_argument("--http-job-timeout", type=float, help="seconds each HTTP request's job may run")
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument("--log-level")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without CURVE")
    p.add_argument("--curve-secret-key", help="server key pair file (from `orchestrator keygen`)")
    p.add_argument("--authorized-keys", help="directory of client public key files")
    p.add_argument("--kill-stale", action="store_true", help="kill leftover workers of earlier runs")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="place workers on a Ray cluster: auto (a running cluster or RAY_ADDRESS) or "
                        "HOST:PORT; pools then use devices ray:N (GPUs) or ray-cpu:N ([cluster] ray)")
    p.add_argument("--worker-address", metavar="HOST",
                   help="Ray mode: the host the worker socket binds, which remote workers connect to "
                        "(default: this host's address on the Ray network)")
    p.add_argument("--placement-timeout", type=float, metavar="S",
                   help="Ray mode: seconds the first slots may take to be placed (default 60)")
    for f in dataclasses.fields(Limits):  # --max-message-bytes, --max-bin-len, ... (README, "Limits")
        p.add_argument("--" + f.name.replace("_", "-"), type=int, metavar="N",
                       help=f"[limits] {f.name} (default {f.default})")
    p.add_argument("--max-pending-per-client", type=int, metavar="N",
                   help="unfinished jobs one client connection may have; more: `overloaded` (100000)")
    p.add_argument("--max-queued", type=int, metavar="N",
                   help="[server] max_queued_total: queued jobs across pools; more: `overloaded` (1000000)")
    p.set_defaults(func=cmd_serve)


_SERVER_FLAGS = {"address": "address", "hb_interval": "hb_interval", "hb_timeout": "hb_timeout",
                 "drain_timeout": "drain_timeout", "metrics_port": "metrics_port",
                 "log_format": "log_format", "log_level": "log_level",
                 "curve_secret_key": "curve_secret_key", "authorized_keys": "authorized_keys",
                 "max_pending_per_client": "max_pending_per_client", "max_queued": "max_queued_total",
                 "ray": "ray", "worker_address": "worker_address", "placement_timeout": "placement_timeout"}
_HTTP_FLAGS = {"http_port": "port", "http_host": "host", "api_key_file": "api_key_file",
               "http_job_timeout": "job_timeout"}
_POOL_FLAGS = ("devices", "tp", "replicas", "workers_per_device", "capacity", "retries", "step_budget",
               "max_restarts", "restart_window")


def build_config(args) -> ServerConfig:
    """Config file first, then flags on top. Without a file, flags define one pool."""
    cfg = load_toml(args.config) if args.config else ServerConfig()
    for flag, attr in _SERVER_FLAGS.items():
        if getattr(args, flag) is not None:
            setattr(cfg, attr, getattr(args, flag))
    for flag, attr in _HTTP_FLAGS.items():
        if getattr(args, flag) is not None:
            setattr(cfg.http, attr, getattr(args, flag))
    if cfg.http.port is not None and cfg.metrics_port is None:
        cfg.metrics_port = 0  # the gateway's GET /metrics proxies the coordinator's registry (loopback)
    cfg.insecure = cfg.insecure or args.insecure
    cfg.kill_stale = cfg.kill_stale or args.kill_stale
    cfg.keep_going = cfg.keep_going or args.keep_going
    limits = {f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)
              if getattr(args, f.name) is not None}
    cfg.limits = dataclasses.replace(cfg.limits, **limits)
    if not cfg.pools or args.handler:
        cfg.pools = [flag_pool(args)] + [p for p in cfg.pools if p.name != (args.pool or args.handler)]
    else:
        override_file_pool(cfg.pools, args)
    return cfg


def override_file_pool(pools: list, args) -> None:
    """Pool flags on top of a config file's pools: they go to the pool `--pool` names, or to the file's only
    pool. A flag that cannot tell which pool it is for is an error, never silently dropped."""
    given = [f"--{f.replace('_', '-')}" for f in (*_POOL_FLAGS, "model", "handler_config")
             if getattr(args, f) is not None]
    if not given and args.pool is None:
        return
    names = [p.name for p in pools]
    if args.pool is not None and args.pool not in names:
        raise ValueError(f"--pool {args.pool!r}: the config file has no such pool (pools: {', '.join(names)})")
    if args.pool is None and len(pools) > 1:
        raise ValueError(f"{' '.join(given)} would apply to one pool, but the config file has {len(pools)} "
                         f"({', '.join(names)}): name it with --pool")
    pool = pools[names.index(args.pool)] if args.pool is not None else pools[0]
    apply_pool_flags(pool, args)
    if args.handler_config:
        pool.config = {**pool.config, **json.loads(args.handler_config)}
    if args.model:
        pool.config = {**pool.config, "model": args.model}


def flag_pool(args) -> PoolConfig:
    handler = args.handler or "embed"
    config = json.loads(args.handler_config) if args.handler_config else {}
    if args.model:
        config["model"] = args.model
    pool = PoolConfig(name=args.pool or handler, handler=handler, config=config)
    apply_pool_flags(pool, args)
    return pool


def apply_pool_flags(pool: PoolConfig, args) -> None:
    for flag in _POOL_FLAGS:
        if getattr(args, flag) is not None:
            setattr(pool, flag, getattr(args, flag))


def cmd_serve(args) -> int:
    from orchestrator.core.coordinator import Coordinator
    from orchestrator.security.curve import InsecureBind
    from orchestrator.launch.stale import handle_stale

    try:
        cfg = build_config(args)
        validate(cfg)
    except (ValueError, OSError) as e:
        print(f"orchestrator serve: bad config: {e}", file=sys.stderr)
        return EXIT_USAGE
    held = logs.setup(cfg.log_format, cfg.log_level, hold=LOG_HOLD_S)
    coord = Coordinator(cfg, on_startup=lambda failures: _started(failures, cfg.keep_going, held))
    try:
        handle_stale(cfg)
        endpoint = coord.start()
    except (InsecureBind, ValueError) as e:
        coord.shutdown()
        print(f"orchestrator serve: {e}", file=sys.stderr, flush=True)  # first, before the held log lines
        held.release_held()
        return EXIT_USAGE
    print(f"endpoint: {endpoint}", flush=True)
    for pool in coord.pools.values():
        print(f"pool {pool.name}: handler={pool.cfg.handler} tp={pool.cfg.tp} slots={pool.desired} "
              f"devices={','.join(pool.device_set.ids)}", flush=True)
    if coord.metrics.url:
        print(f"metrics: {coord.metrics.url}", flush=True)
    if coord.gateway is not None:
        print(f"http: {coord.gateway.url}", flush=True)
    try:
        return coord.run()
    finally:
        held.release_held()


def _started(failures: dict, keep_going: bool, held) -> None:
    """Every pool's first load settled: name each failed pool first on stderr, then release the log."""
    for pool, reason in failures.items():
        print(f"orchestrator serve: pool {pool!r} failed to start: {reason}", file=sys.stderr, flush=True)
    if failures:
        then = "serving the other pools (--keep-going)" if keep_going else \
            "stopping everything (exit 2); --keep-going serves the other pools"
        print(f"orchestrator serve: {then}", file=sys.stderr, flush=True)
    held.release_held()


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
    from orchestrator.security.curve import keygen

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
