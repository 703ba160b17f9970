"""The collective guard: before a step that runs collectives, the ranks of a TP group agree on what they are
about to do, or every one of them fails fast, naming the rank that differs.

Why: a rank that finds no batch and `continue`s while the others enter a forward holding NCCL collectives
deadlocks the whole group, silently and forever (TensorRT-LLM #14986, sglang#34582, vllm#6370). So before each
such step every rank exchanges a small fingerprint of its step with the others, with its own short timeout,
and compares:

- all equal: the step runs;
- all "no batch": every rank skips the step together ("no batch" is a fingerprint too, never a silent skip);
- anything else: every rank raises `CollectiveMismatch` listing each rank's fingerprint;
- a rank that never arrives (dead, stopped, stuck in its own code): the exchange times out and the ranks
  that did arrive raise, instead of hanging.

Transport: ranks of one host write six int64s into a shared-memory segment and read each other's
(worker/shm_guard.py: a few µs per step); across hosts, or when no segment can be made, one all_gather of
a fixed int64 tensor over a gloo CPU group (hundreds of µs). No pickle on either path, the error path
included: the readable fingerprints, exchanged only after a mismatch, are fixed-size bytes.

This module imports torch only inside the functions that need it: the worker runtime imports `GroupError`
from here, and an echo worker must not pay for torch.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from protocol.errors import COLLECTIVE_MISMATCH, LOAD_FAILED, WORKER_CRASHED, JobError
from worker.shm_guard import TEXT_BYTES, Missing, ShmExchange  # stdlib only: no torch

log = logging.getLogger("worker.guard")

PARK_S = 60.0  # how long a foreign thread that hit a group failure waits for its process to exit


class GroupError(JobError):
    """The TP group cannot go on. Never a per-job error: the worker reports it as fatal (WFatal with `code`)
    and exits, and the coordinator restarts the whole group and retries its jobs."""

    def __init__(self, message: str, code: str = WORKER_CRASHED, details=None):
        super().__init__(code, message, details)


class CollectiveMismatch(GroupError):
    """The ranks disagreed at a guard step (or some never arrived). `fingerprints[r]` is rank r's fingerprint
    as text (None if unknown); `differing` names the ranks that differ from the reference."""

    def __init__(self, message: str, step: int, fingerprints: list, differing: list):
        super().__init__(message, COLLECTIVE_MISMATCH,
                         {"step": step, "fingerprints": fingerprints, "differing": differing})
        self.step, self.fingerprints, self.differing = step, fingerprints, differing


def stable_hash(value) -> int:
    """A 63-bit hash that is the same in every process (Python's `hash` of a str is salted per process).

    >>> stable_hash([1, 2, 3]) == stable_hash([1, 2, 3]), stable_hash([1, 2]) == stable_hash([2, 1])
    (True, False)
    """
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Batch:
    """What a rank is about to feed a collective step: batch size, token count, a hash of its request ids and
    the shapes of its inputs."""

    size: int
    tokens: int
    ids: int = 0  # stable_hash of the request ids (0: not known at this level)
    shapes: tuple = ()

    @classmethod
    def of(cls, ids, tokens: int | None = None, shapes: tuple = ()) -> "Batch":
        ids = list(ids)
        return cls(len(ids), len(ids) if tokens is None else tokens, stable_hash(ids), tuple(shapes))


def row(step: int, batch: Batch | None) -> list:
    """The fixed-size row a rank contributes to the exchange.

    >>> row(3, None), row(3, Batch(2, 5, 7, ()))[:5]
    ([3, 0, 0, 0, 0, 0], [3, 1, 2, 5, 7])
    """
    if batch is None:
        return [step, 0, 0, 0, 0, 0]
    return [step, 1, batch.size, batch.tokens, batch.ids, stable_hash(batch.shapes)]


def describe(step: int, batch: Batch | None) -> str:
    """A fingerprint as text, for the error.

    >>> describe(4, None), describe(4, Batch(1, 3, 255, ((1, 3),)))
    ('step=4 no batch', 'step=4 batch=1 tokens=3 ids=00000000000000ff shapes=((1, 3),)')
    """
    if batch is None:
        return f"step={step} no batch"
    return f"step={step} batch={batch.size} tokens={batch.tokens} ids={batch.ids:016x} shapes={batch.shapes}"


def compare(rows: list) -> tuple[str, list]:
    """Decide a guard step from every rank's row: ("run" | "skip" | "mismatch", differing ranks).

    The reference is the value most ranks hold; on a tie, the one rank 0 (the leader) holds.

    >>> compare([[1, 1, 2, 2, 9, 5], [1, 1, 2, 2, 9, 5]])
    ('run', [])
    >>> compare([[1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    ('skip', [])
    >>> compare([[1, 1, 2, 2, 9, 5], [1, 0, 0, 0, 0, 0]])
    ('mismatch', [1])
    >>> compare([[1, 1, 2, 2, 9, 5], [1, 1, 2, 2, 8, 5], [1, 1, 2, 2, 8, 5]])
    ('mismatch', [0])
    """
    keys = [tuple(r) for r in rows]
    if len(set(keys)) == 1:
        return ("run" if keys[0][1] else "skip"), []
    counts = {k: keys.count(k) for k in keys}
    reference = max(counts, key=lambda k: (counts[k], k == keys[0]))
    return "mismatch", [rank for rank, k in enumerate(keys) if k != reference]


class GlooTransport:
    """Fingerprints over the guard's gloo group: one all_gather of a fixed int64 tensor per step (no pickle);
    after a mismatch, the readable fingerprints as fixed-size byte tensors. Works across hosts."""

    kind = "gloo"

    def __init__(self, group, world_size: int):
        self.group, self.world_size = group, world_size

    def exchange(self, step: int, row_: list, timeout: float) -> list:
        import torch

        return [t.tolist() for t in self._all_gather(torch.tensor(row_, dtype=torch.int64))]

    def exchange_text(self, step: int, text: str, timeout: float) -> list:
        import torch

        data = text.encode()[:TEXT_BYTES]
        mine = torch.zeros(TEXT_BYTES + 8, dtype=torch.uint8)
        mine[:8] = torch.tensor(list(len(data).to_bytes(8, "little")), dtype=torch.uint8)
        mine[8:8 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        texts = []
        for t in self._all_gather(mine):
            raw = bytes(t.tolist())
            texts.append(raw[8:8 + int.from_bytes(raw[:8], "little")].decode(errors="replace"))
        return texts

    def _all_gather(self, mine) -> list:
        import torch.distributed as dist

        out = [mine.new_empty(mine.shape) for _ in range(self.world_size)]
        dist.all_gather(out, mine, group=self.group)
        return out

    def close(self) -> None:
        pass


TRANSPORTS = ("auto", "shm", "gloo")


class CollectiveGuard:
    """One rank's guard. Construct it once the gloo guard group exists; call `check` before every step with
    collectives, from one thread at a time, in the same order on every rank.

    Transport: ranks that share a host exchange fingerprints through shared memory (worker/shm_guard.py, a
    few µs); otherwise, or when the segment cannot be made, over gloo (one int64 all_gather, hundreds of µs).
    `transport` forces one ("auto" decides). The choice is itself collective, so it is made at the first
    `check`, which every rank reaches in the same order, and not in this (cheap) constructor."""

    def __init__(self, group, rank: int, world_size: int, timeout: float, transport: str = "auto"):
        if transport not in TRANSPORTS:
            raise ValueError(f"guard transport must be one of {TRANSPORTS}, not {transport!r}")
        self.group, self.rank, self.world_size, self.timeout = group, rank, world_size, timeout
        self.wanted = transport
        self.transport = None  # GlooTransport | ShmExchange, set by the first check
        self.step = 0
        self.cost = CostMeter()
        self._lock = threading.Lock()  # one exchange at a time, even if two threads reach the guard

    def check(self, batch: Batch | None) -> bool:
        """True: run the step. False: every rank has no batch, so all skip it together.
        Raises CollectiveMismatch when the ranks disagree or one does not arrive within the timeout."""
        with self._lock:
            if self.transport is None:
                self.transport = self._open()
            start = time.perf_counter_ns()
            self.step += 1
            rows = self._exchange(self.step, batch)
            verdict, differing = compare(rows)
            self.cost.add(time.perf_counter_ns() - start)
            if verdict == "mismatch":
                raise self._mismatch(self.step, batch, rows, differing)
            return verdict == "run"

    # ------------------------------------------------------------------ transport choice (collective)

    def _open(self):
        """Pick the transport with every rank: a handshake of fixed int64 all_gathers over gloo.

        1. every rank sends its host key and rank 0 a random token (the segment's name);
        2. on one host, rank 0 creates the segment; all_gather of "created";
        3. the others map it; all_gather of "mapped";
        4. if every rank mapped it, rank 0 unlinks the name and shm is used; otherwise everyone uses gloo."""
        gloo = GlooTransport(self.group, self.world_size)
        if self.wanted == "gloo" or self.world_size == 1:
            return gloo
        try:
            return self._open_shm(gloo)
        except RuntimeError as e:  # a peer lost during the handshake: the same error a step would raise
            raise self._lost(0, None, e) from None

    def _open_shm(self, gloo: GlooTransport):
        import secrets

        token = secrets.randbits(62) if self.rank == 0 else 0
        rows = gloo.exchange(0, [host_key(), token], self.timeout)
        token = rows[0][1]
        if len({r[0] for r in rows}) != 1:
            if self.wanted == "shm":
                raise GroupError("guard transport 'shm' needs every rank on one host", LOAD_FAILED)
            return gloo
        shm, ok = None, 1
        if self.rank == 0:
            shm, ok = _try(ShmExchange.create, token, self.rank, self.world_size)
        created = gloo.exchange(0, [ok], self.timeout)[0][0]
        if self.rank != 0 and created:
            shm, ok = _try(ShmExchange.attach, token, self.rank, self.world_size)
        mapped = all(r[0] for r in gloo.exchange(0, [ok], self.timeout))
        if shm is not None and self.rank == 0:
            shm.unlink()  # every rank has mapped it (or given up): no name is left to leak
        if mapped:
            log.info("rank %d: collective guard over shared memory (%s)", self.rank, shm.name)
            return shm
        if shm is not None:
            shm.close()
        if self.wanted == "shm":
            raise GroupError("guard transport 'shm': a rank could not map the segment", LOAD_FAILED)
        log.warning("rank %d: collective guard falls back to gloo: a rank could not map the segment", self.rank)
        return gloo

    # ------------------------------------------------------------------ one step

    def _exchange(self, step: int, batch: Batch | None) -> list:
        try:
            return self.transport.exchange(step, row(step, batch), self.timeout)
        except Missing as e:
            raise self._missing(step, batch, e) from None
        except RuntimeError as e:
            raise self._lost(step, batch, e) from None

    def _missing(self, step: int, batch: Batch | None, exc) -> GroupError:
        """The shared-memory wait ended without some ranks: dead (found at once) or absent past the timeout."""
        if not exc.dead:
            return self._absent(step, batch, str(exc), list(exc.missing))
        msg = (f"collective guard step {step}: lost a peer: {exc} exited before the step; "
               f"rank {self.rank}: {describe(step, batch)}")
        log.error("%s", msg)
        return CollectiveMismatch(msg, step, self._own_fingerprint(step, batch), list(exc.missing))

    def _lost(self, step: int, batch: Batch | None, exc: Exception) -> GroupError:
        others = [r for r in range(self.world_size) if r != self.rank]
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "timed out" in text.lower() or "timeout" in text.lower():
            return self._absent(step, batch, f"rank(s) {others}", others)
        msg = f"collective guard step {step}: lost a peer rank of {others}: {text}"
        log.error("%s", msg)
        return GroupError(msg)

    def _absent(self, step: int, batch: Batch | None, who: str, missing: list) -> CollectiveMismatch:
        """The exchange timed out: `who` (the ranks in `missing`) never arrived."""
        msg = (f"collective guard step {step}: rank {self.rank} waited {self.timeout:g} s and {who} did not "
               f"all arrive (dead, stopped or stuck); rank {self.rank}: {describe(step, batch)}")
        log.error("%s", msg)
        return CollectiveMismatch(msg, step, self._own_fingerprint(step, batch), missing)

    def _own_fingerprint(self, step: int, batch: Batch | None) -> list:
        """The fingerprints known after a failed exchange: only this rank's."""
        return [describe(step, batch) if r == self.rank else None for r in range(self.world_size)]

    def _mismatch(self, step: int, batch: Batch | None, rows: list, differing: list) -> CollectiveMismatch:
        fps = self._readable(step, batch, rows)
        listing = "; ".join(f"rank {r}: {fp}{' <- differs' if r in differing else ''}"
                            for r, fp in enumerate(fps))
        kind = "no batch on some ranks only" if any(r[1] == 0 for r in rows) else "fingerprints differ"
        msg = (f"collective_mismatch at guard step {step} ({kind}): rank(s) {differing} differ "
               f"[seen by rank {self.rank}]: {listing}")
        log.error("%s", msg)
        return CollectiveMismatch(msg, step, fps, differing)

    def _readable(self, step: int, batch: Batch | None, rows: list) -> list:
        """Every rank's fingerprint as text: a second exchange (fixed-size bytes), only on the error path.
        A rank that left meanwhile is shown by the row it sent."""
        try:
            fps = self.transport.exchange_text(step, describe(step, batch), min(self.timeout, 2.0))
        except RuntimeError:
            fps = [None] * self.world_size
        return [fp if fp is not None else f"row={r}" for fp, r in zip(fps, rows)]

    def stats(self) -> dict:
        return {"steps": self.step, "transport": None if self.transport is None else self.transport.kind,
                **self.cost.summary()}

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def host_key() -> int:
    """The same on every process of this host (boot id and hostname), different across hosts."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    import socket

    return stable_hash((boot, socket.gethostname()))


def _try(fn, *args) -> tuple:
    """(result, 1) or (None, 0) when the segment cannot be made or mapped here (no /dev/shm, no space)."""
    try:
        return fn(*args), 1
    except OSError as e:
        log.warning("guard segment: %s", e)
        return None, 0


class CostMeter:
    """Guard cost per step (µs) and the period between guarded steps, so a bench can set one against the
    other. Gaps over `idle_s` are idle time, not steps, and are left out of the period."""

    def __init__(self, idle_s: float = 1.0):
        self.n = 0
        self.total_ns = 0
        self.max_ns = 0
        self.periods = 0
        self.period_total_ns = 0
        self._last_start: int | None = None
        self._idle_ns = int(idle_s * 1e9)

    def add(self, cost_ns: int) -> None:
        now = time.perf_counter_ns()
        if self._last_start is not None and now - self._last_start < self._idle_ns:
            self.periods += 1
            self.period_total_ns += now - self._last_start
        self._last_start = now
        self.n += 1
        self.total_ns += cost_ns
        self.max_ns = max(self.max_ns, cost_ns)

    def summary(self) -> dict:
        mean = self.total_ns / self.n / 1000 if self.n else None
        period = self.period_total_ns / self.periods / 1000 if self.periods else None
        return {"mean_us": _round(mean), "max_us": _round(self.max_ns / 1000 if self.n else None),
                "step_period_us": _round(period),
                "cost_fraction": _round(mean / period if mean and period else None, 5),
                # running totals, so that a bench can difference two snapshots around its own load
                "total_us": _round(self.total_ns / 1000), "periods": self.periods,
                "period_total_us": _round(self.period_total_ns / 1000)}


def _round(v, digits: int = 1):
    return None if v is None else round(v, digits)


# ------------------------------------------------------------------------------------------ model hook


def forward_batch(args: tuple, kwargs: dict) -> Batch:
    """Describe a transformers forward call: token count, batch size (packed continuous-batching batches carry
    cu_seq_lens_q), the shapes of the tensor arguments, and the token ids when they are on the CPU (hashing
    GPU ids would cost a device sync per step)."""
    import torch

    tensors = [(str(i), a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    tensors += sorted((k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    main = ids if ids is not None else kwargs.get("inputs_embeds")
    tokens = int(main.shape[-1] if ids is not None else main.shape[-2]) if main is not None else 0
    cu = kwargs.get("cu_seq_lens_q")
    if isinstance(cu, torch.Tensor):
        size = int(cu.shape[0]) - 1  # a packed continuous-batching batch: one sequence per boundary pair
    else:
        size = int(main.shape[0]) if main is not None else 0
    digest = stable_hash(ids.flatten().tolist()) if ids is not None and ids.device.type == "cpu" else 0
    return Batch(size, tokens, digest, tuple((k, tuple(t.shape)) for k, t in tensors))


def install_guard(model, guard: CollectiveGuard, on_fail=None):
    """Run `guard` before every forward of `model` (a forward pre-hook), including the forwards inside
    transformers' continuous batching loop. Returns the hook handle.

    On a failure the hook calls `on_fail(exc)` (the group runtime, which makes the worker report it) and
    then parks this thread: raising inside transformers' engine would let it fail the requests one by one
    as job errors, when the whole group must restart and retry them. CUDA-graph replays skip Python and so
    skip this hook: TP engines run without CUDA graphs (see the generate handler).
    """

    def hook(module, args, kwargs):
        try:
            guard.check(forward_batch(args, kwargs))
        except GroupError as exc:
            if on_fail is None:
                raise
            on_fail(exc)
            threading.Event().wait(PARK_S)  # the worker exits meanwhile; this is only a backstop
            raise
        return None

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def side_group(timeout: float):
    """A new gloo CPU group over the whole world with its own timeout (collective: every rank calls it)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
