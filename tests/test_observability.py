"""Observability: health that answers while every worker is busy,
hang versus long step, Prometheus metrics that match the client's own counts, logs (JSON lines,
worker tracebacks with the worker's id), and the `status` CLI.

Every test runs a real `orchestrator serve` with real worker processes and real sockets, and polls
with generous timeouts (the machine is shared); latencies are printed, never asserted.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.client.sync import RequestError
from orchestrator.config import PoolConfig
from orchestrator.fleet.pools import Pool
from orchestrator.fleet.slots import Slot
from orchestrator.states import SlotState as WS
from orchestrator.fleet.pools import pool_health
from tests.conftest import REPO, poll_until

LONG_MS = 600_000  # a job that never ends by itself within a test: cancelled, or killed at teardown
WORKER_KEYS = {"name", "state", "devices", "pids", "inflight", "capacity", "completed", "failed",
               "restarts", "last_exit_reason", "heartbeat_age", "step_age", "gpu_memory", "rss_bytes"}
# serve's stdout handshake stays plain text in every log format; everything else is a log line.
HANDSHAKE = ("endpoint: ", "pool ", "metrics: ")


# ---------------------------------------------------------------------------- helpers


def metrics_url(server) -> str:
    return poll_until(lambda: next((line.split()[1] for line in server.log().splitlines()
                                    if line.startswith("metrics: ")), None), 30, what="metrics url")


def scrape(url: str) -> dict:
    """{(name, frozenset(labels.items())): value} for every sample of the endpoint."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_until(url: str, predicate, what: str) -> dict:
    """Scrape until `predicate(samples)` holds (gauges refresh every 0.5 s); returns those samples."""
    def check():
        samples = scrape(url)
        return samples if predicate(samples) else None
    return poll_until(check, 30, interval=0.1, what=what)


def workers(client, pool: str) -> list:
    return client.status()["pools"][pool]["workers"]


def fill_all_credits(client, pool: str, ms: int) -> list:
    """Submit one job per credit of every worker; return once every worker is full and has reported
    (in a heartbeat) that its step is running."""
    jobs = [client.submit(pool, {"ms": ms}) for w in workers(client, pool) for _ in range(w["capacity"])]
    poll_until(lambda: all(w["state"] == "busy" and w["inflight"] == w["capacity"] and w["step_age"]
                           for w in workers(client, pool)), 30, what="every worker busy")
    return jobs


