"""Built-in handlers, by name. Values are import paths so that torch loads only for handlers that need it."""
from __future__ import annotations

import importlib

BUILTINS = {
    "echo": "worker.handlers.basic:Echo",
    "sleep": "worker.handlers.basic:Sleep",
    "fail": "worker.handlers.basic:Fail",
    "crash": "worker.handlers.basic:Crash",
    "env": "worker.handlers.basic:Env",
    "generate": "worker.handlers.generate:GenerateHandler",
    "embed": "worker.handlers.embed:EmbedHandler",
}


def resolve(name: str) -> type:
    """Handler class for a built-in name or a ``module:Class`` path from the server's config."""
    path = BUILTINS.get(name, name)
    if ":" not in path:
        raise ValueError(f"unknown handler {name!r}: use one of {sorted(BUILTINS)} or 'module:Class'")
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
