"""Real, tiny, offline models for tests (the builders live in worker/models.py, shared with the demo)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach the hub

from worker.models import CHAT_TEMPLATE, TINY_LLAMA, make_tiny_llama, minilm_path  # noqa: E402

__all__ = ["CHAT_TEMPLATE", "TINY_LLAMA", "make_tiny_llama", "minilm_path"]
