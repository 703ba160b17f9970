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


class HoldUntilStarted(logging.Handler):
    """Holds log records while serve starts, so that a startup failure is the first line on stderr
    (the log, with the one traceback, follows it). Released by `release_held()` once every pool's first
    load settled, or by the first record after `max_hold` seconds, so a slow model load is never silent
    for long. Records pass straight through once released. (Not `release()`: that is the handler's lock.)"""

    def __init__(self, target: logging.Handler, max_hold: float):
        super().__init__()
        self.target = target
        self.deadline = time.monotonic() + max_hold
        self.held: list | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is not None and time.monotonic() < self.deadline:
            self.held.append(record)
            return
        self.release_held()
        self.target.handle(record)

    def release_held(self) -> None:
        held, self.held = self.held, None
        for record in held or ():
            self.target.handle(record)


def setup(fmt: str = "text", level: str = "INFO", stream=None, hold: float = 0.0):
    """Log to stderr; with `hold` > 0, behind a HoldUntilStarted (returned, to release)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    top = HoldUntilStarted(handler, hold) if hold > 0 else handler
    root = logging.getLogger()
    root.handlers[:] = [top]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # library warnings become log lines too (JSON in json mode)
    return top
