"""Bind policy and CURVE authentication for the client socket (pyzmq's zmq.auth, not hand-written).

Loopback and ipc binds are allowed as they are. Any other address needs CURVE keys, or an explicit
`--insecure` that prints a loud warning: whoever reaches a GPU job socket can use the node.

Refusals are logged, rate-limited so that a client retrying in a loop cannot flood the log:
- a client whose CURVE key is not authorised: by the ZAP handler (`_ZapLog`), naming the key;
- a client that fails the handshake before ZAP (no CURVE at all, garbage, a wrong socket type): by a
  socket monitor on the client socket (`HandshakeMonitor`), which the coordinator's loop reads.

In Ray mode the worker socket is a TCP socket too (workers on other hosts connect back to it). It is a
CURVE server with a key pair made for the run, and the same ZAP handler admits only the run's worker key
(ZAP domain `workers`, apart from the client keys); its refusals are logged the same way, as worker
connections.
"""
from __future__ import annotations

import glob
import ipaddress
import logging
import os
import stat
import sys
import threading
import time

import zmq

from protocol.curve import CurveClientKeys, apply_client as _apply_curve_client

log = logging.getLogger("orchestrator.security")

WORKER_DOMAIN = "workers"  # ZAP domain of the worker socket: client keys never open it, nor the reverse


class InsecureBind(ValueError):
    pass


