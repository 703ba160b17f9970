"""Slot lifecycle policy: start, readiness, liveness (exit, heartbeat, progress), restart, staged stop.

The supervisor decides; a `Launcher` (launch/base.py) starts, watches and stops the processes, and the
supervisor never touches a pid. It tells the Dispatcher (dispatch.py) about jobs through two callbacks:
`on_down(slot, reason, code)` (requeue its in-flight jobs) and `on_change(slot)` (credits or readiness
changed: dispatch again).

Liveness is checked three ways:
- process exit: the launcher's exit events (the local one: a pidfd per process, the instant it exits);
- heartbeats: any message from a process refreshes `last_seen`; silence for `hb_timeout` kills it;
- progress: heartbeats carry the current step's age; past the pool's budget the slot is `stuck`.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from protocol.messages import WGroupInfo, WPing, WStop
from orchestrator.launch.base import ExitEvent, LaunchError, Launcher, SlotHandle
from orchestrator.logs import ids
from orchestrator.fleet.slots import Proc, Slot, slot_launch
from orchestrator.fleet.restarts import decide
from orchestrator.states import LIVE, SERVING, SlotState as S

log = logging.getLogger("orchestrator.supervisor")

# Silence before a process's first message is start-up (interpreter, imports), which takes seconds on a
# loaded machine; heartbeat loss counts only after its hello, and a start that never says hello gets this.
START_TIMEOUT = 60.0


class Supervisor:
    def __init__(self, cfg, endpoint: str, send: Callable, launcher: Launcher, loop,
                 on_down: Callable, on_change: Callable, metrics):
        self.cfg = cfg
        self.endpoint = endpoint
        self.send = send  # send(identity, message) on the worker ROUTER
        self.launcher = launcher
        launcher.attach(loop, self._on_exit, self._send_stop_to)
        self.on_down = on_down
        self.on_change = on_change
        self.metrics = metrics
        self.by_id: dict[bytes, tuple[Slot, Proc]] = {}
        self.by_handle: dict[SlotHandle, Slot] = {}  # launcher handle -> its slot (live incarnations)
        self.pool_cfgs: dict = {}
        self.stopping = False  # the coordinator is stopping (stop_all): nothing restarts
        self._next_ping = 0.0

    # ------------------------------------------------------------------ start

    def start_slot(self, slot: Slot, pool_cfg) -> None:
        """Spawn every rank of the slot as a new incarnation."""
        self.pool_cfgs[slot.spec.pool] = pool_cfg
        slot.incarnation += 1
        slot.procs = []
        slot.capacity = 0
        slot.group_info = None  # each incarnation rendezvouses anew
        slot.stop_reason = None
        slot.handle = None
        slot.permanent, slot.retry_at, slot.last_exit_code = False, None, None
        slot.set_state(S.STARTING)
        launch = slot_launch(slot.spec, slot.incarnation, self.endpoint, self.cfg)
        try:
            slot.handle = self.launcher.start(launch)
        except LaunchError as e:
            self.fail(slot, f"launch failed: {e}")
            self._settle(slot)  # nothing runs: restart (after backoff) or fail for good at once
            return
        self.by_handle[slot.handle] = slot
        for r in launch.ranks:
            proc = Proc(r.rank, r.wid, slot.incarnation, slot.handle.ranks[r.rank])
            slot.procs.append(proc)
            self.by_id[proc.ctl_id] = (slot, proc)
            self.by_id[proc.data_id] = (slot, proc)
        log.info("%s: started incarnation %d (%s) devices %s", slot.name, slot.incarnation,
                 ", ".join(p.handle.label for p in slot.procs), ",".join(slot.spec.devices),
                 extra=ids(slot))

    def _forget(self, proc: Proc) -> None:
        """Drop the process's identities: anything it still sends is from a dead incarnation."""
        self.by_id.pop(proc.ctl_id, None)
        self.by_id.pop(proc.data_id, None)

    # ------------------------------------------------------------------ messages from workers

    def on_hello(self, slot: Slot, proc: Proc) -> None:
        proc.hello = True
        if slot.stop_reason:  # stopped while starting: the stop sent before it connected was dropped
            self.send(proc.ctl_id, WStop(slot.stop_reason))
            return
        if proc.rank > 0 and slot.group_info is not None:  # it connected after rank 0 reported
            self.send(proc.ctl_id, WGroupInfo(slot.group_info))
        if slot.state == S.STARTING and all(p.hello for p in slot.procs):
            slot.set_state(S.LOADING)
            log.info("%s: loading", slot.name, extra=ids(slot))

    def on_ready(self, slot: Slot, proc: Proc, msg) -> None:
        proc.ready = True
        if proc.rank == 0:
            slot.capacity, slot.replay_safe, slot.info = msg.capacity, msg.replay_safe, msg.info or {}
        if slot.state in (S.STARTING, S.LOADING) and all(p.ready for p in slot.procs) \
                and not slot.stop_reason:  # a slot being stopped never serves again
            if slot.state == S.STARTING:  # READY (data socket) can overtake HELLO (control socket)
                slot.set_state(S.LOADING)
            slot.set_state(S.READY)  # a TP group is ready only when every rank is
            slot.ready_at = time.monotonic()
            log.info("%s: ready (capacity %d)", slot.name, slot.capacity, extra=ids(slot))
            self.on_change(slot)

    def on_heartbeat(self, proc: Proc, msg) -> None:
        proc.step_age, proc.step_age_at = msg.step_age, time.monotonic()
        if msg.stats:
            proc.stats = msg.stats

    def on_fatal(self, slot: Slot, proc: Proc, msg) -> None:
        last = msg.message.strip().splitlines()[-1] if msg.message.strip() else ""
        tb = msg.details.get("traceback") if isinstance(msg.details, dict) else None
        if tb and tb != slot.last_traceback:  # once in the log, not once per attempt that fails alike
            slot.last_traceback = tb
            log.error("%s: fatal %s: %s\n%s", proc.wid, msg.code, last, tb.rstrip(), extra=ids(slot))
        else:
            again = " (the same traceback as the attempt before)" if tb else ""
            log.error("%s: fatal %s: %s%s", proc.wid, msg.code, last, again, extra=ids(slot))
        self.fail(slot, f"{msg.code}: {last}", code=msg.code)

    def on_group_report(self, slot: Slot, msg) -> None:
        """Relay rank 0's rendezvous info to the other ranks (no free-port race: rank 0 bound port 0)."""
        slot.group_info = msg.info  # kept for a rank whose control socket connects later (on_hello)
        for p in slot.procs[1:]:
            if p.hello:  # a ROUTER drops what it sends to a peer that has not connected yet
                self.send(p.ctl_id, WGroupInfo(msg.info))

    def on_load_changed(self, slot: Slot) -> None:
        """A job took or returned one of the slot's credits. BUSY/READY follows `load.held`, and only
        here (the one writer of that flag); an idle DRAINING slot stops."""
        held = slot.load.held
        if slot.state == S.READY and held:
            slot.set_state(S.BUSY)
        elif slot.state == S.BUSY and not held:
            slot.set_state(S.READY)
        elif slot.state == S.DRAINING and not held and not slot.stopping:
            self._send_stop(slot, slot.stop_reason or "drained")

    def send_leader(self, slot: Slot, msg) -> None:
        """Send rank 0 of the slot a control message, if that process is still ours."""
        leader = slot.leader
        if leader is not None and leader.ctl_id in self.by_id:
            self.send(leader.ctl_id, msg)

    # ------------------------------------------------------------------ failure

    def fail(self, slot: Slot, reason: str, code: str | None = None, stuck: bool = False) -> None:
        """Declare a slot down: kill every rank, requeue its jobs, then restart it (after reaping)."""
        if slot.state not in LIVE:
            return
        if slot.stop_reason:  # an intended stop that went wrong: requeue its jobs, but no restart
            self._kill_all(slot, reason)
            self.on_down(slot, reason, code)
            return
        if stuck:
            slot.set_state(S.STUCK)
            log.warning("%s: stuck: %s", slot.name, reason, extra=ids(slot))
        slot.set_state(S.DEAD)
        slot.last_exit_reason, slot.last_exit_code = reason, code
        log.warning("%s: down: %s", slot.name, reason, extra=ids(slot))
        self._kill_all(slot, reason)
        self.on_down(slot, reason, code)
        self.metrics.worker_restart(slot.spec.pool, slot.name)

    def _kill_all(self, slot: Slot, reason: str) -> None:
        for p in slot.procs:
            self._forget(p)
        if slot.handle is not None:
            self.launcher.kill(slot.handle, reason)

    def _on_exit(self, event: ExitEvent) -> None:
        slot = self.by_handle.get(event.handle)
        if slot is None:
            return  # an incarnation already settled
        if slot.state in LIVE and not (slot.stop_reason and event.clean):
            self.fail(slot, event.reason)
        self._settle(slot)

    def _settle(self, slot: Slot) -> None:
        """Once every rank has ended: stopped, failed for good, or scheduled to restart."""
        if slot.handle is not None and slot.handle.alive:
            return
        for p in slot.procs:
            self._forget(p)
        self.by_handle.pop(slot.handle, None)
        if slot.stop_reason or self.stopping:
            if slot.state in (S.DRAINING, S.READY, S.BUSY, S.STARTING, S.LOADING):
                self.on_down(slot, slot.stop_reason or "stopping", None)  # nothing may stay in flight
            if slot.state != S.STOPPED:
                slot.set_state(S.STOPPED)
                log.info("%s: stopped: %s", slot.name, slot.stop_reason or "coordinator stopping",
                         extra=ids(slot))
            if slot.restart_on_stop and not self.stopping:  # `reload`: the same slot comes back at once
                slot.restart_on_stop = False
                self.start_slot(slot, self.pool_cfgs[slot.spec.pool])
            self.on_change(slot)
            return
        if slot.state == S.DEAD:
            self._schedule_restart(slot)

    def _schedule_restart(self, slot: Slot) -> None:
        now = time.monotonic()
        cfg = self.pool_cfgs[slot.spec.pool]
        d = decide(slot, cfg, slot.last_exit_code, now)
        if d.restart_in is None:
            slot.permanent, slot.retry_at = d.permanent, d.retry_at
            slot.set_state(S.FAILED)
            retry = "only the operator retries it (scale, reload)" if d.permanent else \
                f"retried in {d.retry_at - now:.0f} s"
            log.error("%s: failed (%s; %s): %s", slot.name, d.why, retry, slot.last_exit_reason,
                      extra=ids(slot))
            self.on_change(slot)
            return
        slot.restart_at = now + d.restart_in
        slot.set_state(S.RESTARTING)
        log.info("%s: restarting in %.2f s (attempt %d)", slot.name, d.restart_in, slot.consecutive_failures,
                 extra=ids(slot))

    def retry_if_due(self, slot: Slot, now: float) -> None:
        """The reconcile step: a slot failed for a transient reason comes back once its budget refilled."""
        if slot.state == S.FAILED and not slot.permanent and slot.retry_at is not None \
                and now >= slot.retry_at:
            self.retry(slot, "failure budget refilled", fresh_budget=False)

    def reload(self, slot: Slot, reason: str) -> None:
        """`reload POOL`: a failed slot starts at once, a live one after its drain (restart_on_stop), both
        with a fresh failure budget. A slot already being stopped on purpose is left alone."""
        if slot.state == S.FAILED:
            self.retry(slot, reason, fresh_budget=True)
            return
        if slot.state == S.STOPPED or slot.stop_reason:
            return
        slot.reset_failures()
        if slot.state in (S.READY, S.BUSY, S.STARTING, S.LOADING):
            slot.restart_on_stop = True
            self.drain_slot(slot, reason)

    def retry(self, slot: Slot, reason: str, fresh_budget: bool) -> None:
        """Start a FAILED slot again: the reconcile step once its budget refilled, or the operator (scale,
        reload) with a fresh budget, which is the only way a permanent failure is retried."""
        if slot.state != S.FAILED or self.stopping:
            return
        if fresh_budget:
            slot.reset_failures()
        log.info("%s: retrying after failure (%s)", slot.name, reason, extra=ids(slot))
        self.start_slot(slot, self.pool_cfgs[slot.spec.pool])

    # ------------------------------------------------------------------ timers

    def tick(self, slots: list[Slot], now: float) -> None:
        self.launcher.tick(now)
        if now >= self._next_ping:
            self._next_ping = now + self.cfg.hb_interval
            for slot in slots:
                for p in slot.procs:
                    if p.alive and p.ctl_id in self.by_id:
                        self.send(p.ctl_id, WPing(time.time()))
        for slot in slots:
            self._check_slot(slot, now)

    def _check_slot(self, slot: Slot, now: float) -> None:
        if slot.state in LIVE:
            self._check_liveness(slot, now)
            self._check_progress(slot, now)
        if slot.state == S.RESTARTING and now >= slot.restart_at and not self.stopping:
            self.start_slot(slot, self.pool_cfgs[slot.spec.pool])

    def _check_liveness(self, slot: Slot, now: float) -> None:
        if slot.stopping:
            return  # a staged stop is under way: its own budget decides, not heartbeats
        for p in slot.procs:
            if not p.handle.started:  # waiting for room in a cluster: its start-up clock has not begun
                p.last_seen = now
                continue
            silent = now - p.last_seen
            limit = self.cfg.hb_timeout if p.hello else max(self.cfg.hb_timeout, START_TIMEOUT)
            if p.alive and silent > limit:
                self.fail(slot, f"heartbeat lost after {self.cfg.hb_timeout:.1f} s")
                return

    def _check_progress(self, slot: Slot, now: float) -> None:
        cfg = self.pool_cfgs[slot.spec.pool]
        budget = cfg.load_budget if slot.state in (S.STARTING, S.LOADING) else cfg.step_budget
        if budget is None:
            return
        for p in slot.procs:
            age = p.current_step_age(now)
            if age is not None and age > budget:
                self.fail(slot, f"step exceeded {budget:g} s", stuck=True)
                return

    # ------------------------------------------------------------------ staged stop

    def stop_all(self, slots: list[Slot], reason: str) -> None:
        """Coordinator stop: the staged stop of every slot, and no restart or retry from here on."""
        self.stopping = True
        for slot in slots:
            self.stop_slot(slot, reason)

    def drain_slot(self, slot: Slot, reason: str) -> None:
        """Scale-down: no new jobs; in-flight ones finish; then the staged stop."""
        slot.stop_reason = reason
        if slot.state in SERVING:
            slot.set_state(S.DRAINING)
            log.info("%s: draining: %s", slot.name, reason, extra=ids(slot))
            self.on_load_changed(slot)
        else:
            self.stop_slot(slot, reason)

    def stop_slot(self, slot: Slot, reason: str) -> None:
        """Staged stop. Budget: `stop_timeout` for the stop message to end the process, then SIGKILL
        and another `stop_timeout` to reap it (so at most 2 x stop_timeout)."""
        slot.stop_reason = slot.stop_reason or reason
        if slot.state in (S.DEAD, S.RESTARTING, S.FAILED):
            if slot.handle is None or not slot.handle.alive:
                slot.set_state(S.STOPPED)
                self.on_change(slot)
            return
        if slot.state in SERVING:
            slot.set_state(S.DRAINING)
        self._send_stop(slot, reason)

    def _send_stop(self, slot: Slot, reason: str) -> None:
        log.info("%s: stopping: %s", slot.name, reason, extra=ids(slot))
        if slot.handle is not None:
            self.launcher.stop(slot.handle, reason, self.cfg.stop_timeout)
        self._settle(slot)

    def _send_stop_to(self, handle: SlotHandle, rank: int, reason: str) -> None:
        """The launcher's first stop stage: the stop message, over the worker socket."""
        slot = self.by_handle.get(handle)
        if slot is not None and rank < len(slot.procs):
            self.send(slot.procs[rank].ctl_id, WStop(reason))
