"""CURVE authentication (pyzmq's zmq.auth, not hand-written) on the coordinator's side: the client socket's
server keys and authorised client keys, checked before anything binds, and in Ray mode the worker socket's
key pairs, made for each run (ZAP domain `workers`, apart from the client keys)."""
from __future__ import annotations

import glob
import logging
import os
import stat

import zmq

from protocol.curve import CurveClientKeys
from orchestrator.security.bind import check_bind, is_local
from orchestrator.security.refusals import WORKER_DOMAIN, ZapLog

log = logging.getLogger("orchestrator.security")


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

    auth = ThreadAuthenticator(zctx, log=ZapLog())
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
