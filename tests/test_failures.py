"""Failures a user can read, and pools that heal themselves.

Every test runs a real `orchestrator serve` (a subprocess) with real worker processes; the handlers that
fail on purpose are in tests/handlers_for_tests.py. Waits poll with generous timeouts (shared machine);
the one figure with a time in it (exit within 15 s) is measured and printed, not asserted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from orchestrator.client.sync import RequestError
from tests.conftest import REPO, poll_until

TH = "tests.handlers_for_tests"
WAIT = 120.0


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return str(path)


def serve_until_exit(args: list, timeout: float = WAIT) -> tuple[int, str, str, float]:
    """Run `orchestrator serve ARGS` to its end: (exit code, stdout, stderr, seconds it took)."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "serve", "--address", "tcp://127.0.0.1:0",
                           *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO})
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0


def pool_health(client, pool: str) -> dict:
    return client.health()["pools"][pool]


def slot(client, pool: str, index: int = 0) -> dict:
    return client.status()["pools"][pool]["workers"][index]


# ---------------------------------------------------------------------------- fail fast at startup


def test_missing_model_path_exits_2_naming_pool_and_path(tmp_path):
    code, out, err, took = serve_until_exit(["--handler", "generate", "--model", "/nonexistent/model",
                                             "--devices", "cpu:1", "--pool", "gen"])
    lines = len((out + err).splitlines())
    print(f"serve with a missing model exited {code} after {took:.1f} s, printing {lines} lines")
    assert code == 2, err
    first = err.splitlines()[0]
    assert "'gen'" in first and "'/nonexistent/model'" in first, first
    assert "model '/nonexistent/model' not found: not a local directory, and not a hub id" in first
    assert lines < 30, out + err
    assert err.count("started incarnation") == 1, err  # a permanent failure is never restarted
    assert "Repo id must be" not in err and "Traceback" not in err


def test_misspelt_config_key_exits_2_naming_key_and_pool(tmp_path):
    config = write_config(tmp_path, f"""
[pools.gen]
handler = "generate"
devices = "cpu:1"
config = {{ model = {json.dumps(str(tmp_path))}, max_new_token_cap = 16 }}
""")
    code, out, err, _ = serve_until_exit(["--config", config])
    assert code == 2, err
    first = err.splitlines()[0]
    assert "'gen'" in first and "max_new_token_cap" in first and "unknown config keys" in first, first
    assert err.count("started incarnation") == 1, err


def test_unknown_handler_and_constructor_error_are_permanent(tmp_path):
    code, _, err, _ = serve_until_exit(["--handler", "no_such_handler", "--devices", "cpu:1"])
    assert code == 2 and "unknown_handler" in err.splitlines()[0] and "no_such_handler" in err.splitlines()[0]

    code, _, err, _ = serve_until_exit(["--handler", f"{TH}:InitFails", "--devices", "cpu:1",
                                        "--pool", "init"])
    first = err.splitlines()[0]
    assert code == 2 and "'init'" in first and "handler_init_failed" in first and "'shards'" in first, err
    assert err.count("started incarnation") == 1
    assert err.count("Traceback") == 1, err  # once, in the log, not once per attempt


def test_keep_going_serves_other_pools_and_health_shows_reason(serve, tmp_path):
    config = write_config(tmp_path, f"""
[server]
keep_going = true

[pools.good]
handler = "echo"
devices = "cpu:1"

[pools.nomodel]
handler = "generate"
devices = "cpu:1"
config = {{ model = "/nonexistent/model" }}

[pools.typo]
handler = "embed"
devices = "cpu:1"
config = {{ max_text = 4 }}
""")
    server = serve(["--config", config], ready=False)
    c = server.client()

    def settled():
        h = c.health()["pools"]
        return h if (h["good"]["status"], h["nomodel"]["status"], h["typo"]["status"]) == \
            ("ready", "failed", "failed") else None

    h = poll_until(settled, WAIT, 0.1, "good ready, the two broken pools failed")
    assert "model '/nonexistent/model' not found" in h["nomodel"]["reason"]
    assert "unknown config keys ['max_text']" in h["typo"]["reason"]
    failure = h["nomodel"]["workers"]["nomodel/0"]["failure"]
    assert failure == {"reason": failure["reason"], "code": "model_not_found", "permanent": True,
                       "retry_in": None}
    assert c.health()["status"] == "degraded"
    assert c.run("good", {"x": 1}, timeout=30) == {"x": 1}
    with pytest.raises(RequestError) as e:
        c.run("nomodel", {"prompt": "hi"}, timeout=30)
    assert e.value.code == "unavailable"
    log = server.log()
    assert "orchestrator serve: pool 'nomodel' failed to start" in log
    assert "serving the other pools (--keep-going)" in log
    assert log.count("nomodel/0: started incarnation") == 1 and log.count("typo/0: started incarnation") == 1


