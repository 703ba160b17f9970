"""Tensor-parallel groups on CPU: gloo, 2-rank groups, real `orchestrator serve` processes.

Most tests share one server (module fixture) with two pools: `tp`, a TP=2 group running the all-reduce test
handler (tests/tp_handlers.py), and `echo`, which must keep serving whatever happens to the group. Each
test starts by waiting for the group to be ready, so the tests do not depend on their order.
"""
from __future__ import annotations

import json
import os
import signal
import textwrap
import threading
import time

import pytest

from orchestrator.client.sync import RequestError
from tests.conftest import REPO, Server, poll_until

pytestmark = pytest.mark.slow

START_S = 120.0  # a TP group imports torch twice and rendezvouses: slow on a loaded 2-core machine
RESTART_S = 120.0


def _toml(once_dir) -> str:
    return textwrap.dedent(f"""
        [pools.tp]
        handler = "tests.tp_handlers:AllReduceHandler"
        devices = "cpu:2"
        tp = 2
        retries = 2
        max_restarts = 100
        guard_timeout = 5.0
        config = {{ mismatch_on = "poison", once_dir = "{once_dir}" }}

        [pools.echo]
        handler = "echo"
        devices = "cpu:1"
    """)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    (tmp / "once").mkdir()
    config = tmp / "serve.toml"
    config.write_text(_toml(tmp / "once"))
    s = Server(tmp, ["--config", str(config)])
    try:
        s.start(timeout=START_S)
        yield s
    finally:
        s.close()


def group(server: Server) -> dict:
    return server.workers("tp")[0]


def ready_group(server: Server) -> dict:
    """Wait until the TP group serves with both ranks alive; returns its status view."""
    def ready():
        g = group(server)
        return g if g["state"] in ("ready", "busy") and len(g["pids"]) == 2 else None
    return poll_until(ready, RESTART_S, 0.1, "the TP group to be ready")


def down_reasons(server: Server, since: int) -> str:
    """The supervisor's "down:" lines for the TP group logged after offset `since` of the server log."""
    return "\n".join(line for line in server.log()[since:].splitlines() if "tp/0: down:" in line)


def restarted(server: Server, before: dict) -> dict:
    """Wait until the group came back as a new incarnation: more restarts and two new pids."""
    def back():
        g = ready_group(server)
        return g if g["restarts"] > before["restarts"] and not set(g["pids"]) & set(before["pids"]) else None
    return poll_until(back, RESTART_S, 0.1, "the TP group to restart with new pids")


# ----------------------------------------------------------------------------------- normal runs


def test_allreduce_results_are_correct_and_guard_cost_is_reported(server):
    g = ready_group(server)
    c = server.client()
    handles = [(v, c.submit("tp", {"value": v})) for v in range(-5, 25)]
    for v, h in handles:
        assert h.result(60) == {"sum": 3.0 * v, "world_size": 2}  # (rank0 + 1) * v + (rank1 + 1) * v
    assert group(server)["pids"] == g["pids"]  # nothing restarted

    def guard_stats():  # heartbeats carry them every few beats, so a rank's figures may lag a little
        stats = [r["guard"] for r in group(server)["ranks"]]
        if all(s and s["mean_us"] for s in stats) and stats[0]["steps"] == stats[1]["steps"] >= 4:
            return stats
        return None
    # 30 jobs in batches of at most 8: at least 4 guarded steps, the same number on both ranks.
    stats = poll_until(guard_stats, 30, 0.2, "both ranks to report the same guarded steps")
    print(f"guard cost per step (CPU, gloo, loaded machine): {stats}")


def test_all_ranks_without_a_batch_skip_together_and_serving_goes_on(server):
    g = ready_group(server)
    c = server.client()
    assert c.run("tp", {"value": 1, "skip_on_ranks": [0, 1]}, timeout=60) == {"skipped": True}
    assert c.run("tp", {"value": 2}, timeout=60)["sum"] == 6.0
    after = group(server)
    assert after["restarts"] == g["restarts"] and after["pids"] == g["pids"]


def test_invalid_input_fails_the_job_on_every_rank_alike_without_a_restart(server):
    g = ready_group(server)
    c = server.client()
    with pytest.raises(RequestError) as err:
        c.run("tp", {"value": "x"}, timeout=60)
    assert err.value.code == "invalid_input"
    assert c.run("tp", {"value": 4}, timeout=60)["sum"] == 12.0
    assert group(server)["pids"] == g["pids"]


# ----------------------------------------------------------------------------------- the guard


def test_some_ranks_without_a_batch_all_raise_and_the_group_restarts(server):
    g = ready_group(server)
    c = server.client()
    start = time.monotonic()
    with pytest.raises(RequestError) as err:
        c.submit("tp", {"value": 1, "skip_on_ranks": [1]}, retries=0).result(60)
    print(f"partial no-batch -> collective_mismatch reply in {time.monotonic() - start:.3f} s")
    assert err.value.code == "collective_mismatch"
    assert "no batch on some ranks only" in err.value.message
    assert "rank(s) [1] differ" in err.value.message
    assert "rank 1: step=" in err.value.message and "no batch" in err.value.message
    restarted(server, g)
    assert c.run("tp", {"value": 3}, timeout=60)["sum"] == 9.0


