"""Named protocol errors and the stable error codes that travel in `error` replies.

Every code here is part of the wire contract (see protocol/README.md); renaming one breaks clients.
"""
from __future__ import annotations

from typing import Any

# Stable error codes. Clients switch on these strings, so they never change meaning.
BAD_REQUEST = "bad_request"  # envelope is not a valid message: missing/mistyped field, not a map
UNSUPPORTED_VERSION = "unsupported_version"  # "v" is not a protocol version this server speaks
UNKNOWN_OP = "unknown_op"  # "op" names no message type
UNKNOWN_POOL = "unknown_pool"  # submit/scale names a pool this coordinator does not have
UNKNOWN_JOB = "unknown_job"  # cancel names a job that is not pending for this client
TOO_LARGE = "too_large"  # message or one of its strings/arrays/maps is over a configured limit
OVERLOADED = "overloaded"  # pool queue, total queue or per-client pending cap is full
UNAVAILABLE = "unavailable"  # the pool has no live worker that could ever take the job
SHUTTING_DOWN = "shutting_down"  # the coordinator is draining and accepts no new jobs
CANCELLED = "cancelled"  # the job was cancelled by its client
TIMEOUT = "timeout"  # the job's own timeout passed before it finished
INVALID_INPUT = "invalid_input"  # the handler rejected the job's input (prompt too long, empty texts...)
HANDLER_ERROR = "handler_error"  # the handler raised; message carries a short traceback
WORKER_CRASHED = "worker_crashed"  # the job's workers died retries+1 times; message names exit reasons
COLLECTIVE_MISMATCH = "collective_mismatch"  # a TP group's ranks disagreed before a collective step
LOAD_FAILED = "load_failed"  # w_fatal only (worker -> coordinator): the handler or TP group did not load
SCALE_ERROR = "scale_error"  # scale request cannot be met (not enough free devices); nothing changed
INTERNAL = "internal"  # a bug in the coordinator; the request was not processed
DUPLICATE_ID = "duplicate_id"  # submit reuses the id of one of this client's unfinished jobs

# Why a worker could not start serving, sent in `w_fatal` (never to clients: they see the slot's state and
# reason in status/health). A permanent failure would happen again on every attempt, so the supervisor
# marks the slot `failed` at once instead of restarting it; anything else is transient and restarted
# with backoff.
BAD_CONFIG = "bad_config"  # a handler config key is unknown, missing or has a bad value
UNKNOWN_HANDLER = "unknown_handler"  # the pool's handler names no built-in and no importable module:Class
MODEL_NOT_FOUND = "model_not_found"  # the model is neither a local directory nor a valid hub id
HANDLER_INIT_FAILED = "handler_init_failed"  # the handler's constructor raised
# LOAD_FAILED (above): load() raised something else (a crash, a CUDA error, out of memory): transient.

ALL_CODES = (
    BAD_REQUEST, UNSUPPORTED_VERSION, UNKNOWN_OP, UNKNOWN_POOL, UNKNOWN_JOB, TOO_LARGE, OVERLOADED,
    UNAVAILABLE, SHUTTING_DOWN, CANCELLED, TIMEOUT, INVALID_INPUT, HANDLER_ERROR, WORKER_CRASHED,
    COLLECTIVE_MISMATCH, LOAD_FAILED, SCALE_ERROR, INTERNAL, DUPLICATE_ID,
)
WORKER_FATAL_CODES = (BAD_CONFIG, UNKNOWN_HANDLER, MODEL_NOT_FOUND, HANDLER_INIT_FAILED, LOAD_FAILED)
PERMANENT_CODES = frozenset({BAD_CONFIG, UNKNOWN_HANDLER, MODEL_NOT_FOUND, HANDLER_INIT_FAILED})


def is_permanent(code: str | None) -> bool:
    """True when a worker failure with this code would recur on every restart (see PERMANENT_CODES)."""
    return code in PERMANENT_CODES


class ProtocolError(Exception):
    """A message could not be accepted. `request_id` is set when the bad message's id was readable,
    so that the coordinator can address its error reply."""

    code = BAD_REQUEST

    def __init__(self, message: str, request_id: Any = None):
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class MalformedMessage(ProtocolError):
    """The bytes are not a msgpack map (garbage, truncated, wrong top-level type)."""


class UnknownOp(ProtocolError):
    code = UNKNOWN_OP


class UnsupportedVersion(ProtocolError):
    code = UNSUPPORTED_VERSION


class BadField(ProtocolError):
    """A required field is missing, a field has the wrong type, or an unknown field is present."""


class MessageTooLarge(ProtocolError):
    code = TOO_LARGE


class JobError(Exception):
    """Raised by handlers (or by the client, on an error reply) to fail one job with a stable code."""

    def __init__(self, code: str, message: str, details: Any = None):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.details = details


class WorkerFailure(Exception):
    """Raised inside a worker (by a handler's constructor or load, or by the worker itself) to end it
    with a `w_fatal` carrying `code`, one of WORKER_FATAL_CODES. Its message is the reason as the
    operator reads it, so no traceback goes with it."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ConfigError(WorkerFailure, ValueError):
    """A handler's config is wrong (unknown key, missing model, bad value): permanent."""

    def __init__(self, message: str):
        super().__init__(BAD_CONFIG, message)
