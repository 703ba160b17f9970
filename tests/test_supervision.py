"""Supervision: crash, hang and stuck detection, restart with a budget,
job retry with exactly-once replies, no orphans, graceful drain, stale workers.

Every test runs a real `orchestrator serve` with real worker processes, kills them with real signals
and polls (with generous timeouts: the machine is shared) until the expected state appears.
"""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import zmq

from orchestrator.client.sync import RequestError
from orchestrator.launch.stale import find_stale
from protocol.workerspec import WorkerSpec
from protocol import Codec
from protocol.messages import Error, Ok, Result, Status, Submit
from tests.conftest import REPO, poll_until

TH = "tests.handlers_for_tests"


# ---------------------------------------------------------------------------- helpers


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return str(path)


def workers(c, pool: str) -> list[dict]:
    """The pool's workers in `status`, asked over one client (a client per poll would pile up)."""
    return c.status()["pools"][pool]["workers"]


def worker(c, pool: str, name: str) -> dict:
    return next(w for w in workers(c, pool) if w["name"] == name)


def all_ready(c, pool: str, n: int):
    """The pool's workers once all `n` serve, else None."""
    ws = workers(c, pool)
    return ws if len(ws) == n and all(w["state"] == "ready" for w in ws) else None


def gone(pid: int) -> bool:
    """True once `pid` no longer runs (an unreaped zombie counts as gone: it holds nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def first_chunk(handle, timeout: float = 60.0):
    """The first stream chunk of a job, failing (instead of hanging) if none arrives in time."""
    box: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: box.put(next(iter(handle))), daemon=True).start()
    return box.get(timeout=timeout)


class RawClient:
    """A bare DEALER socket that records *every* reply per request id, so that a duplicated reply
    (which the library client would silently drop) is seen."""

    def __init__(self, address: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(address)
        self.codec = Codec()
        self.replies: dict = {}  # id -> [terminal replies]

    def send(self, msg) -> None:
        self.sock.send(self.codec.encode(msg))

    def pump(self, timeout_ms: int) -> list:
        """Receive what arrives within `timeout_ms`; record terminal replies; return the messages."""
        got = []
        if self.sock.poll(timeout_ms):
            while True:
                try:
                    msg = self.codec.decode(self.sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                got.append(msg)
                if isinstance(msg, (Result, Error)):
                    self.replies.setdefault(msg.id, []).append(msg)
        return got

    def barrier(self, rid: str, timeout: float = 60.0) -> dict:
        """A status round trip: every reply the coordinator sent before it has arrived after it."""
        self.send(Status(rid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.pump(100):
                if isinstance(msg, Ok) and msg.id == rid:
                    return msg.data
        raise AssertionError(f"no status reply within {timeout} s")

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


class Killer(threading.Thread):
    """SIGKILLs a random worker of `server` about every `every` s until stopped or `max_kills`."""

    def __init__(self, server, every: float = 0.5, max_kills: int = 60):
        super().__init__(daemon=True, name="chaos-killer")
        self.server, self.every, self.max_kills = server, every, max_kills
        self.kills: list[int] = []
        self.halt = threading.Event()
        self.rng = random.Random(4)

    def run(self) -> None:
        while not self.halt.wait(self.every) and len(self.kills) < self.max_kills:
            pids = self.server.worker_pids()
            if not pids:
                continue  # every slot is between lives; try again next period
            pid = self.rng.choice(pids)
            try:
                os.kill(pid, signal.SIGKILL)
                self.kills.append(pid)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


# ---------------------------------------------------------------------------- chaos


@pytest.mark.slow
def test_chaos_every_job_gets_exactly_one_reply(serve):
    """2,000 sleep jobs of 5-20 ms on 4 workers while a worker is SIGKILLed about every 0.5 s."""
    n_jobs, n_waves, min_kills, retries = 2000, 20, 10, 2
    server = serve(["--handler", "sleep", "--devices", "cpu:4", "--max-restarts", "1000"])
    raw = RawClient(server.address)
    killer = Killer(server)
    rng = random.Random(7)
    ids = [f"job-{i}" for i in range(n_jobs)]
    per_wave = n_jobs // n_waves
    try:
        killer.start()
        deadline = time.monotonic() + 150
        wave = 0
        while len(raw.replies) < n_jobs:
            # Wave w waits for w*10/19 kills, so the last wave goes out after the 10th kill: every kill
            # the test counts on lands while jobs are in flight.
            if wave < n_waves and len(killer.kills) >= wave * min_kills // (n_waves - 1):
                for jid in ids[wave * per_wave:(wave + 1) * per_wave]:
                    raw.send(Submit(jid, "sleep", {"ms": rng.randint(5, 20)}))
                wave += 1
            raw.pump(50)
            assert time.monotonic() < deadline, f"only {len(raw.replies)}/{n_jobs} replies; " \
                                                 f"{len(killer.kills)} kills\n{server.log()[-4000:]}"
        killer.stop()
        # Let the pool settle, then a status round trip: any duplicate reply would have arrived.
        c = server.client()
        poll_until(lambda: all_ready(c, "sleep", 4), 120, 0.2, "all 4 workers ready after chaos")
        st = raw.barrier("final-status")
    finally:
        killer.stop()
        raw.close()

    assert len(killer.kills) >= min_kills
    assert set(raw.replies) == set(ids), "a reply for an id that was never submitted"
    dupes = {k: len(v) for k, v in raw.replies.items() if len(v) != 1}
    assert not dupes, f"jobs with more than one terminal reply: {dupes}"
    failed = [m[0] for m in raw.replies.values() if isinstance(m[0], Error)]
    for err in failed:  # only a job that killed retries+1 workers may fail, and only this way
        assert err.code == "worker_crashed", (err.code, err.message)
        reasons = err.details["reasons"]
        assert len(reasons) == retries + 1, reasons
        assert all("killed by signal 9" in r or "heartbeat lost" in r for r in reasons), reasons
        assert "killed by signal 9" in err.message
    done = [m[0] for m in raw.replies.values() if isinstance(m[0], Result)]
    assert len(done) + len(failed) == n_jobs
    assert all(5 <= r.output["slept_ms"] <= 20 for r in done)
    retried = [r for r in done if r.meta["attempts"] > 1]
    assert retried, "no job was ever retried: the kills did not hit jobs in flight"
    pool = st["pools"]["sleep"]
    assert st["jobs_unfinished"] == 0
    assert (pool["completed"], pool["failed"]) == (len(done), len(failed))
    assert sum(w["restarts"] for w in pool["workers"]) >= min_kills
    assert all(w["last_exit_reason"] for w in pool["workers"] if w["restarts"])


# ---------------------------------------------------------------------------- poison job


def test_poison_job_fails_after_retries_and_pool_keeps_serving(serve):
    server = serve(["--pool", "p", "--handler", f"{TH}:CrashOnDemand", "--devices", "cpu:2"])
    c = server.client()
    with pytest.raises(RequestError) as e:
        c.run("p", {"crash": True}, timeout=120)
    assert e.value.code == "worker_crashed"
    assert e.value.details["reasons"] == ["exit code 13"] * 3  # default retries=2: 3 attempts
    assert "job failed on 3 worker(s)" in e.value.message and "exit code 13" in e.value.message

    # A per-job retry budget overrides the pool's: retries=0 means one attempt only.
    with pytest.raises(RequestError) as e0:
        c.submit("p", {"crash": True}, retries=0).result(120)
    assert e0.value.code == "worker_crashed" and e0.value.details["reasons"] == ["exit code 13"]

    ws = poll_until(lambda: all_ready(c, "p", 2), 60, 0.1, "both workers restarted and ready")
    assert sum(w["restarts"] for w in ws) == 3 + 1
    assert {w["last_exit_reason"] for w in ws} == {"exit code 13"}
    # The pool still serves, on both slots.
    outs = [c.submit("p", {"n": i}) for i in range(8)]
    assert [o.result(60)["echo"] for o in outs] == [{"n": i} for i in range(8)]
    assert c.status()["pools"]["p"]["health"] == "ready"


# ---------------------------------------------------------------------------- hang (SIGSTOP)


@pytest.mark.slow
def test_sigstopped_worker_declared_dead_and_its_jobs_retried(serve):
    server = serve(["--handler", "sleep", "--devices", "cpu:2"])
    c = server.client()
    jobs = [c.submit("sleep", {"ms": 1500, "n": i}) for i in range(4)]  # 2 credits x 2 workers
    ws = poll_until(lambda: (lambda w: w if all(x["inflight"] == 2 for x in w) else None)(
        workers(c, "sleep")), 30, 0.02, "both workers holding 2 jobs")
    victim = ws[0]["pids"][0]
    os.kill(victim, signal.SIGSTOP)
    try:
        w0 = poll_until(lambda: (lambda w: w if w["restarts"] >= 1 else None)(
            worker(c, "sleep", "sleep/0")), 30, 0.05, "the stopped worker declared dead")
        assert w0["last_exit_reason"] == "heartbeat lost after 2.5 s"
        outs = [j.result(60) for j in jobs]
    finally:
        if not gone(victim):
            os.kill(victim, signal.SIGKILL)
    assert [o["input"]["n"] for o in outs] == [0, 1, 2, 3]
    assert victim not in {o["pid"] for o in outs}, "a job finished on the hung process"
    poll_until(lambda: gone(victim), 30, 0.05, "the hung process killed")
    assert "sleep/0: down: heartbeat lost after 2.5 s" in server.log()


# ---------------------------------------------------------------------------- stuck step


def test_step_over_budget_marks_worker_stuck_and_restarts_it(serve):
    server = serve(["--handler", "sleep", "--devices", "cpu:1", "--step-budget", "1"])
    c = server.client()
    with pytest.raises(RequestError) as e:
        c.submit("sleep", {"ms": 3000}, retries=1).result(120)
    assert e.value.code == "worker_crashed"
    assert e.value.details["reasons"] == ["step exceeded 1 s"] * 2  # the job got its one retry
    w = poll_until(lambda: all_ready(c, "sleep", 1), 60, 0.1, "the stuck worker restarted")[0]
    assert w["restarts"] == 2 and w["last_exit_reason"] == "step exceeded 1 s"
    assert "sleep/0: stuck: step exceeded 1 s" in server.log()
    assert c.run("sleep", {"ms": 10}, timeout=60)["slept_ms"] == 10  # short steps still run


# ---------------------------------------------------------------------------- coordinator killed


def test_sigkilled_coordinator_leaves_no_worker_behind(serve):
    server = serve(["--handler", "sleep", "--devices", "cpu:4"])
    c = server.client()
    for i in range(8):
        c.submit("sleep", {"ms": 30000, "n": i})
    poll_until(lambda: c.status()["pools"]["sleep"]["inflight"] == 8, 30, 0.05, "8 jobs running")
    pids = server.worker_pids()
    assert len(pids) == 4 and not any(gone(p) for p in pids)
    server.proc.kill()
    server.proc.wait(30)
    # PR_SET_PDEATHSIG kills them at once; the 2 s goal is measured by scripts/bench_recovery.py.
    poll_until(lambda: all(gone(p) for p in pids), 10, 0.02, "every worker gone after the coordinator")


# ---------------------------------------------------------------------------- drain


def test_sigterm_drains_inflight_jobs_before_exit(serve):
    server = serve(["--handler", "sleep", "--devices", "cpu:2"])
    c = server.client()
    jobs = [c.submit("sleep", {"ms": 1000, "n": i}) for i in range(6)]  # 4 running, 2 queued
    poll_until(lambda: c.status()["pools"]["sleep"]["inflight"] == 4, 30, 0.02, "4 jobs running")
    server.proc.send_signal(signal.SIGTERM)
    poll_until(lambda: c.status()["state"] == "shutting_down", 30, 0.02, "the drain to begin")
    with pytest.raises(RequestError) as e:
        c.run("sleep", {"ms": 1}, timeout=30)
    assert e.value.code == "shutting_down"
    assert [j.result(60)["input"]["n"] for j in jobs] == list(range(6))
    assert server.proc.wait(60) == 0
    log = server.log()
    assert "draining (received SIGTERM): 6 unfinished job(s)" in log
    assert log.count("stopping: received SIGTERM") == 2 and log.count("exited normally") == 2


def test_sigterm_while_workers_start_stops_them_gracefully(serve):
    """A stop sent before a worker's sockets connect is dropped by the ROUTER; it must be sent again on
    its hello, and a slot being stopped must never turn ready."""
    server = serve(["--handler", "sleep", "--devices", "cpu:2"], ready=False)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    log = server.log()
    assert "did not exit within" not in log, log
    assert log.count("exited normally") == 2
    assert "ready (capacity" not in log[log.index("stopping: received SIGTERM"):]


def test_slow_starting_worker_is_not_declared_dead_before_hello(serve, tmp_path):
    """Interpreter start-up on a loaded machine can outlast the heartbeat timeout; silence only counts
    once the process has said hello. A sitecustomize makes the start 4 s slow (hb_timeout is 2.5 s)."""
    (tmp_path / "slowstart").mkdir()
    (tmp_path / "slowstart" / "sitecustomize.py").write_text("import time\ntime.sleep(4)\n")
    pythonpath = os.pathsep.join([str(tmp_path / "slowstart"), REPO])
    config = write_config(tmp_path, f"""
