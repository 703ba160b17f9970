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

ALL_CODES = (
    BAD_REQUEST, UNSUPPORTED_VERSION, UNKNOWN_OP, UNKNOWN_POOL, UNKNOWN_JOB, TOO_LARGE, OVERLOADED,
    UNAVAILABLE, SHUTTING_DOWN, CANCELLED, TIMEOUT, INVALID_INPUT, HANDLER_ERROR, WORKER_CRASHED,
    COLLECTIVE_MISMATCH, LOAD_FAILED, SCALE_ERROR, INTERNAL,
)


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
