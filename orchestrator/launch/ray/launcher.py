"""The Ray launcher: each slot is one STRICT_PACK placement group, each rank a small actor in its bundle.

Imported only when the coordinator runs with `--ray` (or `[cluster] ray`): without it, nothing imports
ray. Ray decides where a slot runs; the worker process, its protocol and supervision are the same as with
the local launcher (launch/local.py):

- start: a placement group of one bundle per rank ({"GPU": 1}, or {"CPU": 1} for `ray-cpu:N`), STRICT_PACK
  so that a TP group never spans nodes; then one `RankActor` (ray/rank.py) per bundle, which starts
  `python -m worker` with CUDA_VISIBLE_DEVICES made of the accelerator ids Ray gave the group's bundles
  (every rank sees the group's devices, rank r uses cuda:r, as locally);
- exit events: each actor's `wait()` resolves when its worker exits (the status in words), or fails when
  the actor or its node dies (Ray's ActorDiedError); a watcher thread waits on these futures and posts each
  event to the event-loop thread through a `LoopWaker`;
- kill: the actor SIGKILLs its worker, then the actors are killed and the placement group removed, so the
  slot's resources go back to the cluster; a restart makes a new placement group, which Ray places when
  the cluster has room (a rank waiting for room is not counted as silent by the supervisor).

Blocking Ray calls never run on the event-loop thread: placement and launch run on a small thread pool,
and the watcher has its own thread. State shared with those threads is the `_Group` records, under a
lock; the handles (`SlotHandle`, `RankHandle`) are written only on the loop thread.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from protocol.curve import CurveClientKeys
from protocol.workerspec import WorkerSpec
from orchestrator.launch.base import Launcher, LoopWaker, RankHandle, SlotHandle, SlotLaunch, exit_words
from orchestrator.launch.ray.cluster import Demand, RayCluster, resource_of
from orchestrator.launch.ray.rank import RankActor

log = logging.getLogger("orchestrator.ray")

WATCH_S = 0.2  # the watcher rechecks for new futures this often
PLACE_POLL_S = 1.0  # a placement waiting for room rechecks whether its slot was killed this often
KILL_GRACE_S = 2.0  # after asking an actor to kill its worker, wait this long before killing the actor
ACTOR_CALL_S = 120.0  # an actor's where()/launch() answer (a cold node starts a Python process first)
START_THREADS = 8  # placements waiting for room each hold one


@dataclass
class _Group:
    """One slot incarnation on the cluster, shared between the launcher's threads (under its lock)."""

    handle: SlotHandle
    pg: object = None
    actors: list = field(default_factory=list)
    waits: dict = field(default_factory=dict)  # ObjectRef of actor.wait() -> rank
    ended: set = field(default_factory=set)  # ranks whose exit was posted
    killed: str | None = None  # the kill reason, once kill() was called
    cleaned: bool = False


