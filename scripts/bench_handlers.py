"""Handlers for the benchmarks in scripts/ (not part of the package). Serve one with
`--handler scripts.bench_handlers:InstantGenerate` from the repository root."""
from __future__ import annotations

from worker.handler import Handler, Job


class InstantGenerate(Handler):
    """Answers in the `generate` handler's output schema at once, with one token and no model: what is
    left of a completion's cost is the dispatch path (HTTP gateway, coordinator, worker)."""

    capacity = 64  # deep credit, as `echo`: the worker always has the next job queued
    max_batch = 64

    def run(self, job: Job):
        out = {"text": " ok", "token_ids": [7], "finish_reason": "length",
               "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        if job.stream:
            return self._stream(out)
        return out

    @staticmethod
    def _stream(out):
        yield {"text": out["text"], "token_ids": out["token_ids"]}
        return out