def timed_calls(fn, n: int) -> list:
    """Call fn() n times; returns (seconds, answer) per call. Every call must answer."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        answer = fn()
        out.append((time.perf_counter() - t0, answer))
    return out


def pct_ms(values: list, q: float) -> float:
    s = sorted(values)
    return 1000 * s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def slots_in(states: list) -> Pool:
    """A pool whose slots are in `states`, reached through allowed transitions only."""
    up = [WS.STARTING, WS.LOADING, WS.READY]
    path = {WS.READY: up, WS.BUSY: up + [WS.BUSY], WS.DRAINING: up + [WS.DRAINING],
            WS.LOADING: up[:2], WS.DEAD: [WS.STARTING, WS.DEAD],
            WS.RESTARTING: [WS.STARTING, WS.DEAD, WS.RESTARTING],
            WS.FAILED: [WS.STARTING, WS.DEAD, WS.FAILED], WS.STOPPED: []}
    pool = Pool(PoolConfig(name="p", handler="sleep", devices=f"cpu:{len(states)}"))
    for i, state in enumerate(states):
        slot = Slot(pool.slot_spec(i, []))
        for step in path[state]:
            slot.set_state(step)
        pool.slots[i] = slot
    return pool


# ---------------------------------------------------------------------------- health semantics


@pytest.mark.parametrize("states, expected", [
    ([WS.READY, WS.BUSY], "ready"),
    ([WS.READY, WS.DRAINING], "ready"),  # scale-down by choice is not a fault
    ([WS.READY, WS.STOPPED], "ready"),
    ([WS.BUSY, WS.DEAD], "degraded"),
    ([WS.READY, WS.RESTARTING], "degraded"),
    ([WS.READY, WS.FAILED], "degraded"),
    ([WS.READY, WS.LOADING], "degraded"),
    ([WS.DEAD, WS.RESTARTING], "unavailable"),
    ([WS.FAILED], "failed"),
    ([WS.DRAINING], "unavailable"),
])
def test_pool_health_follows_slot_states(states, expected):
    assert slots_in(states).health() == pool_health(states) == expected


# ---------------------------------------------------------------------------- health while busy


@pytest.mark.slow
def test_health_and_status_answer_while_every_worker_is_busy(serve):
    """Every worker runs a 10 s sleep job; 200 health and 200 status calls (two threads at once)
    all answer from coordinator state. Latency is printed for the record, not asserted."""
    server = serve(["--handler", "sleep", "--devices", "cpu:2"])
    client = server.client()
    jobs = fill_all_credits(client, "sleep", ms=10_000)
    results: dict = {}
    threads = [threading.Thread(target=lambda k=k, fn=fn: results.__setitem__(k, timed_calls(fn, 200)))
               for k, fn in (("health", server.client(timeout=30).health),
                             ("status", server.client(timeout=30).status))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results["health"]) == 200 and len(results["status"]) == 200
    for _, h in results["health"]:
        workers = h["pools"]["sleep"]["workers"]
        assert h["alive"] and set(workers) == {"sleep/0", "sleep/1"}
        assert all(w["heartbeat_age"] is not None and w["heartbeat_age"] < h["heartbeat_timeout"]
                   for w in workers.values())
    for _, st in results["status"]:
        assert [w["name"] for w in st["pools"]["sleep"]["workers"]] == ["sleep/0", "sleep/1"]
    # The first answers came while every worker was still in its 10 s step.
    first = results["health"][0][1]["pools"]["sleep"]["workers"]
    assert all(w["state"] == "busy" and w["step_age"] is not None for w in first.values())
    busy = sum(all(w["state"] == "busy" for w in h["pools"]["sleep"]["workers"].values())
               for _, h in results["health"])
    for kind, calls in results.items():
        secs = [s for s, _ in calls]
        print(f"\n{kind}: n={len(secs)} p50={pct_ms(secs, 50):.2f} ms p99={pct_ms(secs, 99):.2f} ms "
              f"max={max(secs) * 1000:.2f} ms mean={statistics.mean(secs) * 1000:.2f} ms")
    print(f"health answers with every worker busy: {busy}/200")
    assert all(j.result(timeout=60)["slept_ms"] == 10_000 for j in jobs)


# ---------------------------------------------------------------------------- hang vs long step


@pytest.mark.slow
def test_hung_worker_versus_long_step(serve):
    """A SIGSTOPped worker's heartbeat age grows until it is declared dead; a worker in a long step
    keeps a fresh heartbeat while its step age grows; health and the metrics tell them apart."""
    hb_timeout = 5.0
    server = serve(["--handler", "sleep", "--devices", "cpu:2", "--hb-timeout", str(hb_timeout),
                    "--max-restarts", "0", "--metrics-port", "0"])
    url = metrics_url(server)
    client = server.client()
    job = client.submit("sleep", {"ms": LONG_MS})
    busy = poll_until(lambda: next((w for w in workers(client, "sleep") if w["inflight"] == 1), None),
                      30, what="one worker running the long job")["name"]
    hung = next(w for w in workers(client, "sleep") if w["name"] != busy)
    assert hung["inflight"] == 0
    os.kill(hung["pids"][0], signal.SIGSTOP)
    answers = []  # health until the stopped worker is declared down

    def declared_down() -> bool:
        answers.append(client.health())
        return answers[-1]["pools"]["sleep"]["workers"][hung["name"]]["state"] in ("dead", "restarting",
                                                                                    "failed")

    poll_until(declared_down, 60, interval=0.1, what="the stopped worker declared dead")
    final = answers.pop()
    views = [a["pools"]["sleep"]["workers"] for a in answers]
    # From well past one heartbeat interval of silence (a beat sent just before the SIGSTOP may
    # still land) until it is declared dead:
    silent = [v for v in views if v[hung["name"]]["heartbeat_age"] > 1.0]
    assert len(silent) >= 2, f"expected several health answers while the worker was stopped: {views}"
    ages = [v[hung["name"]]["heartbeat_age"] for v in silent]
    assert ages == sorted(ages) and ages[-1] > ages[0]  # silent, and ever more so
    assert all(v[hung["name"]]["step_age"] is None for v in silent)  # idle: not in a long step
    assert all(v[busy]["state"] == "busy" for v in silent)
    assert all(v[busy]["heartbeat_age"] < hb_timeout for v in silent)  # alive...
    steps = [v[busy]["step_age"] for v in silent]
    # ...and its one step keeps running (a heartbeat re-bases the estimate by its transit time).
    assert all(b > a - 0.25 for a, b in zip(steps, steps[1:])) and steps[-1] > steps[0] + 0.5
    pool = final["pools"]["sleep"]
    assert pool["status"] == "degraded" and final["status"] == "degraded"
    assert "heartbeat" in pool["workers"][hung["name"]]["last_exit_reason"]
    assert pool["workers"][busy]["state"] == "busy"
    scrape_until(url, lambda s: sample(s, "orchestrator_worker_restarts_total", pool="sleep",
                                       worker=hung["name"]) == 1
                 and sample(s, "orchestrator_pool_health", pool="sleep", status="degraded") == 1
                 and sample(s, "orchestrator_worker_state", pool="sleep", worker=busy, state="busy") == 1,
                 what="metrics to show the restart and the degraded pool")
    job.cancel()
    with pytest.raises(RequestError) as e:
        job.result(timeout=30)
    assert e.value.code == "cancelled"


# ---------------------------------------------------------------------------- metrics


POOLS_TOML = """
[pools.sleep]
handler = "sleep"
devices = "cpu:2"