[pools.slow]
handler = "echo"
devices = "cpu:1"
env = {{ PYTHONPATH = {json.dumps(pythonpath)} }}
""")
    server = serve(["--config", config])  # waits until ready
    c = server.client()
    w = worker(c, "slow", "slow/0")
    assert w["restarts"] == 0 and w["last_exit_reason"] is None, w
    assert "heartbeat lost" not in server.log()
    assert c.run("slow", {"x": 1}, timeout=30) == {"x": 1}


# ---------------------------------------------------------------------------- restart budget


def test_spent_restart_budget_marks_slot_failed(serve, tmp_path):
    config = write_config(tmp_path, f"""
[server]
keep_going = true  # else serve stops once the first loads settle with failures (tests/test_failures.py)

[pools.doomed]
handler = "{TH}:FailLoad"
devices = "cpu:1"
max_restarts = 2

[pools.exits]
handler = "{TH}:ExitOnLoad"
devices = "cpu:1"
max_restarts = 1

[pools.half]
handler = "{TH}:FailLoadOnSlot0"
devices = "cpu:2"
max_restarts = 1
""")
    server = serve(["--config", config], ready=False)
    c = server.client()

    def settled():
        st = c.status()["pools"]
        states = {n: [w["state"] for w in p["workers"]] for n, p in st.items()}
        want = {"doomed": ["failed"], "exits": ["failed"], "half": ["failed", "ready"]}
        return st if states == want else None

    st = poll_until(settled, 120, 0.1, "the broken slots failed and the good one ready")
    doomed, exits, half = st["doomed"]["workers"][0], st["exits"]["workers"][0], st["half"]["workers"]
    assert doomed["restarts"] == 2 and exits["restarts"] == 1 and half[0]["restarts"] == 1
    assert doomed["last_exit_reason"] == \
        "load_failed: RuntimeError: weights file /nonexistent/model.bin is missing"
    assert exits["last_exit_reason"] == "exit code 7"
    assert half[0]["last_exit_reason"] == "load_failed: RuntimeError: slot 0 has a broken device"
    assert (st["doomed"]["health"], st["exits"]["health"], st["half"]["health"]) == \
        ("failed", "failed", "degraded")

    for pool in ("doomed", "exits"):
        with pytest.raises(RequestError) as e:
            c.run(pool, {"x": 1}, timeout=30)
        assert e.value.code == "unavailable" and pool in e.value.message
    # The pool with one failed slot keeps serving with the rest.
    assert {c.run("half", {"n": i}, timeout=30)["wid"] for i in range(4)} == {"half/1"}
    assert "half/0: failed (failure budget spent (2 failures within 600 s)" in server.log()


# ---------------------------------------------------------------------------- streaming replay


def test_streamed_job_is_not_replayed_unless_handler_is_replay_safe(serve, tmp_path):
    config = write_config(tmp_path, f"""
