"""Worker processes: a `SlotSpec` says what to launch; a `Slot` handle is what is running.

"A Slot is to a SlotSpec as an object is to a class." A slot is the unit of dispatch, readiness,
failure and restart: one process for tp=1, or a TP group of `tp` rank processes.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

from protocol.workerspec import CONTROL, DATA, GUARD_TIMEOUT_S, WorkerSpec, routing_id
from orchestrator.core.jobtable import SlotLoad
from orchestrator.launch.base import RankHandle, RankLaunch, SlotHandle, SlotLaunch
from orchestrator.fleet.placement import cuda_visible
from orchestrator.fleet.restarts import FailureBudget
from orchestrator.states import LIVE, SERVING, SLOT_TRANSITIONS, SlotState, move


# Where the `worker` package lives, so workers import it even from an uninstalled checkout.
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# NVLink multicast can take shared GPUs out of service; keep it off in every child we start.
GPU_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class SlotSpec:
    """What to launch for one slot: pool, index, devices and the ranks' CPU cores."""

    pool: str
    index: int
    devices: tuple
    handler: str
    config: dict
    tp: int = 1
    cores: tuple = ()  # one tuple of cores per rank
    capacity: int | None = None
    cpu_threads: int | None = None
    cpu_affinity: bool = True  # pin each rank to its cores; else they only size its thread pools
    env: dict = field(default_factory=dict)
    guard_timeout: float = GUARD_TIMEOUT_S  # tp > 1 only

    @property
    def wid(self) -> str:
        return f"{self.pool}/{self.index}"


class Proc:
    """One rank of a running slot, as supervision sees it: its routing ids and what it last said.
    How it runs (a local process, a remote actor) is its launcher's `RankHandle`."""

    def __init__(self, rank: int, wid: str, incarnation: int, handle: RankHandle):
        self.rank = rank
        self.wid = wid
        # ROUTER identities of its two sockets (set by the worker from the same wid and incarnation).
        self.ctl_id = routing_id(CONTROL, wid, incarnation)
        self.data_id = routing_id(DATA, wid, incarnation)
        self.handle = handle
        self.last_seen = time.monotonic()
        self.hello = False
        self.ready = False
        self.step_age: float | None = None  # as of step_age_at
        self.step_age_at = 0.0
        self.stats: dict | None = None

    def current_step_age(self, now: float) -> float | None:
        if self.step_age is None:
            return None
        return self.step_age + (now - self.step_age_at)

    @property
    def alive(self) -> bool:
        return self.handle.alive


class Slot:
    """A running slot: its processes, state, credits and in-flight jobs. Owned by the event loop."""

    def __init__(self, spec: SlotSpec):
        self.spec = spec
        self.name = spec.wid
        self.state = SlotState.STOPPED
        self.incarnation = 0
        self.procs: list[Proc] = []
        self.capacity = 0
        self.replay_safe = True
        self.load = SlotLoad()  # the jobs it holds credits for (owned by the JobTable)
        self.consecutive_failures = 0
        self.budget = FailureBudget()  # transient failures; limits from the pool config (restarts.py)
        self.last_exit_reason: str | None = None
        self.last_exit_code: str | None = None  # the w_fatal code of the last failure, if it sent one
        self.last_traceback: str | None = None  # of the last w_fatal, so a repeat is not logged again
        self.permanent = False  # FAILED for a reason that would recur: only the operator retries it
        self.retry_at: float | None = None  # FAILED within budget limits: when reconcile retries it
        self.restart_on_stop = False  # `reload`: start again as soon as the staged stop completes
        self.restart_at = 0.0
        self.ready_at: float | None = None
        self.state_since = time.monotonic()
        self.info: dict = {}
        self.group_info: dict | None = None  # TP rendezvous info from rank 0 (this incarnation)
        self.stop_reason: str | None = None  # set when we stop it on purpose
        self.handle: SlotHandle | None = None  # its launcher's handle for the current incarnation

    def set_state(self, new: SlotState) -> None:
        if new != self.state:
            move(self, new, SLOT_TRANSITIONS)
            self.state_since = time.monotonic()

    def validate_state(self) -> None:
        """Raise AssertionError unless the slot's state agrees with its credits: BUSY exactly when it
        holds one, none held once it is down, and never more held than its capacity while serving."""
        held, state = self.load.held, self.state
        assert state != SlotState.READY or held == 0, f"{self.name}: READY while holding {held} credit(s)"
        assert state != SlotState.BUSY or held > 0, f"{self.name}: BUSY while holding no credit"
        assert state in LIVE or held == 0, f"{self.name}: {state.value} while holding {held} credit(s)"
        assert state not in SERVING or held <= self.capacity, \
            f"{self.name}: holds {held} credits, capacity {self.capacity}"
        assert state not in SERVING or (self.procs and all(p.ready for p in self.procs)), \
            f"{self.name}: {state.value} before every rank is ready"

    def reset_failures(self) -> None:
        """A fresh failure budget and backoff (the operator retries it: scale, reload)."""
        self.budget.reset()
        self.consecutive_failures = 0

    @property
    def leader(self) -> Proc | None:
        return self.procs[0] if self.procs else None

    @property
    def stopping(self) -> bool:
        """A staged stop of its current incarnation is under way (stop message sent)."""
        return self.handle is not None and self.handle.stopping


