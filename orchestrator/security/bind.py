"""The client socket's bind policy: loopback and ipc binds are allowed as they are; any other address
needs CURVE keys, or an explicit `--insecure` that prints a loud warning, because whoever reaches a GPU job
socket can use the node. The HTTP gateway applies the same loopback rule to its own bind."""
from __future__ import annotations

import ipaddress
import logging
import sys

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