def is_local(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback host.

    >>> is_local("tcp://127.0.0.1:0"), is_local("ipc:///tmp/x"), is_local("tcp://0.0.0.0:5555")
    (True, True, False)
    >>> is_local("tcp://[::1]:5555"), is_local("tcp://localhost:1"), is_local("tcp://eth0:1")
    (True, True, False)
    """
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    return is_loopback_host(rest.rsplit(":", 1)[0])


def is_loopback_host(host: str) -> bool:
    """True for a loopback host (the client socket's, or the HTTP gateway's bind host).

    >>> is_loopback_host("127.0.0.1"), is_loopback_host("[::1]"), is_loopback_host("localhost")
    (True, True, True)
    >>> is_loopback_host("0.0.0.0"), is_loopback_host("10.1.2.3"), is_loopback_host("myhost")
    (False, False, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # an interface name or hostname: treat as exposed


def check_bind(cfg) -> None:
    """Refuse a non-local bind without CURVE unless --insecure was given (then warn loudly)."""
    if is_local(cfg.address):
        return
    if cfg.curve_secret_key and cfg.authorized_keys:
        return
    if cfg.insecure:
        banner = "!" * 78
        print(f"{banner}\nWARNING: serving on {cfg.address} WITHOUT authentication (--insecure).\n"
              f"Anyone who can reach this address can run jobs on these GPUs.\n{banner}",
              file=sys.stderr, flush=True)
        log.warning("insecure bind on %s without CURVE", cfg.address)
        return
    raise InsecureBind(
        f"refusing to bind {cfg.address}: it is not loopback or ipc. Configure CURVE "
        f"(--curve-secret-key FILE --authorized-keys DIR; see `orchestrator keygen`) or pass --insecure.")


# ---------------------------------------------------------------------------- refusal logging


class _Throttle:
    """Log at most `per_second` lines a second at `level`; dropped lines are counted and reported
    as one summary line naming `what`. Thread-safe: the ZAP handler logs from its own thread."""

    def __init__(self, what: str, level: int = logging.WARNING, per_second: int = 5):
        self.what, self.level, self.per_second = what, level, per_second
        self.lock = threading.Lock()
        self.window, self.count, self.suppressed = 0, 0, 0

    def __call__(self, fmt: str, *args) -> None:
        with self.lock:
            self._roll(int(time.monotonic()))
            self.count += 1
            if self.count > self.per_second:
                self.suppressed += 1
                return
        log.log(self.level, fmt, *args)

    def flush(self) -> None:
        """Report a finished second's suppressed count even if no further line comes."""
        with self.lock:
            self._roll(int(time.monotonic()))

    def _roll(self, now: int) -> None:
        if now == self.window:
            return
        if self.suppressed:
            log.log(self.level, "(%d more %s lines suppressed)", self.suppressed, self.what)
        self.window, self.count, self.suppressed = now, 0, 0


class _ZapLog:
    """zmq.auth logs its decisions at debug level; surface refusals as (rate-limited) warnings."""

    def __init__(self):
        self.refused = _Throttle("'refused client connection'")
        self.refused_workers = _Throttle("'refused worker connection'")

    def __getattr__(self, name):
        return getattr(log, name)

    def debug(self, msg, *args, **kwargs):
        text = msg % args if args else msg
        throttle, who = self.refused, "client"
        if f"domain={WORKER_DOMAIN} " in text:
            throttle, who = self.refused_workers, "worker"
        if text.startswith("DENIED"):
            throttle(f"refused {who} connection: %s", text)
        elif text.startswith("ZAP reply") and "200" not in text and "Unknown key" not in text:
            throttle("refused client connection: %s", text)  # no DENIED line for these
        else:
            log.debug(text)


# libzmq's protocol error codes (event values of EVENT_HANDSHAKE_FAILED_PROTOCOL) -> words.
_PROTOCOL_ERRORS = {getattr(zmq, n): n[len("PROTOCOL_ERROR_"):].lower()
                    for n in dir(zmq) if n.startswith("PROTOCOL_ERROR_")}
_WHY = {"zmtp_mechanism_mismatch": "the client did not use CURVE (no key, or wrong mechanism)",
        "zmtp_cryptographic": "the client's CURVE handshake failed (wrong server key?)",
        "zmtp_invalid_metadata": "incompatible socket type or bad metadata"}


def _handshake_failure(event: int, value: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        name = _PROTOCOL_ERRORS.get(value, hex(value))
        return f"{name} ({_WHY.get(name, 'not a valid ZMTP client')})"
    return os.strerror(value) if value else "no detail"


class HandshakeMonitor:
    """A ZMQ socket monitor on the client socket: logs connections that fail the handshake and
    connections that libzmq closes, so that drops nobody can answer still leave a line in the log.

    libzmq reports a message over the hard `MAXMSGSIZE` cap only as a disconnect, the same event as a
    client leaving, so a closed connection is logged (info) with both explanations.
    """

    EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
              | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)

    def __init__(self, sock: zmq.Socket, hard_cap: int, who: str = "client", log_closes: bool = True):
        self.sock = sock.get_monitor_socket(self.EVENTS)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.hard_cap = hard_cap
        self.who = who  # "client", or "worker" for the worker socket in Ray mode
        self.log_closes = log_closes  # workers leave at every restart: not worth a line each
        self.open = 0
        self.refused = 0  # handshakes that failed
        self._unlogged_closes = 0  # refused connections: their close needs no second line
        self.refusals = _Throttle(f"'refused {who} connection'")
        self.closes = _Throttle("'client connection closed' (the client left, or a message over the "
                                f"{hard_cap}-byte hard cap)", logging.INFO)

    def on_readable(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        for _ in range(256):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(frames)
            self._on_event(event["event"], event["value"], event["endpoint"])

    def _on_event(self, event: int, value: int, endpoint: bytes) -> None:
        where = endpoint.decode(errors="replace")
        if event == zmq.EVENT_ACCEPTED:
            self.open += 1
        elif event == zmq.EVENT_DISCONNECTED:
            self.open = max(0, self.open - 1)
            if self._unlogged_closes:
                self._unlogged_closes -= 1
                return
            if not self.log_closes:
                return
            self.closes("client connection on %s closed (%d open): the client left, or libzmq cut "
                        "it for a protocol error or a message over the %d-byte hard cap", where,
                        self.open, self.hard_cap)
        else:  # a HANDSHAKE_FAILED_* event; libzmq reports the connection's close right after it
            self.refused += 1
            self._unlogged_closes += 1
            if event != zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # _ZapLog logged that one, naming the key
                self.refusals(f"refused {self.who} connection on %s: handshake failed: %s", where,
                              _handshake_failure(event, value))

    def flush(self) -> None:
        """Call now and then (the coordinator's tick): reports suppressed counts without waiting."""
        self.refusals.flush()
        self.closes.flush()

    def close(self) -> None:
        self.sock.close(linger=0)


# ---------------------------------------------------------------------------- server side


def setup(zctx: zmq.Context, cfg, worker_keys: "WorkerKeys | None" = None):
    """Check the bind policy and start the ZAP authenticator when CURVE is configured on the client
    socket or the worker socket (`worker_keys`, Ray mode); returns it (or None). Raises InsecureBind or
    ValueError (naming the flag) on a config that cannot be safe."""
    auth = _setup_clients(zctx, cfg)
    if worker_keys is None:
        return auth
    if not zmq.has("curve"):
        raise ValueError("Ray mode needs CURVE for the worker socket; this libzmq was built without it")
    if auth is None:
        auth = _start_authenticator(zctx)
    # A directory of public keys, as for clients: a callback provider would take over every ZAP domain
    # in zmq.auth, and the client keys would stop working.
    auth.configure_curve(domain=WORKER_DOMAIN, location=worker_keys.directory)
    return auth


def _start_authenticator(zctx: zmq.Context):
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(zctx, log=_ZapLog())
    auth.start()
    return auth


class WorkerKeys:
    """The worker socket's CURVE keys, made fresh for each run in the private run directory (0700,
    removed at shutdown): the server's key pair (kept in memory), and one key pair that every worker of
    this run presents (its public key is the only one in `directory`; the pair travels in each worker's
    spec)."""

    def __init__(self, run_dir: str):
        import zmq.auth

        self.directory = os.path.join(run_dir, "worker-keys")
        os.makedirs(self.directory, mode=0o700)
        public_path, secret_path = zmq.auth.create_certificates(self.directory, "worker")
        os.chmod(secret_path, 0o600)
        public, secret = zmq.auth.load_certificate(secret_path)
        self.server_public, self.server_secret = zmq.curve_keypair()
        self.worker = CurveClientKeys(self.server_public, public, secret)

    def apply_server(self, sock: zmq.Socket) -> None:
        sock.zap_domain = WORKER_DOMAIN.encode()
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True


def _setup_clients(zctx: zmq.Context, cfg):
    if cfg.authorized_keys and not cfg.curve_secret_key:
        raise ValueError("--authorized-keys needs --curve-secret-key (the server's key pair); "
                         "without it the socket would accept anyone")
    check_bind(cfg)
    if not cfg.curve_secret_key:
        log.info("client socket %s: no authentication (%s)", cfg.address,
                 "--insecure" if not is_local(cfg.address) else "loopback/ipc only")
        return None
    if not zmq.has("curve"):
        raise ValueError("this libzmq was built without CURVE support")
    _load_server_certificate(cfg.curve_secret_key)
    keys = _authorized_keys(cfg.authorized_keys)
    auth = _start_authenticator(zctx)
    auth.configure_curve(domain="*", location=cfg.authorized_keys)
    log.info("client socket %s: CURVE, %d authorised client key(s) from %s", cfg.address, keys,
             cfg.authorized_keys)
    return auth


def _authorized_keys(directory: str | None) -> int:
    """Validate the authorised-keys directory up front (zmq.auth would only log a load failure and
    then refuse everyone). Returns the number of keys."""
    import zmq.auth

    if not directory or not os.path.isdir(directory):
        raise ValueError(f"--authorized-keys must be a directory of client public keys (*.key), "
                         f"got {directory!r}")
    try:
        keys = zmq.auth.load_certificates(directory)
    except (OSError, ValueError) as e:
        raise ValueError(f"--authorized-keys {directory}: {e}") from None
    if not keys:
        raise ValueError(f"--authorized-keys {directory} holds no *.key public key files: "
                         f"no client could ever connect")
    if glob.glob(os.path.join(directory, "*.key_secret")):
        log.warning("--authorized-keys %s also holds secret keys: keep only client public keys "
                    "there (every *.key in it is authorised)", directory)
    return len(keys)


def _load_server_certificate(path: str) -> tuple[bytes, bytes]:
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--curve-secret-key {path}: {e}") from None
    if secret is None:
        raise ValueError(f"--curve-secret-key {path} holds no secret key (use NAME.key_secret "
                         f"from `orchestrator keygen`)")
    if os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("server secret key %s is readable by other users; chmod 600 it", path)
    return public, secret


def apply_server(sock: zmq.Socket, cfg, auth) -> None:
    if auth is None or not cfg.curve_secret_key:
        return
    public, secret = _load_server_certificate(cfg.curve_secret_key)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


# ---------------------------------------------------------------------------- client side


def client_keys(curve: dict | None) -> CurveClientKeys | None:
    """Load and check `curve = {"server_public_key": path, "secret_key": path}` (zmq.auth certificate
    files) before any socket exists: a bad path raises ValueError here, in the caller's thread."""
    if not curve:
        return None
    import zmq.auth

    missing = [k for k in ("server_public_key", "secret_key") if not curve.get(k)]
    if missing:
        raise ValueError(f"curve needs both server_public_key and secret_key; missing {missing} "
                         f"(CLI: --curve-server-key and --curve-secret-key)")
    try:
        server_public, _ = zmq.auth.load_certificate(curve["server_public_key"])
        public, secret = zmq.auth.load_certificate(curve["secret_key"])
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load CURVE key: {e}") from None
    if secret is None:
        raise ValueError(f"{curve['secret_key']} holds no secret key (use NAME.key_secret)")
    return CurveClientKeys(server_public, public, secret)


def apply_client(sock: zmq.Socket, curve: "dict | CurveClientKeys | None") -> None:
    """Set CURVE client keys on `sock`; `curve` is a path dict (see `client_keys`) or its result."""
    if not curve:
        return
    _apply_curve_client(sock, curve if isinstance(curve, CurveClientKeys) else client_keys(curve))


def keygen(directory: str, names: tuple = ("server", "client")) -> list[str]:
    """Write one key pair per name (NAME.key public, NAME.key_secret secret; secrets mode 0600)."""
    import zmq.auth

    os.makedirs(directory, exist_ok=True)
    for name in names:  # a deployed key is never silently replaced
        for path in (os.path.join(directory, f"{name}.key"), os.path.join(directory, f"{name}.key_secret")):
            if os.path.exists(path):
                raise FileExistsError(f"{path} already exists; remove it first to make a new key pair")
    written = []
    for name in names:
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        written += [public, secret]
    return written
