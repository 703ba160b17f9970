"""Bind policy and CURVE authentication for the client socket (pyzmq's zmq.auth, not hand-written).

Loopback and ipc binds are allowed as they are. Any other address needs CURVE keys, or an explicit
`--insecure` that prints a loud warning: whoever reaches a GPU job socket can use the node.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import sys

import zmq

log = logging.getLogger("orchestrator.security")


class InsecureBind(ValueError):
    pass


def is_local(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback host.

    >>> is_local("tcp://127.0.0.1:0"), is_local("ipc:///tmp/x"), is_local("tcp://0.0.0.0:5555")
    (True, True, False)
    >>> is_local("tcp://[::1]:5555"), is_local("tcp://localhost:1")
    (True, True)
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


class _ZapLog:
    """zmq.auth logs its decisions at debug level; surface refusals as warnings."""

    def __getattr__(self, name):
        return getattr(log, name)

    def debug(self, msg, *args, **kwargs):
        text = msg % args if args else msg
        if "DENIED" in text or ("ZAP reply" in text and "200" not in text):
            log.warning("refused client connection: %s", text)
        else:
            log.debug(text)


def setup(zctx: zmq.Context, cfg):
    """Start the ZAP authenticator when CURVE is configured; returns it (or None)."""
    check_bind(cfg)
    if not cfg.curve_secret_key:
        return None
    if not cfg.authorized_keys or not os.path.isdir(cfg.authorized_keys):
        raise ValueError(f"--authorized-keys must be a directory of client public keys, "
                         f"got {cfg.authorized_keys!r}")
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(zctx, log=_ZapLog())
    auth.start()
    auth.configure_curve(domain="*", location=cfg.authorized_keys)
    return auth


def apply_server(sock: zmq.Socket, cfg, auth) -> None:
    if auth is None:
        return
    import zmq.auth

    public, secret = zmq.auth.load_certificate(cfg.curve_secret_key)
    if secret is None:
        raise ValueError(f"{cfg.curve_secret_key} holds no secret key")
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def apply_client(sock: zmq.Socket, curve: dict | None) -> None:
    """curve = {"server_public_key": path, "secret_key": path} (zmq.auth certificate files)."""
    if not curve:
        return
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(curve["server_public_key"])
    public, secret = zmq.auth.load_certificate(curve["secret_key"])
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def keygen(directory: str, names: tuple = ("server", "client")) -> list[str]:
    """Write one key pair per name (NAME.key public, NAME.key_secret secret; secrets mode 0600)."""
    import zmq.auth

    os.makedirs(directory, exist_ok=True)
    written = []
    for name in names:
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        written += [public, secret]
    return written
