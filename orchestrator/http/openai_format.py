"""OpenAI request bodies -> job inputs, and job results -> OpenAI response bodies (pure functions).

The job inputs are the `generate` and `embed` handlers' schemas (protocol/README.md). Chat `messages` are
forwarded as they are: the worker renders them with the model's own chat template, so the gateway never
loads a tokenizer. Parameters we cannot honour get a 400 rather than being silently ignored.
"""
from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field

from protocol import errors as E

# Protocol error code -> HTTP status (README, "HTTP"). Codes not listed are server errors (500).
STATUS = {E.INVALID_INPUT: 400, E.BAD_REQUEST: 400, E.TOO_LARGE: 413, E.UNKNOWN_POOL: 404,
          E.OVERLOADED: 429, E.UNAVAILABLE: 503, E.SHUTTING_DOWN: 503, E.TIMEOUT: 504, E.CANCELLED: 499}
UNAUTHORIZED = "unauthorized"  # the gateway's own code for a missing or wrong API key (401)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}

# Accepted only at their "off" values: anything else changes the output in a way we cannot honour.
_OFF = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False),
        "top_logprobs": (None, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
        "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []), "functions": (None, []),
        "tool_choice": (None, "none", "auto")}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat has none)


class ApiError(Exception):
    """A request the gateway refuses itself; `code` is a protocol error code (or UNAUTHORIZED)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def status_of(code: str) -> int:
    return 401 if code == UNAUTHORIZED else STATUS.get(code, 500)


def error_body(code: str, message: str, param: str | None = None, status: int | None = None) -> dict:
    """OpenAI's error object; its `type` follows `status` (default: the code's own status)."""
    status = status or status_of(code)
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _need(cond: bool, message: str, param: str | None = None) -> None:
    if not cond:
        raise ApiError(E.BAD_REQUEST, message, param)


@dataclass
class GenRequest:
    """One /v1/completions or /v1/chat/completions request: one job input per choice."""

    model: str
    inputs: list
    stream: bool
    include_usage: bool
    chat: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


def _model(body) -> str:
    _need(isinstance(body, dict), "the request body must be a JSON object")
    model = body.get("model")
    _need(isinstance(model, str) and model != "", "'model' (a pool name, see GET /v1/models) is required", "model")
    return model


def _options(body: dict, chat: bool) -> dict:
    """Sampling and stopping options for the generate handler (only those the client gave)."""
    for key, allowed in _OFF.items():
        if body.get(key) not in allowed:  # (the message is built only on failure: this runs per request)
            raise ApiError(E.BAD_REQUEST, f"'{key}' = {body.get(key)!r} is not supported (only "
                                          f"{' or '.join(map(repr, allowed[1:])) or 'unset'})", key)
    out = {k: body[k] for k in ("temperature", "top_p", "seed", "stop") if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens") if chat else None
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    if max_tokens is None and not chat:
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    if max_tokens is not None:
        out["max_new_tokens"] = max_tokens
    return out


def _stream_opts(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream") or False
    _need(isinstance(stream, bool), "'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    _need(isinstance(opts, dict), "'stream_options' must be an object", "stream_options")
    return stream, bool(opts.get("include_usage"))


def parse_completion(body) -> GenRequest:
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [{"prompt": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [{"prompt": p} for p in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [{"input_ids": prompt}]  # one prompt given as token ids
    else:
        raise ApiError(E.BAD_REQUEST, "'prompt' must be a string, a non-empty list of strings, or a list "
                                      "of token ids", "prompt")
    options = _options(body, chat=False)
    stream, usage = _stream_opts(body)
    return GenRequest(model, [{**p, **options} for p in prompts], stream, usage, chat=False,
                      id=f"cmpl-{uuid.uuid4().hex}")


def _content(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text parts can be rendered
        _need(all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                  for p in content), "only text content parts are supported", "messages")
        return "".join(p["text"] for p in content)
    _need(isinstance(content, str), "each message needs 'content' (a string or text parts)", "messages")
    return content


def parse_chat(body) -> GenRequest:
    model = _model(body)
    messages = body.get("messages")
    _need(isinstance(messages, list) and len(messages) > 0 and all(isinstance(m, dict) for m in messages),
          "'messages' must be a non-empty list of {role, content} objects", "messages")
    _need(all(isinstance(m.get("role"), str) for m in messages), "each message needs a 'role'", "messages")
    msgs = [{"role": m["role"], "content": _content(m)} for m in messages]
    stream, usage = _stream_opts(body)
    return GenRequest(model, [{"messages": msgs, **_options(body, chat=True)}], stream, usage, chat=True,
                      id=f"chatcmpl-{uuid.uuid4().hex}")


def _usage(outputs: list) -> dict:
    prompt = sum((o.get("usage") or {}).get("prompt_tokens", 0) for o in outputs)
    completion = sum((o.get("usage") or {}).get("completion_tokens", 0) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def generation_response(req: GenRequest, outputs: list) -> dict:
    """The whole (non-streamed) response. Each choice also carries the job's `token_ids`."""
    if req.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": o["text"]},
                    "finish_reason": o["finish_reason"], "logprobs": None, "token_ids": o.get("token_ids")}
                   for i, o in enumerate(outputs)]
    else:
        choices = [{"index": i, "text": o["text"], "finish_reason": o["finish_reason"], "logprobs": None,
                    "token_ids": o.get("token_ids")} for i, o in enumerate(outputs)]
    return {"id": req.id, "object": "chat.completion" if req.chat else "text_completion",
            "created": req.created, "model": req.model, "choices": choices, "usage": _usage(outputs)}


def stream_chunk(req: GenRequest, index: int, text: str | None, finish: str | None = None,
                 first: bool = False) -> dict:
    """One SSE chunk. Chat: the first carries the role, the last an empty delta and the finish reason."""
    if req.chat:
        delta = {} if text is None else {"content": text}
        if first:
            delta["role"] = "assistant"
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
    return {"id": req.id, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": req.created, "model": req.model, "choices": [choice]}


def usage_chunk(req: GenRequest, outputs: list) -> dict:
    """stream_options.include_usage: a last chunk with no choices and the usage."""
    return {"id": req.id, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": req.created, "model": req.model, "choices": [], "usage": _usage(outputs)}


def parse_embeddings(body) -> tuple[str, list, str]:
    """(model, texts, encoding_format)."""
    model = _model(body)
    inp = body.get("input")
    texts = [inp] if isinstance(inp, str) else inp
    _need(isinstance(texts, list) and len(texts) > 0 and all(isinstance(t, str) for t in texts),
          "'input' must be a string or a non-empty list of strings (token arrays are not supported)", "input")
    fmt = body.get("encoding_format") or "float"
    _need(fmt in ("float", "base64"), "'encoding_format' must be 'float' or 'base64'", "encoding_format")
    return model, texts, fmt


def embeddings_response(model: str, output: dict, fmt: str, dimensions=None) -> dict:
    rows = output["embeddings"].to_numpy().astype("<f4", copy=False)
    if dimensions is not None and dimensions != rows.shape[1]:
        raise ApiError(E.BAD_REQUEST, f"'dimensions' = {dimensions!r}: this model's embeddings have "
                                      f"{rows.shape[1]}", "dimensions")
    if fmt == "base64":  # OpenAI's base64: the little-endian float32 bytes of each vector
        data = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    else:
        data = rows.tolist()
    tokens = output.get("usage", {}).get("prompt_tokens", 0)
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
