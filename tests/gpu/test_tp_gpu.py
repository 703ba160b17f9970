"""Tensor-parallel generate groups over NCCL: real `orchestrator serve` processes and a random Llama of about
0.85B parameters (float32). TP=2 gives TP=1's greedy tokens; an injected asymmetric batch fails fast with
`collective_mismatch` naming the rank, then the group restarts and serves; a rank killed mid-generation
restarts the group and the job is retried to the same tokens. With 4 GPUs, a TP=2 pool and two TP=1
replicas serve at once. The guard's cost per step is measured by scripts/bench_guard.py."""
from __future__ import annotations

import json
import os
import signal
import textwrap

import pytest

from orchestrator.client.sync import RequestError
from tests.conftest import Server, poll_until
from tests.gpu.llama import build_llama, prompts

pytestmark = [pytest.mark.gpu(gpus=2), pytest.mark.slow]

SKEW = 29  # the prompt length whose forward rank 1 skews (no other prompt here has it)
VOCAB = 32000
NEW_TOKENS = 32
MISMATCH_S = 10.0  # a mismatch must be reported within this (the guard timeout is 5 s)
START_S = 600.0


def _pool(name: str, handler: str, devices: str, tp: int, config: dict) -> str:
    return textwrap.dedent(f"""
        [pools.{name}]
        handler = "{handler}"
        devices = "{devices}"
        tp = {tp}
        retries = 2
        max_restarts = 20
        guard_timeout = 5.0
        config = {_inline(config)}
    """)


def _inline(value) -> str:
    """A TOML inline value (a JSON string or number is one)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_inline(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, on_gpu):
    """The model, the prompts, the pools' TOML and the TP=1 reference tokens (a server of its own on GPU 0)."""
    work = tmp_path_factory.mktemp("tp")
    layers, hidden = (16, 2048) if on_gpu else (2, 128)
    model = build_llama(work / "llama", layers, hidden, VOCAB if on_gpu else 1000)
    vocab = VOCAB if on_gpu else 1000
    gen = {"model": model, "dtype": "float32", "cb": {"num_blocks": 512 if on_gpu else 64}}
    tp2 = _pool("tp2", "tests.tp_handlers:SkewedGenerateHandler", "0,1" if on_gpu else "cpu:2", 2,
                {**gen, "skew_tokens": SKEW})
    tp1 = _pool("tp1", "generate", "0" if on_gpu else "cpu:1", 1, gen)
    batch = prompts(8, vocab, avoid_length=SKEW)
    with _server(work, "tp1", tp1) as s:
        reference = _generate(s, "tp1", batch)
    return {"work": work, "gen": gen, "tp2": tp2, "batch": batch, "reference": reference}


@pytest.fixture(scope="module")
def tp2(setup):
    with _server(setup["work"], "tp2", setup["tp2"]) as s:
        yield s


class _server:
    """A module's `Server` on a TOML config, stopped on exit."""

    def __init__(self, work, name: str, toml: str):
        (work / f"{name}.toml").write_text(toml)
        self.server = Server(work, ["--config", str(work / f"{name}.toml")])

    def __enter__(self) -> Server:
        return self.server.start(timeout=START_S)

    def __exit__(self, *exc) -> None:
        self.server.close()


def _generate(server: Server, pool: str, batch: list, new_tokens: int = NEW_TOKENS, retries=None) -> list:
    client = server.client(timeout=60)
    handles = [client.submit(pool, {"input_ids": p, "max_new_tokens": new_tokens, "eos_token_id": []},
                             retries=retries) for p in batch]
    return [h.result(START_S)["token_ids"] for h in handles]


def _group(server: Server, pool: str) -> dict:
    return server.workers(pool)[0]


def _restarted(server: Server, pool: str, before: dict) -> dict:
    """The group once it serves again with every rank a new process."""
    def fresh():
        g = _group(server, pool)
        new = len(g["pids"]) == len(before["pids"]) and not set(g["pids"]) & set(before["pids"])
        return g if g["state"] in ("ready", "busy") and g["restarts"] > before["restarts"] and new else None
    return poll_until(fresh, START_S, interval=0.1, what=f"{pool} restarted with new pids")


def test_tp2_gives_tp1_greedy_tokens(setup, tp2):
    assert _generate(tp2, "tp2", setup["batch"]) == setup["reference"]


def _guard_steps(server: Server) -> list:
    return [(r["guard"] or {}).get("steps", 0) for r in _group(server, "tp2")["ranks"]]


def test_both_ranks_guard_the_same_steps(setup, tp2):
    before = _guard_steps(tp2)[0]
    _generate(tp2, "tp2", setup["batch"], new_tokens=64)
    # Guard stats ride every few heartbeats: wait until both ranks report the steps just run, and agree.
    poll_until(lambda: (s := _guard_steps(tp2))[0] >= before + 64 and s[0] == s[1], 30, interval=0.5,
               what="both ranks' guard totals to count the job's steps and agree")


def test_asymmetric_batch_fails_fast_naming_the_rank_then_the_group_serves(setup, tp2):
    before = _group(tp2, "tp2")
    skewed = [[1] + setup["batch"][0][1:2] * (SKEW - 1)]
    client = tp2.client(timeout=60)
    job = client.submit("tp2", {"input_ids": skewed[0], "max_new_tokens": NEW_TOKENS, "eos_token_id": []},
                        retries=0)
    with pytest.raises(RequestError) as err:
        job.result(MISMATCH_S)
    assert err.value.code == "collective_mismatch"
    assert "rank(s) [1] differ" in err.value.message
    _restarted(tp2, "tp2", before)
    assert _generate(tp2, "tp2", setup["batch"][:1]) == setup["reference"][:1]


def test_rank_killed_mid_generation_restarts_the_group_and_retries_the_job(setup, tp2):
    before = _group(tp2, "tp2")
    steps_before = _guard_steps(tp2)[0]
    client = tp2.client(timeout=60)
    handle = client.submit("tp2", {"input_ids": setup["batch"][1], "max_new_tokens": 1024, "eos_token_id": []})
    # Well inside the generation, not at its first step: the guard has counted some of its steps.
    poll_until(lambda: _guard_steps(tp2)[0] >= steps_before + 16, 120, interval=0.05,
               what="the job's first steps")
    os.kill(before["ranks"][1]["pid"], signal.SIGKILL)
    out = handle.result(START_S)["token_ids"]
    _restarted(tp2, "tp2", before)
    assert len(out) == 1024
    assert out[:NEW_TOKENS] == setup["reference"][1]


@pytest.mark.gpu(gpus=4)
def test_tp2_and_two_tp1_replicas_serve_at_once(setup, on_gpu):
    tp1x2 = _pool("tp1", "generate", "2,3" if on_gpu else "cpu:2", 1, setup["gen"])
    with _server(setup["work"], "mixed", setup["tp2"] + tp1x2) as s:
        client = s.client(timeout=60)
        jobs = [(pool, client.submit(pool, {"input_ids": p, "max_new_tokens": 64, "eos_token_id": []}))
                for p in setup["batch"] * 4 for pool in ("tp2", "tp1")]
        assert all(len(h.result(START_S)["token_ids"]) == 64 for _, h in jobs)
        assert _generate(s, "tp2", setup["batch"]) == setup["reference"]
        served = [w["name"] for w in s.workers("tp1") if w["completed"]]
        assert len(served) == 2, f"both TP=1 replicas should have served: {served}"
