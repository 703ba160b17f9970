"""One rank's membership of its tensor-parallel group: rendezvous, process groups, guard, leader and followers.

Rendezvous, with no free-port race: rank 0 starts a torch TCPStore on a loopback socket it bound to port 0
and reports the port it got (WGroupReport on its data socket); the coordinator relays it to the other ranks'
control sockets (WGroupInfo, also sent to a rank whose control socket connects later); they wait for it with
a timeout. Every incarnation of a group gets a new store, so nothing stale is read.

Process groups, created in the same order on every rank (creation is collective):
- the main group: NCCL on GPU (device `cuda:<rank>`, gloo for CPU tensors), gloo on CPU. The model's
  collectives run here;
- the guard group: gloo, with the short `guard_timeout`, for the collective guard (worker/guard.py);
- the plan group: gloo, with a long timeout, over which rank 0 broadcasts each step's plan (msgpack bytes
  in a uint8 tensor after a fixed-size length tensor: `send_plan`; never pickle).

Leader and followers: only rank 0 receives jobs from the coordinator. For a synchronous handler it broadcasts
each batch (job ids and inputs) before running it, and the followers run the same batch and drop the
outputs; so no rank can see a different job stream. Engine handlers (continuous batching) broadcast their own
plan inside the engine (transformers' TP driver), and their followers only wait here for the stop. When
rank 0's loop ends it broadcasts a stop plan. A follower also watches its own control thread: told to stop
and not hearing rank 0 within `STOP_GRACE_S`, it stops anyway.

A follower receives plans on a thread of its own, because the broadcast blocks while the group is idle and
the main thread must still notice a stop or a failure.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from datetime import timedelta

import msgpack
import torch
import torch.distributed as dist

from protocol.codec import array_hook, wire_default
from protocol.errors import LOAD_FAILED
from protocol.messages import WGroupReport
from protocol.workerspec import WorkerSpec
from worker.control import ControlState
from worker.guard import CollectiveGuard, GroupError, side_group
from worker.handler import Job

log = logging.getLogger("worker.tp")

RENDEZVOUS_TIMEOUT_S = 120.0  # ranks start together, but a loaded machine may take long to import torch
COLLECTIVE_TIMEOUT_S = 600.0  # main group; a rank hung in a collective is caught by the step watchdog first
PLAN_TIMEOUT_S = 7 * 24 * 3600.0  # followers wait for the next plan as long as the group is idle
STOP_GRACE_S = 3.0  # a follower told to stop waits this long for rank 0's stop plan
POLL_S = 0.2
HOST = "127.0.0.1"  # a group's ranks share one host


class GroupRuntime:
    """Construct cheaply (before the handler loads); `start(send)` rendezvouses and creates the process
    groups; then rank 0 serves through the ComputeLoop (which calls `broadcast_batch` and `broadcast_stop`)
    and the other ranks call `follow(loop)`."""

    def __init__(self, spec: WorkerSpec, device: str, state: ControlState):
        self.spec, self.state = spec, state
        self.rank, self.world_size = spec.rank, spec.world_size
        self.rank_device = device  # this rank's torch device string ("cuda:1" or "cpu")
        self.guard_timeout = float(spec.guard_timeout)
        self.guard: CollectiveGuard | None = None
        self.device = "cpu"  # where tensors for the main group's collectives live (cuda:<rank> with NCCL)
        self.failure: GroupError | None = None
        self._plan_group = None
        self._listen_sock: socket.socket | None = None  # rank 0: the store's listening socket
        self._plans: queue.SimpleQueue = queue.SimpleQueue()
        self._receiver: threading.Thread | None = None
        self._closed = False
        self._stopped = False  # a coordinated stop (rank 0's stop plan) happened: groups may be torn down

    # ------------------------------------------------------------------ start

    def start(self, send) -> None:
        """Rendezvous and create the process groups. `send(msg)` reaches the coordinator (rank 0 reports the
        store's address with it). Raises GroupError (code load_failed) on failure or timeout."""
        self._set_environ()
        try:
            store = self._rendezvous(send)
            self._init_groups(store)
        except GroupError:
            raise
        except Exception as e:  # torch raises RuntimeError/DistStoreError/ValueError here
            raise GroupError(f"rank {self.rank}: group rendezvous failed: {type(e).__name__}: {e}",
                             LOAD_FAILED) from e
        log.info("rank %d/%d joined its group (backend %s, guard timeout %g s)", self.rank,
                 self.world_size, dist.get_backend(), self.guard_timeout)

    def _set_environ(self) -> None:
        # transformers binds a TP rank to its device through LOCAL_RANK (cuda:<LOCAL_RANK>), as under torchrun.
        os.environ.update(LOCAL_RANK=str(self.rank), RANK=str(self.rank), WORLD_SIZE=str(self.world_size))
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks share a host: keep gloo on loopback

    def _rendezvous(self, send) -> dist.Store:
        timeout = timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
        if self.rank == 0:
            store = self._master_store(timeout)
            send(WGroupReport(self.spec.wid, self.spec.incarnation, {"host": HOST, "port": store.port}))
            return store
        if not self.state.group_info_event.wait(RENDEZVOUS_TIMEOUT_S):
            raise GroupError(f"rank {self.rank}: no rendezvous info from rank 0 within "
                             f"{RENDEZVOUS_TIMEOUT_S:g} s", LOAD_FAILED)
        info = self.state.group_info
        return dist.TCPStore(info["host"], int(info["port"]), self.world_size, is_master=False,
                             timeout=timeout)

    def _master_store(self, timeout: timedelta) -> dist.Store:
        """Rank 0's store on a loopback socket we bind to port 0 ourselves: the kernel picks the port (no
        race), and the store listens on 127.0.0.1 only (given a port, TCPStore listens on every interface)."""
        self._listen_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # kept open: the store uses it
        self._listen_sock.bind((HOST, 0))
        self._listen_sock.listen(self.world_size * 8)
        try:
            return dist.TCPStore(HOST, self._listen_sock.getsockname()[1], self.world_size, is_master=True,
                                 wait_for_workers=False, timeout=timeout,
                                 master_listen_fd=self._listen_sock.fileno())
        except (TypeError, RuntimeError, ValueError) as e:  # a torch without master_listen_fd support
            log.warning("TCPStore on a pre-bound socket failed (%s); binding port 0 on every interface", e)
            self._listen_sock.close()
            return dist.TCPStore(HOST, 0, self.world_size, is_master=True, wait_for_workers=False,
                                 timeout=timeout)

    def _init_groups(self, store) -> None:
        timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        # Explicit GPU ids on a machine without CUDA (CPU tests of placement): gloo, never NCCL.
        if self.rank_device.startswith("cuda") and torch.cuda.is_available():
            device = torch.device(self.rank_device)
            torch.cuda.set_device(device)
            self.device = self.rank_device
            dist.init_process_group("cpu:gloo,cuda:nccl", store=store, rank=self.rank,
                                    world_size=self.world_size, timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.world_size,
                                    timeout=timeout)
        self.guard = CollectiveGuard(side_group(self.guard_timeout), self.rank, self.world_size,
                                     self.guard_timeout)
        self._plan_group = side_group(PLAN_TIMEOUT_S)

    # ------------------------------------------------------------------ failures (any thread)

    def fail(self, exc: GroupError) -> None:
        """Record a group failure seen on another thread (an engine's forward hook, its reader) and wake
        the thread that owns the data socket: it raises the failure, which the worker reports as fatal."""
        if self.failure is not None or self._closed or self._stopped:
            return  # first failure wins; after a coordinated stop an engine ending is expected
        self.failure = exc
        log.error("rank %d: group failure: %s", self.rank, exc.message)
        self.state.wake()  # wakes rank 0's compute loop
        self._plans.put(("wake", None))  # wakes a follower

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure

    # ------------------------------------------------------------------ leader (rank 0)

    def broadcast_batch(self, jobs: list) -> None:
        """Send this step's batch to the followers; called by rank 0 before it runs the batch."""
        self._broadcast(("batch", [(j.jid, j.input, j.stream) for j in jobs]))

    def broadcast_stop(self, reason: str | None) -> None:
        """Rank 0's loop ended: let the followers leave their loops. Best effort: they may be gone."""
        try:
            self._broadcast(("stop", reason))
            self._stopped = True
        except GroupError as e:
            log.warning("could not tell the followers to stop: %s", e.message)

    def _broadcast(self, plan: tuple) -> None:
        try:
            send_plan(plan, self._plan_group)
        except RuntimeError as e:
            raise GroupError(f"rank 0 lost its followers while broadcasting a {plan[0]} plan: {e}") from None

    # ------------------------------------------------------------------ followers (rank > 0)

    def follow(self, loop) -> None:
        """Run what rank 0 plans until it broadcasts stop (or our own stop outlasts STOP_GRACE_S).
        Raises GroupError when the group fails."""
        self._receiver = threading.Thread(target=self._receive, name="tp-plan-receiver", daemon=True)
        self._receiver.start()
        while True:
            kind, body = self._next_plan()
            if kind == "stop":
                log.info("rank %d: stopping: %s", self.rank, body)
                self._receiver.join(timeout=1.0)  # it returns right after queueing the stop plan
                self._stopped = not self._receiver.is_alive()
                return
            if kind == "batch":
                self._run_batch(loop, body)

    def _receive(self) -> None:
        while True:
            try:
                plan = receive_plan(self._plan_group)
            except RuntimeError as e:
                self._plans.put(("lost", e))
                return
            self._plans.put(plan)
            if plan[0] == "stop":
                return

    def _next_plan(self) -> tuple:
        stop_seen: float | None = None
        while True:
            self.raise_if_failed()
            try:
                kind, body = self._plans.get(timeout=POLL_S)
            except queue.Empty:
                if self.state.stop_event.is_set():
                    stop_seen = stop_seen or time.monotonic()
                    if time.monotonic() - stop_seen > STOP_GRACE_S:
                        return "stop", f"{self.state.stop_reason} (no stop plan from rank 0)"
                continue
            if kind == "lost":
                if self.state.stop_event.is_set():
                    return "stop", self.state.stop_reason
                raise GroupError(f"rank {self.rank} lost rank 0 (the leader): {body}")
            if kind != "wake":
                return kind, body

    def _run_batch(self, loop, plan: list) -> None:
        jobs = [Job(jid, inp, stream, set()) for jid, inp, stream in plan]
        loop.progress.begin()
        try:
            for outcome in loop.handler.run_batch(jobs):
                _consume(outcome)  # rank 0 reports the outputs; a follower only keeps in step
        except GroupError:
            raise
        except Exception as e:  # as on rank 0, a batch-level failure fails its jobs, not the worker
            log.debug("rank %d: batch failed: %s", self.rank, e)
        finally:
            loop.progress.end()

    # ------------------------------------------------------------------ stats and close

    def guard_stats(self) -> dict | None:
        return None if self.guard is None else self.guard.stats()

    def close(self) -> None:
        """Log the guard's cost; release the process groups after a coordinated stop (after a failure the
        process exits without: a group in error may block its teardown)."""
        self._closed = True
        if self.guard is not None:
            log.info("rank %d: guard cost: %s", self.rank, self.guard.stats())
        if self._stopped and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # exiting anyway: a group that cannot be torn down is not worth a crash
                log.warning("destroy_process_group: %s", e)


def send_plan(plan: tuple, group) -> None:
    """Broadcast a plan from rank 0 as msgpack bytes in a uint8 tensor, its length first in a fixed-size
    tensor: two plain broadcasts, never pickle (an object collective would unpickle whatever arrives)."""
    payload = encode_plan(plan)
    dist.broadcast(torch.tensor([len(payload)], dtype=torch.int64), src=0, group=group)
    dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=0, group=group)


def receive_plan(group) -> tuple:
    """A follower's half of `send_plan`: blocks until rank 0 broadcasts the next plan."""
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=group)
    return decode_plan(data.numpy().tobytes())


def encode_plan(plan: tuple) -> bytes:
    """("batch", [(jid, input, stream), ...]) or ("stop", reason) as msgpack; arrays in inputs travel as
    NDArray maps, exactly as they came from the coordinator."""
    return msgpack.packb(plan, use_bin_type=True, default=wire_default)


def decode_plan(payload: bytes) -> tuple:
    kind, body = msgpack.unpackb(payload, raw=False, object_hook=array_hook, max_ext_len=0)
    if kind == "batch":
        body = [tuple(item) for item in body]
    return kind, body


def _consume(outcome) -> None:
    """A follower's outcome: a group failure raises; a generator is run to its end (its steps may hold
    collectives); anything else (an output, a job error) is dropped."""
    if isinstance(outcome, GroupError):
        raise outcome
    if hasattr(outcome, "__next__"):
        try:
            for _ in outcome:
                pass
        except GroupError:
            raise
        except Exception:  # rank 0 reports the job's error
            pass

