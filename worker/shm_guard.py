"""Shared-memory fingerprint exchange for the ranks of one TP group on one host (the guard's fast path).

Why: the guard runs before every forward of a TP engine. Over gloo one exchange costs hundreds of µs (a
fixed int64 all_gather: 289 µs p50 between 2 ranks on the 2-core machine, 4.1 ms p99), 4-5% of a 20 ms
step. Ranks that share a host can instead write their fingerprint into a shared page and read each other's:
a few µs (scripts/bench_guard.py).

Layout: one segment, one fixed-size slot per rank; a rank writes only its own slot and reads the others'.
A slot holds the owner's pid, two fingerprint records and one text record:

- records are double-buffered by step parity: step k goes to record k % 2. A fast rank that finished step k
  and writes k + 1 never overwrites the record k that a slower rank may still be reading, and it cannot
  reach k + 2 before every rank has written k + 1, that is, before every rank has finished reading k;
- each record is written with one copy (struct.pack_into) and carries a checksum of its fields, read
  optimistically and retried when the checksum or the step does not match: the seqlock idea, with the
  checksum in place of the sequence counter, so no ordering between separate stores is relied on;
- the text record carries a readable fingerprint, written only after a mismatch, for the error.

No pickle: records are fixed int64 fields. A reader waits by spinning briefly, then sleeping with backoff
(the machine may have fewer cores than busy processes); past the timeout it names the ranks whose record
never came, each with its pid's state (dead, stopped, alive). A rank found dead while waiting ends the
wait at once.

Lifetime: rank 0 creates the segment under a random name, every rank maps it, and the name is unlinked as
soon as all have mapped it (worker/guard.py does this handshake over gloo). From then on no path in the
filesystem refers to it, so no rank's death can leak it: the kernel frees the memory with the last mapping.
Linux only (/dev/shm), like the rest of the worker.
"""
from __future__ import annotations

import mmap
import os
import struct
import time

SHM_DIR = "/dev/shm"
PREFIX = "gpuorch-guard-"
FIELDS = 6  # worker.guard.row(): step, has_batch, size, tokens, ids hash, shapes hash
RECORD = struct.Struct(f"<q{FIELDS}qq")  # step, fields, checksum
TEXT_HEAD = struct.Struct("<qqq")  # step, length, checksum
TEXT_BYTES = 1024
PID = struct.Struct("<q")
# Slot offsets, each record on its own 128-byte line so that the two buffers never share a cache line.
PID_AT, RECORD_AT, TEXT_AT = 0, 128, 384
SLOT = 2048
assert TEXT_AT + TEXT_HEAD.size + TEXT_BYTES <= SLOT and RECORD_AT + 128 + RECORD.size <= TEXT_AT
MASK = (1 << 63) - 1
# Busy-wait this long before the first sleep, yielding the core at every turn: with more ranks than cores
# (4 ranks on the 2-core machine) the peer we wait for may be runnable but not running, and a yield hands
# it the core at once, where a sleep would cost a timer tick (~50-60 µs of slack) per wait.
SPIN_S = 2e-3
MAX_NAP_S = 1e-3
LIVENESS_EVERY_S = 0.02  # how often a waiting rank checks that the missing ranks' processes still exist


class Missing(Exception):
    """Some ranks' records did not come within the timeout, or a rank's process is gone."""

    def __init__(self, missing: list, states: dict, dead: bool):
        self.missing, self.states, self.dead = missing, states, dead
        super().__init__(", ".join(f"rank {r} ({states[r]})" for r in missing))


