"""The client's CURVE keys: load and check them before any socket exists, set them on a socket, and
`orchestrator keygen`. Client side only: nothing here imports the server."""
from __future__ import annotations

import os

import zmq

from protocol.curve import CurveClientKeys, apply_client as _apply_curve_client


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
