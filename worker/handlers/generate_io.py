"""A generate job's input and output text, for worker/handlers/generate.py (whose docstring lists the input
keys and the output).

`parse_request` checks an input and turns it into a `Request`, or raises JobError(invalid_input);
`TextState` turns the generated token ids into text, with stop strings, so that the streamed chunks add up
to the final text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from protocol.errors import INVALID_INPUT, JobError
from worker.handler import check

PROMPT_KEYS = ("prompt", "input_ids", "messages")
REQUEST_KEYS = frozenset(PROMPT_KEYS + (
    "max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "seed", "stop", "eos_token_id",
))
MAX_STOP_STRINGS = 16
DETOK_CONTEXT = 5  # prompt tokens decoded ahead of the output so its first token keeps its leading space


@dataclass(frozen=True)
class Limits:
    context: int  # max_position_embeddings: prompt + output must fit
    vocab: int  # rows of the input embedding: larger ids would crash the whole CB batch
    cap: int  # max_new_tokens_cap
    default_new: int  # default_max_new_tokens


@dataclass
class Request:
    """A validated generate input."""

    input_ids: list
    max_new_tokens: int
    sampling: dict | None  # {"temperature", "top_k", "top_p"} for the sampling engine; None means greedy
    stop: tuple
    eos_token_id: list | None  # None: the model's EOS


# ----------------------------------------------------------------------------------- input validation


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_request(inp, tokenizer, lim: Limits) -> Request:
    """Check a generate input and turn it into a Request; raises JobError("invalid_input") when bad."""
    check(isinstance(inp, dict), "generate input must be a map")
    unknown = sorted(set(inp) - REQUEST_KEYS)
    check(not unknown, f"unknown keys {unknown}; allowed: {sorted(REQUEST_KEYS)}")
    ids = _prompt_ids(inp, tokenizer, lim)
    wanted = inp.get("max_new_tokens", lim.default_new)
    check(_is_int(wanted) and 1 <= wanted <= lim.cap, f"'max_new_tokens' must be an integer in [1, {lim.cap}]")
    # Output that would run past the context ends there, with finish_reason "length".
    max_new = min(wanted, lim.context - len(ids))
    return Request(ids, max_new, _sampling(inp, lim), _stop(inp), _eos(inp, lim))


def _prompt_ids(inp: dict, tokenizer, lim: Limits) -> list:
    given = [k for k in PROMPT_KEYS if k in inp]
    check(len(given) == 1, f"give exactly one of {list(PROMPT_KEYS)}")
    value = inp[given[0]]
    if given[0] == "prompt":
        check(isinstance(value, str), "'prompt' must be a string")
        ids = tokenizer(value)["input_ids"]
    elif given[0] == "messages":
        ids = _chat_ids(value, tokenizer)
    else:
        ok = isinstance(value, list) and all(_is_int(t) and 0 <= t < lim.vocab for t in value)
        check(ok, f"'input_ids' must be a list of token ids in [0, {lim.vocab})")
        ids = list(value)
    check(len(ids) > 0, "the prompt is empty")
    check(len(ids) < lim.context,
          f"the prompt has {len(ids)} tokens but the model's context is {lim.context}: no room to generate")
    return ids


def _chat_ids(messages, tokenizer) -> list:
    ok = isinstance(messages, list) and len(messages) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    check(ok, "'messages' must be a non-empty list of {'role': str, 'content': str}")
    check(tokenizer.chat_template is not None, "this model has no chat template: send 'prompt' instead")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # templates raise on inputs they refuse (e.g. roles that do not alternate)
        raise JobError(INVALID_INPUT, f"the chat template rejected 'messages': {e}") from None
    # The template already writes the special tokens it wants (BOS...); adding them again would double them.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _sampling(inp: dict, lim: Limits) -> dict | None:
    temperature = inp.get("temperature", 1.0)
    top_p = inp.get("top_p", 1.0)
    top_k = inp.get("top_k", 0)
    check(_is_number(temperature) and temperature >= 0, "'temperature' must be a number >= 0")
    check(_is_number(top_p) and 0 < top_p <= 1, "'top_p' must be a number in (0, 1]")
    check(_is_int(top_k) and top_k >= 0, "'top_k' must be an integer >= 0 (0: no top-k)")
    check("seed" not in inp or _is_int(inp["seed"]), "'seed' must be an integer")
    # Giving any sampling knob asks for sampling unless do_sample says otherwise; temperature 0 is greedy.
    do_sample = inp.get("do_sample", any(k in inp for k in ("temperature", "top_p", "top_k")))
    check(isinstance(do_sample, bool), "'do_sample' must be a boolean")
    if not do_sample or temperature == 0:
        return None  # greedy output is deterministic: a seed changes nothing and is accepted
    check("seed" not in inp, "'seed' is not supported with sampling: the continuous batching engine draws "
                             "all requests of a batch from one generator, so a per-request seed cannot make "
                             "output reproducible (set cb.seed in the handler config to seed the engine)")
    # Every value is explicit so that the engine's defaults never leak into a request.
    return {"temperature": float(temperature), "top_k": min(top_k, lim.vocab) or lim.vocab,
            "top_p": float(top_p)}


def _stop(inp: dict) -> tuple:
    stop = inp.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    ok = isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and s for s in stop)
    check(ok, f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them")
    return tuple(stop)


def _eos(inp: dict, lim: Limits) -> list | None:
    if "eos_token_id" not in inp:
        return None
    eos = inp["eos_token_id"]
    eos = [eos] if _is_int(eos) else eos
    ok = isinstance(eos, list) and all(_is_int(t) and 0 <= t < lim.vocab for t in eos)
    check(ok, f"'eos_token_id' must be a token id or a list of token ids in [0, {lim.vocab})")
    return eos


# ---------------------------------------------------------------------------------------- output text


class TextState:
    """Token ids -> text, with stop strings. The final text is by construction the concatenation of the
    streamed deltas, so chunks always add up to it.

    Decoding follows vLLM's incremental detokenizer: decode a window that starts a few tokens back and keep
    what it adds. That keeps joining rules (leading spaces, '##' word pieces) right without re-decoding the
    whole output at every token, and waits while a multi-byte character is incomplete ('\\ufffd').
    """

    def __init__(self, tokenizer, prompt_ids: list, stop: tuple):
        self._tok = tokenizer
        self._ids = list(prompt_ids[max(0, len(prompt_ids) - DETOK_CONTEXT):])
        self._prefix, self._read = 0, len(self._ids)
        self._stop = stop
        # Text that could be the start of a stop string is held back until it is known not to be one.
        self._hold = max(map(len, stop), default=1) - 1
        self.text = ""
        self._sent = 0
        self.stopped = False

    def add(self, ids: list, final: bool) -> None:
        if self.stopped:
            return
        self._ids.extend(ids)
        before = self._decode(self._prefix, self._read)
        after = self._decode(self._prefix, len(self._ids))
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._append(after[len(before):])
            self._prefix, self._read = self._read, len(self._ids)

    def take(self, final: bool = False) -> str:
        """The text not yet streamed that is safe to stream now (all of it once final or stopped)."""
        end = len(self.text) if final or self.stopped else max(self._sent, len(self.text) - self._hold)
        delta, self._sent = self.text[self._sent:end], end
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self._tok.decode(self._ids[start:end], skip_special_tokens=True)

    def _append(self, delta: str) -> None:
        # A new match must end inside the delta, so it starts at most `hold` characters before it.
        start = max(0, len(self.text) - self._hold)
        self.text += delta
        hits = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
