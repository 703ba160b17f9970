"""The launcher seam (orchestrator/launch/base.py), driven directly with a real event loop and real worker
processes: exit events carry a reason in words, the staged stop escalates to a kill within its budget,
and a background thread can wake the loop through a LoopWaker."""
from __future__ import annotations

import threading
import time

from orchestrator.config import PoolConfig, ServerConfig
from orchestrator.core.eventloop import EventLoop
from orchestrator.launch.base import LaunchError, LoopWaker
from orchestrator.launch.local import LocalLauncher
from orchestrator.observe.metrics import NullMetrics
from orchestrator.fleet.slots import Slot, SlotSpec, slot_launch
from orchestrator.states import SlotState as WS
from orchestrator.fleet.supervisor import Supervisor


def _launcher(tmp_path):
    loop, events, stops = EventLoop(), [], []
    launcher = LocalLauncher()
    launcher.attach(loop, events.append, lambda handle, rank, reason: stops.append((rank, reason)))
    spec = SlotSpec(pool="p", index=0, devices=("cpu0", "cpu1"), handler="echo", config={}, tp=2)
    # Nothing binds this endpoint: the workers start and wait for a coordinator that never answers.
    launch = slot_launch(spec, 1, f"ipc://{tmp_path}/nobody.sock", ServerConfig())
    return loop, launcher, launcher.start(launch), events, stops


def _run_until(loop, launcher, done, timeout=60.0):
    end = time.monotonic() + timeout
    while not done() and time.monotonic() < end:
        loop.poll(0.05)
        launcher.tick(time.monotonic())
    assert done(), "timed out"


def test_kill_reports_the_reason_given_for_every_rank(tmp_path):
    loop, launcher, handle, events, _ = _launcher(tmp_path)
    try:
        assert [r.rank for r in handle.ranks] == [0, 1] and handle.alive
        assert handle.node is None and handle.host  # local: no node, this host's name
        launcher.kill(handle, "test says so")
        _run_until(loop, launcher, lambda: len(events) == 2)
        assert {(e.rank, e.reason, e.status, e.clean) for e in events} == {
            (0, "test says so", "killed by signal 9 (SIGKILL)", False),
            (1, "test says so", "killed by signal 9 (SIGKILL)", False)}
        assert not handle.alive
    finally:
        launcher.close("test over")


def test_staged_stop_sends_stop_then_kills_after_its_budget(tmp_path):
    loop, launcher, handle, events, stops = _launcher(tmp_path)
    try:
        launcher.stop(handle, "scale down", budget=0.3)
        # Our send_stop delivers nothing, so the ranks never hear it: the launcher must kill them.
        assert stops == [(0, "scale down"), (1, "scale down")] and handle.stopping
        _run_until(loop, launcher, lambda: len(events) == 2)
        assert {e.reason for e in events} == {"scale down: did not exit within 0.3 s of stop"}
        assert launcher.stopping == set()
    finally:
        launcher.close("test over")


def test_loop_waker_runs_posted_callbacks_on_the_loop_thread():
    loop, ran = EventLoop(), []
    waker = LoopWaker(loop)
    try:
        thread = threading.Thread(target=lambda: [waker.post(lambda i=i: ran.append(
            (i, threading.current_thread() is threading.main_thread()))) for i in range(3)])
        thread.start()
        thread.join()
        assert ran == []  # nothing runs until the loop polls
        end = time.monotonic() + 30
        while len(ran) < 3 and time.monotonic() < end:
            loop.poll(0.1)
        assert ran == [(0, True), (1, True), (2, True)]
    finally:
        waker.close()


class NoRoomLauncher(LocalLauncher):
    """A launcher that cannot place the slot, as a cluster with no free GPUs: every start refuses."""

    def start(self, launch):
        raise LaunchError(f"no node has room for {len(launch.ranks)} rank(s) of {launch.name}")


def test_a_refused_launch_fails_the_slot_and_spends_its_restart_budget(tmp_path):
    loop, downs = EventLoop(), []
    sup = Supervisor(ServerConfig(), f"ipc://{tmp_path}/w.sock", lambda *a: None, NoRoomLauncher(), loop,
                     lambda slot, reason, code: downs.append(reason), lambda slot: None, NullMetrics())
    cfg = PoolConfig(name="p", max_restarts=2, restart_backoff=0.01)
    slot = Slot(SlotSpec(pool="p", index=0, devices=("cpu0",), handler="echo", config={}))
    sup.start_slot(slot, cfg)
    assert slot.state == WS.RESTARTING  # failed at once, restart scheduled after the backoff
    assert slot.last_exit_reason == "launch failed: no node has room for 1 rank(s) of p/0"
    end = time.monotonic() + 30
    while slot.state != WS.FAILED and time.monotonic() < end:
        loop.poll(0.02)
        sup.tick([slot], time.monotonic())
    assert slot.state == WS.FAILED and slot.incarnation == 3  # the first start and 2 restarts
    assert downs == [slot.last_exit_reason] * 3
