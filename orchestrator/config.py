"""Server configuration: one dataclass tree, filled from a TOML file and/or CLI flags.

Every knob lives here (no scattered environment variables). The TOML format is documented in README.md.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from protocol import Limits
from protocol.workerspec import GUARD_TIMEOUT_S
from orchestrator.security.bind import is_loopback_host

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"


@dataclass
class PoolConfig:
    """What to launch for one pool: a handler + its config on a device set, as `replicas` slots of
    `tp` ranks each (or `workers_per_device` slots per device)."""

    name: str
    handler: str = "echo"
    config: dict = field(default_factory=dict)  # handler config (model, dtype, ...); never from a client
    devices: str = "auto"
    tp: int = 1
    replicas: int | None = None  # None: one slot per device group the device spec allows
    workers_per_device: int = 1
    capacity: int | None = None  # credits per slot; None: the handler's own default
    queue_size: int = 10_000  # bounded pool queue; a full queue answers `overloaded`
    retries: int = 2  # per-job retry budget after worker deaths (a job may kill retries+1 workers)
    step_budget: float | None = 300.0  # seconds a step may run before the worker is declared stuck
    load_budget: float = 900.0  # seconds a worker may take to load before it is declared stuck
    # Failure budget per slot: more than `max_restarts` transient failures within `restart_window` seconds
    # and the slot is `failed` until one of them leaves the window (then the reconcile step retries it).
    # A permanent failure (bad config, unknown handler, missing model) is `failed` at once, no restarts.
    max_restarts: int = 10
    restart_window: float = 600.0
    restart_backoff: float = 0.05  # first restart delay, doubled per consecutive failure
    restart_backoff_max: float = 5.0
    cpu_threads: int | None = None  # torch threads per CPU worker; None: its share of the cores
    cpu_affinity: bool = True  # pin each worker to its share of the cores (False: its threads may run anywhere)
    env: dict = field(default_factory=dict)  # extra environment for this pool's workers
    guard_timeout: float = GUARD_TIMEOUT_S  # tp > 1: seconds a rank waits for the others at a guard step


@dataclass
class HttpConfig:
    """The OpenAI-compatible HTTP gateway (README, "HTTP"): off unless a port is given."""

    port: int | None = None  # None: no gateway; 0: a free port (serve prints `http: URL`)
    host: str = "127.0.0.1"  # a non-loopback host needs api_key_file, or [server] insecure
    api_key_file: str | None = None  # one accepted key per non-empty line, sent as `Authorization: Bearer KEY`
    job_timeout: float | None = None  # seconds each HTTP request's job may run (its `timeout`); None: no limit


@dataclass
class ServerConfig:
    address: str = DEFAULT_ADDRESS
    pools: list = field(default_factory=list)
    hb_interval: float = 0.5  # worker and coordinator heartbeat period
    hb_timeout: float = 2.5  # a worker silent this long is dead (declared within hb_timeout + 0.5 s)
    coord_timeout: float = 10.0  # a worker that hears no coordinator this long exits
    drain_timeout: float = 60.0  # SIGTERM/stop: how long in-flight jobs get to finish
    stop_timeout: float = 5.0  # per stage of a worker's staged stop (stop msg -> join -> kill -> join)
    max_pending_per_client: int = 100_000  # jobs one client connection may have unfinished
    max_queued_total: int = 1_000_000  # queued jobs across all pools
    limits: Limits = field(default_factory=Limits)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_format: str = "text"  # or "json"
    log_level: str = "INFO"
    run_dir: str | None = None  # parent of the private per-run directory; default: the temp dir
    insecure: bool = False  # allow a non-loopback bind without CURVE (prints a loud warning)
    curve_secret_key: str | None = None  # server secret key file (zmq.auth format)
    authorized_keys: str | None = None  # directory of client public key files
    kill_stale: bool = False
    # At startup, serve the pools that loaded even if another failed (else: stop everything, exit 2).
    keep_going: bool = False
    http: HttpConfig = field(default_factory=HttpConfig)
    # [cluster]: Ray mode. `ray` is "auto" (a running cluster, or RAY_ADDRESS) or HOST:PORT; None: local.
    ray: str | None = None
    worker_address: str | None = None  # Ray mode: the worker socket's bind host (default: our Ray address)
    placement_timeout: float = 60.0  # Ray mode: seconds the first slots may take to be placed


CLUSTER_KEYS = {"ray": "ray", "worker_address": "worker_address", "placement_timeout": "placement_timeout"}


# TOML value types per field annotation (a string here: `from __future__ import annotations`). A float key
# takes an integer too (`hb_timeout = 3`); no numeric key takes a boolean.
_TOML_TYPES = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "a string"),
               "bool": ((bool,), "true or false"), "dict": ((dict,), "a table"), "None": ((type(None),), "")}


def _type_error(f: dataclasses.Field, value) -> str | None:
    """Why `value` cannot be field `f`; None when it can, or when `f` is a nested table we fill ourselves."""
    names = [n.strip() for n in (f.type.__name__ if isinstance(f.type, type) else str(f.type)).split("|")]
    if any(n not in _TOML_TYPES for n in names):
        return None
    allowed = tuple(t for n in names for t in _TOML_TYPES[n][0])
    if isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
        return None
    wanted = " or ".join(_TOML_TYPES[n][1] for n in names if n != "None")
    return f"{f.name} must be {wanted}, got {value!r}"


def _table(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a table, got {value!r}")
    return value


def _check(cls, data, where: str, allowed: dict | None = None) -> None:
    """Raise ValueError naming `where` for a key that is not a field of `cls` (or not in `allowed`, the
    table's key -> field map) or a value of the wrong type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    allowed = allowed or {name: name for name in fields}
    unknown = set(_table(data, where)) - set(allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    for key, value in data.items():
        problem = _type_error(fields[allowed[key]], value)
        if problem:
            raise ValueError(f"{where}: {problem}")


def _build(cls, data, where: str):
    _check(cls, data, where)
    return cls(**data)


def _pool(name: str, body, where: str) -> PoolConfig:
    return _build(PoolConfig, {"name": name, **_table(body, where)}, where)


def load_toml(path: str) -> ServerConfig:
    """Read a server config file: top-level [server] keys, [limits], [cluster] (Ray mode), and one
    [pools.NAME] table each."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    unknown = set(data) - {"server", "limits", "pools", "cluster", "http"}
    if unknown:
        raise ValueError(f"{path}: unknown table(s) {sorted(unknown)}")
    server = dict(_table(data.get("server", {}), f"{path} [server]"))
    cluster = data.get("cluster", {})
    _check(ServerConfig, cluster, f"{path} [cluster]", CLUSTER_KEYS)
    server.update({CLUSTER_KEYS[k]: v for k, v in cluster.items()})
    server["limits"] = _build(Limits, data.get("limits", {}), f"{path} [limits]")
    pools = [_pool(name, body, f"{path} [pools.{name}]")
             for name, body in _table(data.get("pools", {}), f"{path} [pools]").items()]
    server["pools"] = pools
    server["http"] = _build(HttpConfig, data.get("http", {}), f"{path} [http]")
    return _build(ServerConfig, server, f"{path} [server]")


def validate(cfg: ServerConfig) -> None:
    """Raise ValueError on a config that cannot run (checked before anything starts)."""
    if not cfg.pools:
        raise ValueError("no pools configured")
    caps = {f"limits.{f.name}": getattr(cfg.limits, f.name) for f in dataclasses.fields(cfg.limits)}
    caps.update(max_pending_per_client=cfg.max_pending_per_client, max_queued_total=cfg.max_queued_total)
    for name, value in caps.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if cfg.log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', got {cfg.log_format!r}")
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {cfg.log_level!r}")
    names = [p.name for p in cfg.pools]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate pool names: {names}")
    for p in cfg.pools:
        if not p.name or "/" in p.name:
            raise ValueError(f"bad pool name {p.name!r}")
        if p.tp < 1 or p.retries < 0 or p.queue_size < 1:
            raise ValueError(f"pool {p.name}: tp >= 1, retries >= 0 and queue_size >= 1 are required")
        if p.max_restarts < 0 or not p.restart_window > 0:
            raise ValueError(f"pool {p.name}: max_restarts >= 0 and restart_window > 0 are required")
        if not p.guard_timeout > 0:
            raise ValueError(f"pool {p.name}: guard_timeout must be > 0 seconds, got {p.guard_timeout!r}")
    _validate_http(cfg)
    _validate_cluster(cfg)


def load_keys(path: str) -> list[str]:
    """The accepted API keys: one per non-empty line. Raises ValueError (with the path) when none."""
    try:
        with open(path, encoding="utf-8") as f:
            keys = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise ValueError(f"http api_key_file {path!r}: {e.strerror or e}") from None
    if not keys:
        raise ValueError(f"http api_key_file {path!r} holds no key (one key per line)")
    return keys


def _validate_http(cfg) -> None:
    """Raise ValueError on an HTTP config that cannot run (checked before anything starts, importing no web
    framework). A non-loopback bind needs an API key file
    or `insecure`, as the ZMQ socket needs CURVE or `insecure`."""
    http = cfg.http
    if http.port is None:
        return
    if not isinstance(http.port, int) or isinstance(http.port, bool) or not 0 <= http.port <= 65535:
        raise ValueError(f"http port must be an integer 0..65535, got {http.port!r}")
    if http.job_timeout is not None and not (isinstance(http.job_timeout, (int, float)) and http.job_timeout > 0):
        raise ValueError(f"http job_timeout must be a positive number of seconds, got {http.job_timeout!r}")
    if http.api_key_file:
        load_keys(http.api_key_file)
    elif not is_loopback_host(http.host) and not cfg.insecure:
        raise ValueError(f"refusing to serve HTTP on {http.host}: it is not loopback. Give --api-key-file "
                         f"FILE (clients send `Authorization: Bearer KEY`) or pass --insecure.")
    if cfg.curve_secret_key:
        raise ValueError("the HTTP gateway cannot yet reach a CURVE-protected client socket; serve HTTP "
                         "from a coordinator without CURVE, or leave --http-port unset")


def _validate_cluster(cfg: ServerConfig) -> None:
    """Ray devices need Ray mode, and Ray mode places every pool on the cluster."""
    on_ray = {p.name: p.devices.strip().startswith(("ray:", "ray-cpu:")) for p in cfg.pools}
    if cfg.ray is None:
        named = [n for n, r in on_ray.items() if r]
        if named:
            raise ValueError(f"pool(s) {named} use ray devices: serve with --ray ADDRESS "
                             f"(or [cluster] ray = \"auto\")")
        return
    if not isinstance(cfg.ray, str) or not cfg.ray.strip():
        raise ValueError(f"[cluster] ray must be \"auto\" or HOST:PORT, got {cfg.ray!r}")
    local = [f"{p.name} ({p.devices})" for p in cfg.pools if not on_ray[p.name]]
    if local:
        raise ValueError(f"with --ray every pool runs on the cluster: give pool(s) {', '.join(local)} "
                         f"devices = \"ray:N\" (GPUs) or \"ray-cpu:N\"")
    shared = [p.name for p in cfg.pools if p.workers_per_device != 1]
    if shared:
        raise ValueError(f"pool(s) {shared}: workers_per_device is not supported on a Ray cluster")
    if not cfg.placement_timeout > 0:
        raise ValueError(f"placement_timeout must be > 0 seconds, got {cfg.placement_timeout!r}")


# ---------------------------------------------------------------------------- flags over the file
# `serve`'s flags (orchestrator/cli/serve.py) by the config key each sets.

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
