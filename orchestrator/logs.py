"""Logging setup: one logger per component; worker id and pool on every line; optional JSON lines."""
from __future__ import annotations

import json
import logging
import sys
import time


class _Context(logging.Filter):
    """Give every record `wid` and `pool` (the coordinator's own lines get "-")."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.wid = getattr(record, "wid", "-")
        record.pool = getattr(record, "pool", "-")
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "wid": record.wid,
            "pool": record.pool,
            "msg": record.getMessage(),
        }
        if getattr(record, "stream", None):
            entry["stream"] = record.stream
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(wid)s] %(message)s"


def setup(fmt: str = "text", level: str = "INFO", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
