"""Logging setup: one logger per component; worker id and pool on every line; optional JSON lines.

Loggers are named by component (`orchestrator.coordinator`, `orchestrator.supervisor`, ...; captured
worker output uses `worker`). A line about a worker carries `extra=ids(slot)`; lines that concern no
worker get "-". `serve` prints its handshake (`endpoint:`, `pool ...`, `metrics:`) plainly on stdout;
every log line goes to stderr, so in `--log-format json` mode stderr is pure JSON lines.
"""
from __future__ import annotations

import json
import logging
import sys
import time


def ids(slot) -> dict:
    """`extra=` for a log line about one worker slot."""
    return {"wid": slot.name, "pool": slot.spec.pool}


class _Context(logging.Filter):
    """Give every record `wid` and `pool`: "-" for the coordinator's own lines; a worker id like
    `gen/0#1` also names its pool."""

    def filter(self, record: logging.LogRecord) -> bool:
        wid = record.__dict__.setdefault("wid", "-")
        if "pool" not in record.__dict__:
            record.pool = wid.split("/")[0] if "/" in wid else "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, time, level, logger, wid, pool, msg (+ stream, exc)."""

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
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(wid)s] %(message)s"


def setup(fmt: str = "text", level: str = "INFO", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # library warnings become log lines too (JSON in json mode)
