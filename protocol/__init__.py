"""Wire protocol of gpu-orchestrator: typed msgpack messages over ZeroMQ. Never imports torch."""
from .codec import Codec, Limits, NDArray
from .errors import (
    ALL_CODES, BadField, JobError, MalformedMessage, MessageTooLarge, ProtocolError, UnknownOp,
    UnsupportedVersion,
)
from .messages import MESSAGES, PROTOCOL_VERSION, Message
from . import errors, messages

__all__ = [
    "ALL_CODES", "BadField", "Codec", "JobError", "Limits", "MESSAGES", "MalformedMessage", "Message",
    "MessageTooLarge", "NDArray", "PROTOCOL_VERSION", "ProtocolError", "UnknownOp",
    "UnsupportedVersion", "errors", "messages",
]
