"""The launcher seam (orchestrator/launcher.py), driven directly with a real event loop and real worker
processes: exit events carry a reason in words, the staged stop escalates to a kill within its budget,
and a background thread can wake the loop through a LoopWaker."""
from __future__ import annotations

import threading
import time

from orchestrator.config import ServerConfig
from orchestrator.eventloop import EventLoop
from orchestrator.launcher import LocalLauncher, LoopWaker
from orchestrator.procs import SlotSpec, slot_launch


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