def test_asymmetric_batch_restarts_the_group_and_the_retry_succeeds(server, record_property):
    g = ready_group(server)
    c = server.client()
    since = len(server.log())
    start = time.monotonic()
    h = c.submit("tp", {"value": 7, "poison": "once"})
    result = h.result(RESTART_S)
    assert result == {"sum": 21.0, "world_size": 2}
    record_property("mismatch_then_retry_s", round(time.monotonic() - start, 3))
    restarted(server, g)
    reasons = down_reasons(server, since)
    assert "collective_mismatch" in reasons and "fingerprints differ" in reasons
    assert "rank(s) [1] differ" in reasons


def test_asymmetric_batch_fails_with_a_clear_error_once_retries_are_spent(server):
    g = ready_group(server)
    c = server.client()
    with pytest.raises(RequestError) as err:
        c.submit("tp", {"value": 1, "poison": True}, retries=1).result(2 * RESTART_S)
    assert err.value.code == "collective_mismatch"
    assert "job failed on 2 worker(s)" in err.value.message
    assert err.value.message.count("rank(s) [1] differ") == 2  # one reason per attempt, each naming rank 1
    restarted(server, g)
    assert c.run("tp", {"value": 5}, timeout=60)["sum"] == 15.0


# ----------------------------------------------------------------------------------- rank failures


class EchoProbe:
    """Calls the echo pool in a loop on its own thread, recording when each call succeeded and any error."""

    def __init__(self, server: Server):
        self.client = server.client()
        self.ok: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                assert self.client.run("echo", {"i": i}, timeout=30) == {"i": i}
                self.ok.append(time.monotonic())
            except Exception as e:  # recorded, asserted by the test
                self.errors.append(repr(e))
            i += 1

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(60)


def test_sigkill_of_rank_1_in_a_busy_group_restarts_the_group_retries_jobs_and_echo_keeps_serving(server):
    g = ready_group(server)
    c = server.client()
    since = len(server.log())
    with EchoProbe(server) as echo:
        first = [(v, c.submit("tp", {"value": v})) for v in range(40)]
        poll_until(lambda: any(h.done() for _, h in first), 60, 0.01, "the group to be busy")
        killed_at = time.monotonic()
        os.kill(g["ranks"][1]["pid"], signal.SIGKILL)
        more = [(v, c.submit("tp", {"value": v})) for v in range(100, 120)]
        for v, h in first + more:
            assert h.result(RESTART_S)["sum"] == 3.0 * v  # in-flight jobs were retried on the new group
        restarted(server, g)
        poll_until(lambda: echo.ok and echo.ok[-1] > killed_at, 60, 0.05, "echo to answer after the kill")
    assert not echo.errors
    assert any(t > killed_at for t in echo.ok)
    reasons = down_reasons(server, since)
    assert "signal 9" in reasons or "all-reduce failed" in reasons or "lost" in reasons, reasons


def test_sigstop_of_rank_1_is_detected_and_the_group_restarts(server):
    g = ready_group(server)
    c = server.client()
    stopped = g["ranks"][1]["pid"]
    since = len(server.log())
    os.kill(stopped, signal.SIGSTOP)
    try:
        h = c.submit("tp", {"value": 2})  # rank 0 broadcasts it and waits at the guard for rank 1
        restarted(server, g)
        assert h.result(RESTART_S)["sum"] == 6.0
        reasons = down_reasons(server, since)
        assert "heartbeat lost" in reasons or "did not all arrive" in reasons, reasons
    finally:
        try:
            os.kill(stopped, signal.SIGCONT)  # normally already killed by the coordinator
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------------- stop, guard timeout


def test_graceful_stop_reaches_the_followers_through_rank_0(serve):
    s = serve(["--pool", "tp", "--handler", "tests.tp_handlers:AllReduceHandler", "--devices", "cpu:2",
               "--tp", "2"], timeout=START_S)
    assert s.client().run("tp", {"value": 1}, timeout=60)["sum"] == 3.0
    assert s.terminate(timeout=120) == 0
    log = s.log()
    assert "rank 1: stopping: received SIGTERM" in log  # rank 0's stop plan, not the follower's own timeout
    assert "no stop plan from rank 0" not in log
    assert log.count("stopped: received SIGTERM") >= 2


def test_guard_timeout_must_be_positive():
    from orchestrator.config import PoolConfig, ServerConfig, validate

    with pytest.raises(ValueError, match="guard_timeout must be > 0"):
        validate(ServerConfig(pools=[PoolConfig(name="tp", tp=2, guard_timeout=0)]))


# ----------------------------------------------------------------------------------- TP generation


def _accelerate_path() -> str | None:
    try:
        import accelerate
    except ImportError:
        return None
    return os.path.dirname(os.path.dirname(accelerate.__file__))