def checksum(values) -> int:
    """A mix of int64 fields, 63-bit: a torn record (half old, half new) fails it.

    >>> checksum([1, 2, 3]) != checksum([1, 2, 4]) and checksum([1, 2, 3]) == checksum([1, 2, 3])
    True
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    return h & MASK


def process_state(pid: int) -> str:
    """'dead', 'stopped' or 'alive' for a pid of this host (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "dead"
    if state in (b"Z", b"X", b"x"):
        return "dead"
    return "stopped" if state in (b"T", b"t") else "alive"


class ShmExchange:
    """One rank's view of the segment. `create` (rank 0) or `attach` (the others), then `unlink` once all
    ranks have mapped it; `exchange(step, row)` per guard step; `exchange_text` only after a mismatch."""

    kind = "shm"

    def __init__(self, name: str, rank: int, world_size: int, create: bool):
        self.name, self.rank, self.world_size = name, rank, world_size
        self.path = os.path.join(SHM_DIR, name)
        size = SLOT * world_size
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.buf = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._mine = rank * SLOT
        PID.pack_into(self.buf, self._mine + PID_AT, os.getpid())
        self._pids: dict = {}

    @classmethod
    def create(cls, token: int, rank: int, world_size: int) -> "ShmExchange":
        return cls(f"{PREFIX}{token:016x}", rank, world_size, create=True)

    @classmethod
    def attach(cls, token: int, rank: int, world_size: int) -> "ShmExchange":
        return cls(f"{PREFIX}{token:016x}", rank, world_size, create=False)

    def unlink(self) -> None:
        """Remove the name (every rank has mapped the segment); the memory stays until the last unmap."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.buf.close()

    # ------------------------------------------------------------------ fingerprints

    def exchange(self, step: int, row: list, timeout: float) -> list:
        """Publish this rank's row for `step` and return every rank's row (rank order). Raises Missing."""
        RECORD.pack_into(self.buf, self._record_at(self.rank, step), step, *row, checksum([step, *row]))
        rows: list = [None] * self.world_size
        rows[self.rank] = list(row)
        return self._wait(rows, lambda r: self._read_record(r, step), timeout)

    def _record_at(self, rank: int, step: int) -> int:
        return rank * SLOT + RECORD_AT + (step & 1) * 128

    def _read_record(self, rank: int, step: int):
        values = RECORD.unpack_from(self.buf, self._record_at(rank, step))
        if values[0] != step or values[-1] != checksum(values[:-1]):
            return None  # not written yet for this step, or caught mid-write: read again
        return list(values[1:-1])

    # ------------------------------------------------------------------ readable fingerprints (errors only)

    def exchange_text(self, step: int, text: str, timeout: float) -> list:
        """Every rank's readable fingerprint for `step`; None for a rank that did not write one in time."""
        data = text.encode()[:TEXT_BYTES]
        at = self._mine + TEXT_AT
        self.buf[at + TEXT_HEAD.size:at + TEXT_HEAD.size + len(data)] = data
        TEXT_HEAD.pack_into(self.buf, at, step, len(data), checksum([step, len(data), *data]))
        texts: list = [None] * self.world_size
        texts[self.rank] = text
        try:
            return self._wait(texts, lambda r: self._read_text(r, step), timeout)
        except Missing:
            return texts

    def _read_text(self, rank: int, step: int):
        at = rank * SLOT + TEXT_AT
        got_step, length, check = TEXT_HEAD.unpack_from(self.buf, at)
        if got_step != step or not 0 <= length <= TEXT_BYTES:
            return None
        data = bytes(self.buf[at + TEXT_HEAD.size:at + TEXT_HEAD.size + length])
        if check != checksum([step, length, *data]):
            return None
        return data.decode(errors="replace")

    # ------------------------------------------------------------------ waiting

    def _wait(self, out: list, read, timeout: float) -> list:
        """Fill the None entries of `out` with read(rank) until all are in; spin, then nap with backoff."""
        waiting = [r for r in range(self.world_size) if out[r] is None]
        start = time.perf_counter()
        nap, next_liveness = 0.0, start + LIVENESS_EVERY_S
        while True:
            still = []
            for r in waiting:
                value = read(r)
                if value is None:
                    still.append(r)
                else:
                    out[r] = value
            if not still:
                return out
            waiting = still
            now = time.perf_counter()
            if now - start <= SPIN_S:
                os.sched_yield()
            else:
                if now >= next_liveness:
                    self._check_alive(waiting)
                    next_liveness = now + LIVENESS_EVERY_S
                if now - start > timeout:
                    raise Missing(waiting, {r: process_state(self._pid(r)) for r in waiting}, dead=False)
                nap = min(MAX_NAP_S, max(20e-6, nap * 2))
                time.sleep(nap)

    def _check_alive(self, ranks: list) -> None:
        states = {r: process_state(self._pid(r)) for r in ranks}
        dead = [r for r in ranks if states[r] == "dead"]
        if dead:
            raise Missing(dead, states, dead=True)

    def _pid(self, rank: int) -> int:
        if rank not in self._pids:  # written once at attach: every rank mapped before the first step
            self._pids[rank] = PID.unpack_from(self.buf, rank * SLOT + PID_AT)[0]
        return self._pids[rank]
