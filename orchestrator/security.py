"""Bind policy and CURVE authentication for the client socket (pyzmq's zmq.auth, not hand-written).

Loopback and ipc binds are allowed as they are. Any other address needs CURVE keys, or an explicit
`--insecure` that prints a loud warning: whoever reaches a GPU job socket can use the node.

Refusals are logged, rate-limited so that a client retrying in a loop cannot flood the log:
- a client whose CURVE key is not authorised: by the ZAP handler (`_ZapLog`), naming the key;
- a client that fails the handshake before ZAP (no CURVE at all, garbage, a wrong socket type): by a
  socket monitor on the client socket (`HandshakeMonitor`), which the coordinator's loop reads.
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

log = logging.getLogger("orchestrator.security")


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
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
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

    def __getattr__(self, name):
        return getattr(log, name)

    def debug(self, msg, *args, **kwargs):
        text = msg % args if args else msg
        if text.startswith("DENIED"):
            self.refused("refused client connection: %s", text)
        elif text.startswith("ZAP reply") and "200" not in text and "Unknown key" not in text:
            self.refused("refused client connection: %s", text)  # no DENIED line for these
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

    def __init__(self, sock: zmq.Socket, hard_cap: int):
        self.sock = sock.get_monitor_socket(self.EVENTS)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.hard_cap = hard_cap
        self.open = 0
        self.refused = 0  # handshakes that failed
        self._unlogged_closes = 0  # refused connections: their close needs no second line
        self.refusals = _Throttle("'refused client connection'")
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
            self.closes("client connection on %s closed (%d open): the client left, or libzmq cut "
                        "it for a protocol error or a message over the %d-byte hard cap", where,
                        self.open, self.hard_cap)
        else:  # a HANDSHAKE_FAILED_* event; libzmq reports the connection's close right after it
            self.refused += 1
            self._unlogged_closes += 1
            if event != zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # _ZapLog logged that one, naming the key
                self.refusals("refused client connection on %s: handshake failed: %s", where,
                              _handshake_failure(event, value))

    def flush(self) -> None:
        """Call now and then (the coordinator's tick): reports suppressed counts without waiting."""
        self.refusals.flush()
        self.closes.flush()

    def close(self) -> None:
        self.sock.close(linger=0)


# ---------------------------------------------------------------------------- server side


def setup(zctx: zmq.Context, cfg):
    """Check the bind policy and start the ZAP authenticator when CURVE is configured; returns it
    (or None). Raises InsecureBind or ValueError (naming the flag) on a config that cannot be safe."""
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
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(zctx, log=_ZapLog())
    auth.start()
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
    if auth is None:
        return
    public, secret = _load_server_certificate(cfg.curve_secret_key)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


# ---------------------------------------------------------------------------- client side


def client_keys(curve: dict | None) -> dict | None:
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
    return {"serverkey": server_public, "publickey": public, "secretkey": secret}


def apply_client(sock: zmq.Socket, curve: dict | None) -> None:
    """Set CURVE client keys on `sock`; `curve` is a path dict (see `client_keys`) or its result."""
    if not curve:
        return
    keys = curve if "serverkey" in curve else client_keys(curve)
    sock.curve_serverkey = keys["serverkey"]
    sock.curve_publickey = keys["publickey"]
    sock.curve_secretkey = keys["secretkey"]


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
