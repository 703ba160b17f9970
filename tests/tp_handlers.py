"""Test-only TP handlers, loaded by path (never built-ins of the shipped package):
``tests.tp_handlers:AllReduceHandler`` and ``tests.tp_handlers:SkewedGenerateHandler``. Workers import them
because the coordinator puts the repository root on their PYTHONPATH; a worker started elsewhere (another
node) needs the repository root on its PYTHONPATH too.

AllReduceHandler: a TP test handler that runs one all-reduce per batch over its group's main process group
(gloo on CPU, NCCL on GPU), behind the collective guard. Each rank contributes (rank + 1) * value, so a job's
result is value * (1 + 2 + ... + world_size).

Input: {"value": number} plus optional test switches:
- "skip_on_ranks": [ranks]: those ranks present "no batch" to the guard. Some ranks only: every rank raises
  CollectiveMismatch. All of them: every rank skips the step together and the job returns {"skipped": true};
- the key named by the config's "mismatch_on" (e.g. "poison"): on rank "mismatch_rank" (default 1) the
  batch fingerprint differs from the other ranks'. Value true: on every attempt (the job fails once its
  retries are spent). Value "once": on the first attempt only, told apart by a marker file per job in the
  config's "once_dir" (the group restarts and the retry succeeds).

Config: "mismatch_on", "mismatch_rank", "once_dir", "max_batch" (8).

SkewedGenerateHandler: the generate handler plus a test switch for TP groups, used by the tests and
tests/gpu/test_tp_gpu.py ("tests.tp_handlers:SkewedGenerateHandler"): on rank "skew_rank" (default 1), a
forward of one sequence of exactly "skew_tokens" tokens shows the collective guard a different fingerprint
(an injected asymmetric batch, as if that rank had scheduled other requests).
"""
from __future__ import annotations

import dataclasses
import os

from protocol.errors import INVALID_INPUT, ConfigError, JobError
from worker.handler import Handler, Job
from worker.handlers.generate import GenerateHandler

CONFIG_KEYS = frozenset({"mismatch_on", "mismatch_rank", "once_dir", "max_batch"})


class AllReduceHandler(Handler):
    capacity = 8

    def __init__(self, ctx):
        super().__init__(ctx)
        unknown = sorted(set(self.config) - CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"tp_allreduce: unknown config keys {unknown}; allowed: {sorted(CONFIG_KEYS)}")
        self.max_batch = int(self.config.get("max_batch", 8))
        self.mismatch_on = self.config.get("mismatch_on")
        self.mismatch_rank = int(self.config.get("mismatch_rank", 1))
        self.once_dir = self.config.get("once_dir")

    def load(self) -> None:
        if self.ctx.group is None:
            raise ValueError("tp_allreduce needs a TP group: run it in a pool with tp >= 2")

    def info(self) -> dict:
        return {"world_size": self.ctx.world_size}

    def run_batch(self, jobs: list[Job]) -> list:
        """Validate every job (the same on every rank: they all see rank 0's batch), guard, all-reduce."""
        values, outcomes = [], {}
        for job in jobs:
            try:
                values.append((job, _value(job)))
            except JobError as e:
                outcomes[job.jid] = e
        run = [job for job, _ in values]
        if self._guard(run):
            sums = self._all_reduce([v for _, v in values])
            outcomes.update({job.jid: {"sum": s, "world_size": self.ctx.world_size}
                             for job, s in zip(run, sums)})
        else:
            outcomes.update({job.jid: {"skipped": True} for job in run})
        return [outcomes[job.jid] for job in jobs]

    def _guard(self, jobs: list[Job]) -> bool:
        from worker.guard import Batch

        rank = self.ctx.rank
        if not jobs or any(rank in _skip_ranks(job) for job in jobs):
            return self.ctx.group.guard.check(None)  # "no batch" is a fingerprint too, never a silent skip
        ids = [job.jid for job in jobs]
        if rank == self.mismatch_rank and any(self._poisoned(job) for job in jobs):
            ids.append(-1)  # the test switch: this rank's batch differs from the others'
        return self.ctx.group.guard.check(Batch.of(ids, shapes=((len(jobs),),)))

    def _poisoned(self, job: Job) -> bool:
        flag = job.input.get(self.mismatch_on) if self.mismatch_on else None
        if flag == "once":
            if not self.once_dir:
                raise ValueError("tp_allreduce: a 'once' mismatch needs 'once_dir' in the handler config")
            try:  # the first attempt creates the marker; a retry finds it and runs normally
                os.close(os.open(os.path.join(self.once_dir, f"mismatched-{job.jid}"),
                                 os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return True
            except FileExistsError:
                return False
        return flag is True

    def _all_reduce(self, values: list) -> list:
        import torch
        import torch.distributed as dist

        from worker.guard import GroupError

        t = torch.tensor(values, dtype=torch.float64, device=self.ctx.group.device) * (self.ctx.rank + 1)
        try:
            dist.all_reduce(t)  # the main group: what a model's collectives would use
        except RuntimeError as e:  # a peer died mid-collective: the group restarts, the jobs are retried
            raise GroupError(f"rank {self.ctx.rank}: all-reduce failed: {e}") from None
        return t.cpu().tolist()


def _value(job: Job) -> float:
    inp = job.input
    if not isinstance(inp, dict) or isinstance(inp.get("value"), bool) or \
            not isinstance(inp.get("value"), (int, float)):
        raise JobError(INVALID_INPUT, "tp_allreduce input must be {\"value\": number, ...}")
    skip = inp.get("skip_on_ranks", [])
    if not isinstance(skip, list) or not all(isinstance(r, int) for r in skip):
        raise JobError(INVALID_INPUT, "'skip_on_ranks' must be a list of ranks")
    return float(inp["value"])


def _skip_ranks(job: Job) -> list:
    return job.input.get("skip_on_ranks", [])


class SkewedGenerateHandler(GenerateHandler):
    """generate with an injected asymmetric batch on one rank; see the module docstring."""

    def __init__(self, ctx):
        config = dict(ctx.config)
        self.skew_rank = int(config.pop("skew_rank", 1))
        if "skew_tokens" not in config:
            raise ValueError("SkewedGenerateHandler: config needs 'skew_tokens' (the forward size to skew)")
        self.skew_tokens = int(config.pop("skew_tokens"))
        # The rest is generate's own config, which it validates (the context is frozen: a copy carries it).
        super().__init__(dataclasses.replace(ctx, config=config))

    def load(self) -> None:
        super().load()
        guard = self.ctx.group.guard
        if self.ctx.rank != self.skew_rank:
            return
        check = guard.check

        def skewed(batch):
            if batch is not None and batch.size == 1 and batch.tokens == self.skew_tokens:
                batch = dataclasses.replace(batch, ids=batch.ids ^ 1)
            return check(batch)

        guard.check = skewed  # test switch: this rank lies about the batch it is about to run