def worker_spec(spec: SlotSpec, rank: int, incarnation: int, endpoint: str, cfg) -> WorkerSpec:
    """The spec a worker process starts from (argv; data only, never code)."""
    return WorkerSpec(
        wid=spec.wid if rank == 0 else f"{spec.wid}#{rank}",
        slot=spec.wid,
        pool=spec.pool,
        handler=spec.handler,
        config=spec.config,
        devices=list(spec.devices),
        rank=rank,
        world_size=spec.tp,
        incarnation=incarnation,
        endpoint=endpoint,
        parent_pid=os.getpid(),
        cores=list(spec.cores[rank]) if spec.cores and spec.cpu_affinity else None,
        capacity=spec.capacity,
        hb_interval=cfg.hb_interval,
        coord_timeout=cfg.coord_timeout,
        log_level=cfg.log_level,
        guard_timeout=spec.guard_timeout,
        limits=dataclasses.asdict(cfg.limits),  # the worker decodes each job's input under these
        # CLOCK_MONOTONIC is one clock for the host: the worker measures its boot from here. (The process's
        # start time from /proc is anchored to a whole-second boot time, up to 1 s off.)
        spawned_at=time.monotonic(),
    )


def worker_env(spec: SlotSpec, rank: int) -> dict:
    env = dict(os.environ)
    env.update(GPU_SAFE_ENV)
    # Set before the worker starts, so CUDA inside it only ever sees this slot's devices.
    env["CUDA_VISIBLE_DEVICES"] = cuda_visible(spec.devices)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA and NVML then number GPUs the same way
    if env["CUDA_VISIBLE_DEVICES"]:
        # Streams share the device's hardware queues (8 by default), each of which blocks the host once
        # ~1,021 operations wait in it. With 32, 10,000 pooled transfers queued behind a long kernel never
        # blocked the host; with 8 the host blocked at transfer 4,084 (docs/benchmarks.md, streams).
        env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    threads = spec.cpu_threads or (len(spec.cores[rank]) if spec.cores else None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = with_source_root(env.get("PYTHONPATH"))
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in spec.env.items()})
    return env


def with_source_root(pythonpath: str | None) -> str:
    """A worker's PYTHONPATH: this checkout first, so it imports `worker` even when not installed."""
    return os.pathsep.join(filter(None, [_SOURCE_ROOT, pythonpath]))


def slot_launch(spec: SlotSpec, incarnation: int, endpoint: str, cfg) -> SlotLaunch:
    """What a launcher starts for one incarnation of a slot: every rank's spec and environment."""
    ranks = []
    for rank in range(spec.tp):
        ws = worker_spec(spec, rank, incarnation, endpoint, cfg)
        ranks.append(RankLaunch(rank, ws.wid, ws, worker_env(spec, rank)))
    return SlotLaunch(spec.wid, spec.pool, incarnation, tuple(spec.devices), tuple(ranks))