class RayLauncher(Launcher):
    """Construct cheaply; `connect()` joins the cluster; `reserve()` places the first slots (all or none);
    then the `Launcher` methods as usual."""

    log = logging.getLogger("orchestrator.ray")

    def __init__(self, cluster: RayCluster, run_id: str, placement_timeout: float, keys: CurveClientKeys):
        super().__init__()
        self.cluster = cluster
        self.keys = keys  # the run's worker key pair and the worker socket's public key, for every spec
        self.run_id = run_id  # names this run's actors and placement groups in Ray
        self.placement_timeout = placement_timeout
        self.ray = None  # the module, once connected
        self._lock = threading.Lock()
        self._groups: dict[SlotHandle, _Group] = {}
        self._reserved: dict[str, object] = {}  # slot name -> ready placement group for its first start
        self._pool: ThreadPoolExecutor | None = None
        self._watcher: threading.Thread | None = None
        self._closing = threading.Event()
        self._waker: LoopWaker | None = None
        self._actor_cls = None

    # ------------------------------------------------------------------ cluster

    def connect(self) -> None:
        """Join the Ray cluster as a driver (ValueError naming the address if we cannot), and start the
        threads that place slots and watch their actors."""
        self.ray = self.cluster.connect()
        self._actor_cls = self.ray.remote(RankActor)
        self._pool = ThreadPoolExecutor(START_THREADS, thread_name_prefix="ray-start")
        self._watcher = threading.Thread(target=self._watch, name="ray-watch", daemon=True)
        self._watcher.start()

    def node_address(self) -> str:
        return self.cluster.node_address()

    def reserve(self, demands: list[Demand]) -> None:
        """Place every first slot before any worker starts: all placement groups become ready within
        `placement_timeout`, or they are all removed and ValueError says what was asked and what the
        cluster has (no half-started pool)."""
        self.cluster.check_fits(demands)
        ray = self.ray
        pgs = {d.slot: self._placement_group(d, 1) for d in demands}
        ready, _ = ray.wait([pg.ready() for pg in pgs.values()], num_returns=len(pgs),
                            timeout=self.placement_timeout)
        if len(ready) < len(pgs):
            for pg in pgs.values():
                ray.util.remove_placement_group(pg)
            free = ray.available_resources()
            raise ValueError(f"{self.cluster.too_few(demands)}; {len(pgs) - len(ready)} of {len(pgs)} "
                             f"placement group(s) not ready within {self.placement_timeout:g} s (free now: "
                             f"{free.get('GPU', 0):g} GPU, {free.get('CPU', 0):g} CPU)")
        self._reserved.update(pgs)

    def _placement_group(self, demand: Demand, incarnation: int):
        from ray.util.placement_group import placement_group

        return placement_group(demand.bundles(), strategy="STRICT_PACK",
                               name=f"{self.run_id}:{demand.slot}:{incarnation}")

    # ------------------------------------------------------------------ Launcher

    def attach(self, loop, on_exit, send_stop) -> None:
        super().attach(loop, on_exit, send_stop)
        self._waker = LoopWaker(loop)

    def start(self, launch: SlotLaunch) -> SlotHandle:
        handle = SlotHandle(launch, [RankHandle(r.rank, r.wid) for r in launch.ranks])
        group = _Group(handle)
        with self._lock:
            self._groups[handle] = group
        self._pool.submit(self._place_and_launch, group, launch)
        return handle

    def kill(self, handle: SlotHandle, reason: str) -> None:
        for rank in handle.ranks:
            if rank.note_reason(reason) and rank.alive:
                log.info("killing %s: %s", rank.label, reason, extra={"wid": rank.wid, "pool": handle.pool})
        with self._lock:
            group = self._groups.get(handle)
            if group is None or group.killed is not None:
                return
            group.killed = reason
        self._pool.submit(self._kill_group, group)

    def close(self, reason: str) -> None:
        """Kill every actor and remove every placement group of this run, then leave the cluster."""
        if self.ray is None:
            return
        with self._lock:
            groups = list(self._groups.values())
        for group in groups:
            self._cleanup(group, force=True)
        for pg in self._reserved.values():
            self.ray.util.remove_placement_group(pg)
        self._reserved.clear()
        self._closing.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._waker is not None:
            self._waker.close()
        self.ray.shutdown()
        self.ray = None

    # ------------------------------------------------------------------ placement (start threads)

    def _place_and_launch(self, group: _Group, launch: SlotLaunch) -> None:
        try:
            self._place(group, launch)
            if group.killed is None:
                self._launch(group, launch)
        except Exception as e:  # a node lost while starting, an actor that failed to start...
            log.warning("%s: start on the Ray cluster failed: %s", launch.name, _first_line(e))
            self._end_unstarted(group, f"start on the Ray cluster failed: {_first_line(e)}")
            return
        if group.killed is not None:  # killed while placing or launching
            self._kill_group(group)

    def _place(self, group: _Group, launch: SlotLaunch) -> None:
        ray = self.ray
        demand = Demand(launch.name, resource_of(_kind(launch)), len(launch.ranks))
        pg = self._reserved.pop(launch.name, None) if launch.incarnation == 1 else None
        if pg is None:
            pg = self._placement_group(demand, launch.incarnation)
        with self._lock:
            group.pg = pg
        waited = 0.0
        while group.killed is None:
            ready, _ = ray.wait([pg.ready()], timeout=PLACE_POLL_S)
            if ready:
                return
            waited += PLACE_POLL_S
            if waited == 10 * PLACE_POLL_S:  # once: the slot waits for room, and says so
                log.warning("%s: waiting for room in the Ray cluster (%d %s on one node); %s",
                            launch.name, demand.ranks, demand.resource, self.cluster.describe())

    def _launch(self, group: _Group, launch: SlotLaunch) -> None:
        ray = self.ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        resource = resource_of(_kind(launch))
        actors = []
        for r in launch.ranks:
            strategy = PlacementGroupSchedulingStrategy(group.pg, placement_group_bundle_index=r.rank)
            actors.append(self._actor_cls.options(
                name=f"{self.run_id}:{r.wid}:{launch.incarnation}", max_concurrency=4, max_restarts=0,
                num_cpus=1 if resource == "CPU" else 0, num_gpus=1 if resource == "GPU" else 0,
                scheduling_strategy=strategy).remote(r.wid))
        with self._lock:
            group.actors = actors
        wheres = ray.get([a.where.remote() for a in actors], timeout=ACTOR_CALL_S)
        # Every rank sees the group's devices and uses cuda:<rank>, as with the local launcher.
        visible = ",".join(g for w in wheres for g in w["gpus"])
        started = ray.get([a.launch.remote(self._spec_text(r.spec), _rank_env(r.env, visible), w["node"])
                           for a, r, w in zip(actors, launch.ranks, wheres)], timeout=ACTOR_CALL_S)
        with self._lock:
            for rank, actor in enumerate(actors):
                group.waits[actor.wait.remote()] = rank
        self._waker.post(lambda: self._placed(group, wheres, started, visible))

    def _spec_text(self, spec: WorkerSpec) -> str:
        """The rank's encoded spec as the remote worker needs it: CURVE keys for the TCP worker socket,
        and no CPU pinning (the cores were split for this host; Ray's bundles govern the remote node's).
        Plain text, so that only a string crosses Ray's actor call."""
        return dataclasses.replace(spec, curve=self.keys.to_spec(), cores=None).encode()

    def _placed(self, group: _Group, wheres: list, started: list, visible: str) -> None:
        """Loop thread: record where the ranks run."""
        handle = group.handle
        handle.node, handle.host = wheres[0]["node"], wheres[0]["host"]
        for rank, where, s in zip(handle.ranks, wheres, started):
            rank.pid, rank.node, rank.host = s["pid"], where["node"], where["host"]
        ids = {"wid": handle.name, "pool": handle.pool}
        log.info("%s: placed on node %s (%s), CUDA_VISIBLE_DEVICES=%r, pid(s) %s", handle.name,
                 handle.node[:8], handle.host, visible, [s["pid"] for s in started], extra=ids)
        nice = max(s["nice"] for s in started)
        if nice > 0:
            log.warning("%s: its worker(s) run at niceness %d (Ray's worker niceness, which we may not "
                        "lower here): a busy node starves them; start the nodes with "
                        "RAY_worker_niceness=0", handle.name, nice, extra=ids)

    def _end_unstarted(self, group: _Group, why: str) -> None:
        """Report an exit for every rank whose worker never started (or whose start we lost track of)."""
        with self._lock:
            ranks = [r for r in range(len(group.handle.ranks))
                     if r not in group.ended and r not in group.waits.values()]
            group.ended.update(ranks)
        for r in ranks:
            self._post_exit(group, r, why, [])
        self._cleanup(group, force=True)

    # ------------------------------------------------------------------ kill (start threads)

    def _kill_group(self, group: _Group) -> None:
        with self._lock:
            actors, waits = list(group.actors), list(group.waits)
        if waits:  # the workers run: have each actor SIGKILL its worker, so the exit reads as a status
            for actor in actors:
                actor.kill.remote()
            self.ray.wait(waits, num_returns=len(waits), timeout=KILL_GRACE_S)
        elif not actors and group.pg is None:
            return  # not placed yet: _place_and_launch sees `killed` and comes back here
        self._cleanup(group, force=True)
        self._end_unstarted(group, group.killed or "killed")

    def _cleanup(self, group: _Group, force: bool) -> None:
        """Kill the actors and remove the placement group once no rank needs them (or now, if force)."""
        with self._lock:
            if group.cleaned or not (force or len(group.ended) == len(group.handle.ranks)):
                return
            group.cleaned = True
            actors, pg = list(group.actors), group.pg
        for actor in actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception as e:  # already gone
                log.debug("ray.kill: %s", e)
        if pg is not None:
            try:
                self.ray.util.remove_placement_group(pg)
            except Exception as e:
                log.debug("remove_placement_group: %s", e)

    # ------------------------------------------------------------------ exits (watcher thread)

    def _watch(self) -> None:
        ray = self.ray
        while not self._closing.is_set():
            with self._lock:
                refs = [ref for g in self._groups.values() for ref in g.waits]
            if not refs:
                self._closing.wait(WATCH_S)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=WATCH_S)
            for ref in ready:
                self._on_wait_done(ref)

    def _on_wait_done(self, ref) -> None:
        with self._lock:
            group = next((g for g in self._groups.values() if ref in g.waits), None)
            if group is None:
                return
            rank = group.waits.pop(ref)
            group.ended.add(rank)
        try:
            result = self.ray.get(ref)
            status, tail = exit_words(result["returncode"]), result["tail"]
        except Exception as e:  # RayActorError and kin: the actor or its node died
            status, tail = self._death_words(group, rank, e), []
        self._post_exit(group, rank, status, tail)
        self._cleanup(group, force=False)

    def _death_words(self, group: _Group, rank: int, exc: Exception) -> str:
        node = group.handle.ranks[rank].node or (group.handle.node or "")
        alive = self.cluster.nodes() if node else {}
        if node and node not in alive:
            return f"node {node[:8]} lost (Ray: {type(exc).__name__})"
        return f"Ray actor died: {_first_line(exc)}"

    def _post_exit(self, group: _Group, rank: int, status: str, tail: list) -> None:
        if self._closing.is_set():
            return
        self._waker.post(lambda: self._exited(group, rank, status, tail))

    def _exited(self, group: _Group, rank: int, status: str, tail: list) -> None:
        """Loop thread: one rank has ended."""
        handle = group.handle
        r = handle.ranks[rank]
        if not r.alive:
            return
        r.ended(status, tail)
        if not handle.alive:
            self.stopping.discard(handle)
            with self._lock:
                self._groups.pop(handle, None)
        self._report_exit(handle, r, tail)


def _kind(launch: SlotLaunch) -> str:
    """Device kind of a launch: its devices are virtual ids `rayN` (GPU) or `raycpuN` (CPU)."""
    return "ray-cpu" if launch.devices and launch.devices[0].startswith("raycpu") else "ray-gpu"


def _rank_env(env: dict, visible: str) -> dict:
    """What the coordinator sets for a rank, on top of the node's own environment: the entries of the
    rank's environment that differ from the coordinator's (the NCCL safety variables, thread counts,
    the pool's `env`), with CUDA_VISIBLE_DEVICES from the ids Ray assigned. PYTHONPATH is the node's."""
    out = {k: v for k, v in env.items() if os.environ.get(k) != v and k != "PYTHONPATH"}
    out["CUDA_VISIBLE_DEVICES"] = visible
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