# ---------------------------------------------------------------------------- operator retries


def test_permanent_failure_waits_for_reload_then_recovers(serve, tmp_path):
    model_dir = tmp_path / "model"
    config = write_config(tmp_path, f"""
[pools.m]
handler = "{TH}:NeedsModelDir"
devices = "cpu:1"
config = {{ model = {json.dumps(str(model_dir))} }}
""")
    server = serve(["--config", config, "--keep-going"], ready=False)
    c = server.client()
    w = poll_until(lambda: (s := slot(c, "m"))["state"] == "failed" and s, WAIT, 0.1, "m/0 failed")
    assert w["failure"]["permanent"] and w["restarts"] == 0 and str(model_dir) in w["last_exit_reason"]

    # scale is an operator action: it retries at once, and the cause is still there.
    assert c.scale("m", 1) == {"pool": "m", "replicas": 1}
    poll_until(lambda: slot(c, "m")["restarts"] == 1 and slot(c, "m")["state"] == "failed", WAIT, 0.1,
               "the retry by scale failed again")

    model_dir.mkdir()  # the cause is gone; nothing retries until the operator says so
    reload = subprocess.run([sys.executable, "-m", "orchestrator", "reload", "m", "--address", server.address],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert reload.returncode == 0 and json.loads(reload.stdout) == {"pool": "m", "replicas": 1}, reload.stderr
    poll_until(lambda: slot(c, "m")["state"] == "ready", WAIT, 0.1, "m/0 ready after reload")
    assert c.run("m", {"n": 1}, timeout=30)["echo"] == {"n": 1}
    assert pool_health(c, "m")["reason"] is None


def test_reload_restarts_a_serving_pool_without_losing_jobs(serve):
    server = serve(["--handler", "sleep", "--devices", "cpu:1"])
    c = server.client()
    pid = slot(c, "sleep")["pids"][0]
    job = c.submit("sleep", {"ms": 300})
    assert c.reload("sleep") == {"pool": "sleep", "replicas": 1}
    assert job.result(60)["slept_ms"] == 300  # the drain lets it finish
    w = poll_until(lambda: (s := slot(c, "sleep"))["state"] == "ready" and s["pids"] != [pid] and s,
                   WAIT, 0.1, "a new incarnation ready")
    assert w["restarts"] == 1
    assert c.run("sleep", {"ms": 1}, timeout=30)["slept_ms"] == 1


# ---------------------------------------------------------------------------- transient crash loop


def test_transient_crash_loop_stops_at_budget_and_recovers_after_refill(serve, tmp_path):
    marker = tmp_path / "broken"
    marker.write_text("crash on load while this file exists")
    config = write_config(tmp_path, f"""
[server]
keep_going = true

[pools.loop]
handler = "{TH}:CrashOnLoadWhileMarker"
devices = "cpu:1"
max_restarts = 1
restart_window = 15.0
restart_backoff = 0.05
restart_backoff_max = 0.5
config = {{ marker = {json.dumps(str(marker))} }}
""")
    server = serve(["--config", config], ready=False)
    c = server.client()
    w = poll_until(lambda: (s := slot(c, "loop"))["state"] == "failed" and s, WAIT, 0.05, "loop/0 failed")
    # The budget (1 restart) is spent: failed, transient, with a retry planned by the reconcile step.
    assert w["restarts"] == 1 and w["last_exit_reason"] == "exit code 9", w
    assert w["failure"]["permanent"] is False and w["failure"]["retry_in"] is not None
    assert pool_health(c, "loop")["status"] == "failed"
    log = server.log()
    assert "loop/0: failed (failure budget spent (2 failures within 15 s)" in log

    marker.unlink()  # the cause is gone: the refill brings the pool back without any operator action
    poll_until(lambda: slot(c, "loop")["state"] == "ready", WAIT, 0.1, "loop/0 ready after the refill")
    assert c.run("loop", {"n": 2}, timeout=30)["echo"] == {"n": 2}
    assert "loop/0: retrying after failure (failure budget refilled)" in server.log()


def test_transient_crash_loop_at_startup_exits_2_without_keep_going(tmp_path):
    marker = tmp_path / "broken"
    marker.write_text("x")
    config = write_config(tmp_path, f"""
[pools.loop]
handler = "{TH}:CrashOnLoadWhileMarker"
devices = "cpu:1"
max_restarts = 1
restart_backoff_max = 0.2
config = {{ marker = {json.dumps(str(marker))} }}
""")
    code, _, err, _ = serve_until_exit(["--config", config])
    assert code == 2 and "'loop'" in err.splitlines()[0] and "exit code 9" in err.splitlines()[0], err
    assert err.count("started incarnation") == 2, err


def test_a_load_that_raises_is_transient_and_its_traceback_is_logged_once(tmp_path):
    config = write_config(tmp_path, f"""
[pools.doomed]
handler = "{TH}:FailLoad"
devices = "cpu:1"
max_restarts = 2
restart_backoff_max = 0.2
""")
    code, _, err, _ = serve_until_exit(["--config", config])
    first = err.splitlines()[0]
    assert code == 2 and "'doomed'" in first and "load_failed: RuntimeError: weights file" in first, err
    assert err.count("started incarnation") == 3, err  # transient: restarted within its budget
    assert err.count("Traceback") == 1 and err.count("the same traceback as the attempt before") == 2, err


# ---------------------------------------------------------------------------- malformed worker frames


def test_garbage_from_a_worker_ends_its_incarnation_and_its_jobs_are_retried(serve, tmp_path):
    server = serve(["--handler", f"{TH}:GarbageOnce", "--devices", "cpu:1", "--pool", "g"])
    c = server.client()
    pid = slot(c, "g")["pids"][0]
    marker = str(tmp_path / "garbage-sent")
    go = tmp_path / "go"
    garbage = c.submit("g", {"garbage": True, "marker": marker, "go": str(go)})
    behind = c.submit("g", {"hang_while": marker})
    poll_until(lambda: slot(c, "g")["inflight"] == 2, WAIT, 0.05, "both jobs in flight on g/0")
    go.write_text("send the garbage now")
    out_a, out_b = garbage.result(WAIT), behind.result(WAIT)
    assert out_a["first_attempt"] is False and open(marker).read() == str(pid)
    assert garbage.meta["attempts"] == 2 and behind.meta["attempts"] == 2
    assert out_a["pid"] != pid and out_b["pid"] != pid
    log = server.log()
    assert "g/0: malformed message from worker: msgpack ext types are not accepted" in log
    w = slot(c, "g")
    assert w["restarts"] == 1 and "malformed message from worker" in w["last_exit_reason"]
    assert c.run("g", {"n": 3}, timeout=30)["echo"] == {"n": 3}
    assert c.status()["state"] == "running"


# ---------------------------------------------------------------------------- the policy alone


def test_decide_permanent_at_once_transient_with_backoff_then_failed_until_refill():
    from types import SimpleNamespace

    from orchestrator.config import PoolConfig
    from orchestrator.fleet.restarts import FailureBudget, decide

    cfg = PoolConfig(name="p", max_restarts=2, restart_window=100.0, restart_backoff=1.0,
                     restart_backoff_max=3.0)
    slot = SimpleNamespace(ready_at=None, consecutive_failures=0, budget=FailureBudget())
    assert decide(slot, cfg, "model_not_found", 0.0).permanent is True
    assert slot.consecutive_failures == 0  # a permanent failure spends no budget
    delays = [decide(slot, cfg, code, t).restart_in for code, t in (("load_failed", 0.0), (None, 1.0))]
    assert delays == [1.0, 2.0]
    spent = decide(slot, cfg, None, 2.0)
    assert spent.restart_in is None and not spent.permanent and spent.retry_at == 101.0