[pools.echo]
handler = "echo"
devices = "cpu:1"
"""


@pytest.mark.slow
def test_metrics_match_the_clients_counts(serve, tmp_path):
    config = tmp_path / "server.toml"
    config.write_text(POOLS_TOML)
    server = serve(["--config", str(config), "--metrics-port", "0"])
    url = metrics_url(server)
    client = server.client()
    # Phase 1: short jobs, some invalid; the client counts outcomes itself.
    handles = [client.submit("sleep", {"ms": 20}) for _ in range(10)]
    handles += [client.submit("sleep", {"ms": "not a number"}) for _ in range(3)]
    done = failed = 0
    for h in handles:
        try:
            h.result(timeout=60)
            done += 1
        except RequestError as e:
            assert e.code == "invalid_input"
            failed += 1
    assert (done, failed) == (10, 3)

    def outcomes_match(s: dict) -> bool:
        return (sample(s, "orchestrator_jobs_total", pool="sleep", outcome="done") == done
                and sample(s, "orchestrator_jobs_total", pool="sleep", outcome="failed") == failed
                and sample(s, "orchestrator_job_errors_total", pool="sleep", code="invalid_input") == failed)

    s = scrape_until(url, lambda s: outcomes_match(s) and sample(
        s, "orchestrator_jobs_accepted_total", pool="sleep") == len(handles), what="phase 1 counts")
    assert sample(s, "orchestrator_job_latency_seconds_count", pool="sleep") == done
    assert sample(s, "orchestrator_job_run_seconds_count", pool="sleep") == done
    assert sample(s, "orchestrator_job_queue_wait_seconds_count", pool="sleep") == len(handles)
    # Phase 2: scrape during a run: 4 jobs on the workers' 4 credits, 2 more queued behind them.
    long_jobs = [client.submit("sleep", {"ms": LONG_MS}) for _ in range(6)]

    def running(s: dict) -> bool:
        return (sample(s, "orchestrator_jobs_accepted_total", pool="sleep") == len(handles) + 6
                and sample(s, "orchestrator_jobs_inflight", pool="sleep") == 4
                and sample(s, "orchestrator_queue_depth", pool="sleep") == 2
                and all(sample(s, "orchestrator_worker_state", pool="sleep", worker=f"sleep/{i}",
                               state="busy") == 1 for i in range(2)))

    s = scrape_until(url, running, what="the run in the metrics")
    assert outcomes_match(s)  # nothing of the long run has ended: the counts still match the client's
    assert all(sample(s, "orchestrator_worker_heartbeat_age_seconds", pool="sleep", worker=f"sleep/{i}") < 5
               for i in range(2))
    for j in long_jobs:
        j.cancel()
    scrape_until(url, lambda s: sample(s, "orchestrator_jobs_total", pool="sleep", outcome="cancelled") == 6
                 and sample(s, "orchestrator_jobs_inflight", pool="sleep") == 0
                 and sample(s, "orchestrator_queue_depth", pool="sleep") == 0, what="cancels counted")
    # Generate-style results: tokens from usage.completion_tokens; time to first token for streams.
    usage = {"usage": {"completion_tokens": 7}}
    assert [client.submit("echo", usage, stream=True).result(timeout=30) for _ in range(3)] == [usage] * 3
    assert client.run("echo", usage, timeout=30) == usage
    scrape_until(url, lambda s: sample(s, "orchestrator_generated_tokens_total", pool="echo") == 28
                 and sample(s, "orchestrator_time_to_first_token_seconds_count", pool="echo") == 3,
                 what="tokens and time to first token")


def test_metrics_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "orchestrator", "serve", "--address", "tcp://127.0.0.1:0",
                            "--handler", "echo", "--devices", "cpu:1", "--metrics-port", str(port)],
                           capture_output=True, text=True, timeout=120, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in r.stderr


# ---------------------------------------------------------------------------- logs


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_handler_traceback_reaches_the_server_log_with_the_worker_id(serve, log_format):
    server = serve(["--handler", "fail", "--devices", "cpu:1", "--log-format", log_format])
    with pytest.raises(RequestError) as e:
        server.client().run("fail", "marker-6c1f", timeout=30)
    assert e.value.code == "handler_error"
    wanted = ("Traceback (most recent call last):",
              "RuntimeError: fail handler raised on purpose: 'marker-6c1f'")

    def worker_lines() -> list:
        text = server.log()
        complete = text[:text.rfind("\n") + 1]  # serve may be mid-way through writing its last line
        lines = [line for line in complete.splitlines() if not line.startswith(HANDSHAKE)]
        if log_format == "text":
            return [line.split("[fail/0] ", 1)[1] for line in lines if "[fail/0] " in line]
        return [entry["msg"] for entry in map(json.loads, lines) if entry["wid"] == "fail/0"]

    def traceback_logged():
        lines = worker_lines()
        return lines if all(w in lines for w in wanted) else None

    lines = poll_until(traceback_logged, 30, what="the handler's traceback in the server log")
    assert lines.index(wanted[0]) < lines.index(wanted[1])


def test_json_log_format_gives_json_lines_with_worker_and_pool(serve):
    server = serve(["--handler", "sleep", "--devices", "cpu:2", "--log-format", "json"])
    server.client().run("sleep", {"ms": 1}, timeout=30)
    server.client().scale("sleep", 1)
    poll_until(lambda: "sleep/1: stopped" in server.log(), 30, what="the scale-down logged")
    server.terminate()
    lines = server.log().splitlines()
    handshake = [line for line in lines if line.startswith(HANDSHAKE)]
    assert handshake[0].startswith("endpoint: tcp://127.0.0.1:")
    entries = [json.loads(line) for line in lines if not line.startswith(HANDSHAKE)]  # raises if not JSON
    assert len(entries) > 5
    for entry in entries:
        assert {"ts", "level", "logger", "wid", "pool", "msg"} <= entry.keys(), entry
    by_worker = {e["wid"] for e in entries if e["pool"] == "sleep"}
    assert {"sleep/0", "sleep/1"} <= by_worker
    assert any(e["logger"] == "worker" and e["wid"] == "sleep/1" and "ready" in e["msg"] for e in entries)
    assert any(e["logger"] == "orchestrator.supervisor" and e["wid"] == "sleep/1" and "stopped" in e["msg"]
               for e in entries)


# ---------------------------------------------------------------------------- status


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})


def test_status_counts_and_cli_table(serve):
    server = serve(["--handler", "sleep", "--devices", "cpu:2"])
    client = server.client()
    for _ in range(4):
        client.run("sleep", {"ms": 1}, timeout=30)
    with pytest.raises(RequestError):
        client.run("sleep", {"ms": "x"}, timeout=30)
    st = client.status()
    pool = st["pools"]["sleep"]
    assert (pool["completed"], pool["failed"], pool["queue_depth"], pool["inflight"]) == (4, 1, 0, 0)
    assert pool["throughput_1m"] > 0
    assert [w["name"] for w in pool["workers"]] == ["sleep/0", "sleep/1"]
    for w in pool["workers"]:
        assert WORKER_KEYS <= w.keys()
        assert w["state"] == "ready" and w["devices"] and len(w["pids"]) == 1 and w["capacity"] == 2
    assert sum(w["completed"] for w in pool["workers"]) == 4
    assert sum(w["failed"] for w in pool["workers"]) == 1
    poll_until(lambda: all(w["rss_bytes"] for w in workers(client, "sleep")), 30, what="worker stats")

    table = run_cli("status", "--address", server.address)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line.strip()}
    assert rows["WORKER"][:4] == ["WORKER", "STATE", "DEVICES", "PIDS"]
    for w in pool["workers"]:
        assert rows[w["name"]][1:4] == ["ready", ",".join(w["devices"]), str(w["pids"][0])]
    assert rows["sleep"][1:9] == ["sleep", "1", "ready", "2", "0", "0", "4", "1"]

    raw = run_cli("status", "--json", "--address", server.address)
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout)["pools"]["sleep"]["completed"] == 4


def test_status_watch_redraws(serve, tmp_path):
    server = serve(["--handler", "echo", "--devices", "cpu:1"])
    out_path = tmp_path / "watch.out"
    with open(out_path, "w") as out:
        watch = subprocess.Popen([sys.executable, "-m", "orchestrator", "status", "--watch", "0.2",
                                  "--address", server.address], stdout=out, stderr=subprocess.STDOUT,
                                 cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
        try:
            def complete_frames():
                frames = out_path.read_text().split("\x1b[2J\x1b[H")[1:]
                return frames[:-1] if len(frames) >= 3 else None  # the last may be half written

            frames = poll_until(complete_frames, 60, what="three redraws")
        finally:
            watch.send_signal(signal.SIGINT)
            watch.wait(30)
    for frame in frames:  # each a full table with the worker's row
        assert any(line.startswith("echo/0 ") and " ready " in line for line in frame.splitlines()), frame