[pools.unsafe]
handler = "{TH}:StreamNotReplaySafe"
devices = "cpu:1"

[pools.safe]
handler = "{TH}:StreamReplaySafe"
devices = "cpu:1"
""")
    server = serve(["--config", config])
    c = server.client()
    outcomes = {}
    for pool in ("unsafe", "safe"):
        job = c.submit(pool, {"marker": str(tmp_path / f"{pool}.marker")}, stream=True)
        pid = first_chunk(job)["pid"]  # the client holds a chunk: replaying would send it twice
        os.kill(pid, signal.SIGKILL)
        try:
            outcomes[pool] = (pid, job.result(60))
        except RequestError as e:
            outcomes[pool] = (pid, e)
    pid, err = outcomes["unsafe"]
    assert isinstance(err, RequestError) and err.code == "worker_crashed"
    assert "after streaming 1 chunk(s)" in err.message and "not replayed" in err.message
    assert "killed by signal 9" in err.message
    pid, out = outcomes["safe"]
    assert out["done"] is True and out["pid"] != pid  # replayed on the restarted worker


# ---------------------------------------------------------------------------- stale workers


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_worker_is_reported_and_killed_with_kill_stale(serve, tmp_path):
    """A process that looks like a worker (`-m worker --spec ...`) whose coordinator pid is gone:
    what PR_SET_PDEATHSIG leaves behind when it cannot act (a real worker would exit by itself)."""
    spec = WorkerSpec(wid="ghost/0", slot="ghost/0", pool="ghost", handler="echo", devices=["cpu0"],
                      incarnation=0, endpoint=f"ipc://{tmp_path}/gone.sock", parent_pid=_dead_pid(),
                      hb_interval=0.5, coord_timeout=10.0)
    ghost = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)",
                              "-m", "worker", "--spec", spec.encode()])
    threading.Thread(target=ghost.wait, daemon=True).start()  # reap it the moment it is killed
    try:
        found = poll_until(lambda: [s for s in find_stale() if s["pid"] == ghost.pid], 30, 0.1,
                           "find_stale() to report the ghost")
        assert found[0]["wid"] == "ghost/0" and found[0]["devices"] == ["cpu0"]

        server = serve(["--handler", "echo", "--devices", "cpu:1"])
        assert f"stale worker pid {ghost.pid} (ghost/0" in server.log()
        assert "found (use --kill-stale to end it)" in server.log()
        assert ghost.poll() is None, "reported only: without --kill-stale it must be left alone"
        live = set(server.worker_pids())
        assert live and not live & {s["pid"] for s in find_stale()}, "a live worker reported stale"

        server2 = serve(["--handler", "echo", "--devices", "cpu:1", "--kill-stale"])
        assert f"stale worker pid {ghost.pid} (ghost/0" in server2.log()
        poll_until(lambda: ghost.returncode is not None, 30, 0.05, "--kill-stale to end the ghost")
        assert ghost.returncode == -signal.SIGKILL
        assert server.proc.poll() is None and set(server.worker_pids()) == live  # others untouched
    finally:
        if ghost.returncode is None:
            ghost.kill()
