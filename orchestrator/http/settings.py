"""The HTTP gateway's config rules, checked before anything starts (imports no web framework)."""
from __future__ import annotations

from orchestrator.security.curve import is_loopback_host


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


def check_http(cfg) -> None:
    """Raise ValueError on an HTTP config that cannot run. A non-loopback bind needs an API key file
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