@pytest.mark.skipif(_accelerate_path() is None, reason=(
    "transformers 5.23 refuses to load a model with tp_plan on CPU without `accelerate`: ValueError: Using a "
    "`device_map`, `tp_plan`, `torch.device` context manager or setting `torch.set_default_device(device)` "
    "requires `accelerate`. (With accelerate installed, TP=2 on CPU with gloo works and matches TP=1.)"))
def test_tp2_generate_on_cpu_matches_tp1_and_recovers_from_a_mismatch_and_a_dead_rank(serve, tmp_path):
    from tests.model_fixtures import make_tiny_llama

    model = make_tiny_llama(tmp_path / "llama")
    env = {"PYTHONPATH": os.pathsep.join([REPO, _accelerate_path()])}
    prompts = [[101, 2000, 2001, 2002], [101, 5, 6], [101, 7, 8, 9, 10]]
    greedy = {"max_new_tokens": 8, "eos_token_id": []}

    ref = serve(["--handler", "generate", "--model", model, "--devices", "cpu:1"], env=env, timeout=START_S)
    rc = ref.client()
    expected = [rc.run("generate", {"input_ids": p, **greedy}, timeout=120)["token_ids"] for p in prompts]
    ref.terminate(timeout=120)

    config = json.dumps({"model": model, "skew_tokens": 13})  # a 13-token forward differs on rank 1
    s = serve(["--pool", "generate", "--handler", "tests.tp_handlers:SkewedGenerateHandler",
               "--handler-config", config, "--devices", "cpu:2", "--tp", "2"], env=env, timeout=START_S)
    c = s.client()
    handles = [c.submit("generate", {"input_ids": p, **greedy}) for p in prompts]
    assert [h.result(120)["token_ids"] for h in handles] == expected  # TP=2 greedy == TP=1 greedy
    with pytest.raises(RequestError) as err:
        c.run("generate", {"input_ids": [101, 5], "temperature": 0.7}, timeout=60)
    assert err.value.code == "invalid_input" and "tp=2" in err.value.message

    def guard_stats():  # every forward guarded on both ranks: at least one per generated token
        g = [r["guard"] for r in s.workers("generate")[0]["ranks"]]
        return g if all(g) and g[0]["steps"] == g[1]["steps"] >= 8 else None
    stats = poll_until(guard_stats, 30, 0.2, "the same guarded forwards on both generate ranks")
    print(f"TP=2 generate guard cost: {stats}")

    # An injected asymmetric batch inside the CB engine: the forward hook stops both ranks, the group restarts.
    g = s.workers("generate")[0]
    with pytest.raises(RequestError) as err:
        c.submit("generate", {"input_ids": list(range(101, 114)), **greedy}, retries=0).result(120)
    assert err.value.code == "collective_mismatch" and "rank(s) [1] differ" in err.value.message
    g = poll_until(lambda: _restarted_view(s, "generate", g), RESTART_S, 0.1, "generate group restart")
    assert c.run("generate", {"input_ids": prompts[0], **greedy}, timeout=120)["token_ids"] == expected[0]

    # SIGKILL rank 1 mid-generation: the group restarts and the job is retried to the same greedy output.
    long = c.submit("generate", {"input_ids": prompts[1], "max_new_tokens": 200, "eos_token_id": []})
    poll_until(lambda: s.workers("generate")[0]["step_age"] is not None, 60, 0.01, "generation to start")
    os.kill(g["ranks"][1]["pid"], signal.SIGKILL)
    out = long.result(2 * RESTART_S)
    assert out["token_ids"][:8] == expected[1] and len(out["token_ids"]) == 200
    poll_until(lambda: _restarted_view(s, "generate", g), RESTART_S, 0.1, "generate group restart after kill")


def _restarted_view(server: Server, pool: str, before: dict) -> dict | None:
    w = server.workers(pool)[0]
    new = w["state"] in ("ready", "busy") and len(w["pids"]) == 2 and not set(w["pids"]) & set(before["pids"])
    return w if new and w["restarts"] > before["restarts"] else None


def test_a_plan_travels_as_msgpack_and_comes_back_equal():
    """The step plan's wire form (worker/tp.py send_plan/receive_plan move these bytes in a uint8 tensor):
    inputs of every msgpack type, arrays included, come back equal on the follower's side."""
    import numpy as np

    from protocol import NDArray
    from worker.tp import decode_plan, encode_plan

    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    plan = ("batch", [(1, {"x": 1.5, "s": "é", "b": b"\x00\xff", "l": [1, None]}, True), (2, array, False)])
    kind, body = decode_plan(encode_plan(plan))
    assert kind == "batch" and body[0] == plan[1][0]
    jid, got, stream = body[1]
    assert (jid, stream) == (2, False) and isinstance(got, NDArray)
    assert np.array_equal(got.to_numpy(), array)
    assert decode_plan(encode_plan(("stop", "drained"))) == ("stop", "drained")
    with pytest.raises(TypeError):
        encode_plan(("batch", [(3, object(), False)]))  # never pickled: an unknown type is refused
