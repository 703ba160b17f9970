"""`orchestrator serve`: its flags, and running a coordinator in the foreground until it stops. The flags
are merged over the config file by `orchestrator.config.build_config`."""
from __future__ import annotations

import dataclasses
import sys

from protocol import Limits

from orchestrator import logs
from orchestrator.cli import EXIT_USAGE
from orchestrator.config import DEFAULT_ADDRESS, build_config, validate

# serve holds its log lines while the pools first load, so that a startup failure is the first line on
# stderr; a load still going after this many seconds releases them (a slow model is not silent for long).
LOG_HOLD_S = 15.0


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


def cmd_serve(args) -> int:
    from orchestrator.core.coordinator import Coordinator
    from orchestrator.security.bind import InsecureBind
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
