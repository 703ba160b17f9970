"""The OpenAI-compatible HTTP gateway, through real `serve` processes and the official `openai` SDK.

Server `api`: a tiny Llama (`gen`) and MiniLM (`emb`). Server `edge`: a tiny Llama with a long context
(jobs of thousands of tokens last seconds, long enough to cancel, queue behind or time out), capacity 1
and a queue of 1, a pool that can never load (`broken`), an API key and a 5 s job timeout.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import httpx
import numpy as np
import openai
import psutil
import pytest

from orchestrator import RequestError, wait_ready
from tests.conftest import REPO, Server, poll_until
from tests.model_fixtures import make_tiny_llama

WAIT = 60.0
KEY = "test-key-123"
# Tokens: tens of seconds of work for the long-context tiny Llama (4,000 took 5-11 s on 2 cores), so such a
# job is always cancelled or timed out (5 s) first.
LONG = 8000


def _http_url(server: Server) -> str:
    def find():
        for line in server.log().splitlines():
            if line.startswith("http: "):
                return line.split()[1]
        return None
    return poll_until(find, WAIT, what="serve to print its http URL")


def _gateway_pids(server: Server) -> list[int]:
    try:
        kids = psutil.Process(server.proc.pid).children()
    except psutil.NoSuchProcess:
        return []
    pids = []
    for p in kids:
        try:
            if "orchestrator.http" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except psutil.Error:  # gone, or a zombie not yet reaped
            pass
    return pids


def _metric(url: str, name: str, **labels) -> float:
    text = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {KEY}"}, timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    d = tmp_path_factory.mktemp("http_api")
    llama = make_tiny_llama(d / "llama")
    cfg = d / "serve.toml"
    cfg.write_text(f'[pools.gen]\nhandler = "generate"\ndevices = "cpu:1"\nconfig = {{ model = "{llama}" }}\n'
                   f'[pools.emb]\nhandler = "embed"\ndevices = "cpu:1"\n[http]\nport = 0\n')
    server = Server(d, ["--config", str(cfg)]).start(timeout=WAIT)
    server.url = _http_url(server)
    yield server
    server.close()


@pytest.fixture(scope="module")
def sdk(api):
    with openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def _zmq_generate(api, inp: dict) -> dict:
    return api.client().run("gen", inp, timeout=WAIT)


# ---------------------------------------------------------------------------- the SDK, sync and async


def test_models_and_health(api, sdk):
    assert sorted(m.id for m in sdk.models.list()) == ["emb", "gen"]

    async def main():
        async with openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="unused") as client:
            return sorted([m.id async for m in client.models.list()])
    assert asyncio.run(main()) == ["emb", "gen"]
    r = httpx.get(api.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ready" and set(r.json()["pools"]) == {"gen", "emb"}


def test_completion_tokens_equal_the_zmq_result(api, sdk):
    prompt = "The quick brown fox"
    out = sdk.completions.create(model="gen", prompt=prompt, max_tokens=12, temperature=0)
    ref = _zmq_generate(api, {"prompt": prompt, "max_new_tokens": 12, "temperature": 0})
    choice = out.choices[0]
    assert choice.model_extra["token_ids"] == ref["token_ids"] and len(ref["token_ids"]) > 0
    assert choice.text == ref["text"] and choice.finish_reason == ref["finish_reason"]
    assert out.usage.completion_tokens == len(ref["token_ids"])
    assert out.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.created > 0


def test_async_completion_with_a_list_of_prompts(api):
    prompts = ["Hello there", "Once upon a time"]

    async def main():
        async with openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="unused") as client:
            return await client.completions.create(model="gen", prompt=prompts, max_tokens=6, temperature=0)
    out = asyncio.run(main())
    assert [c.index for c in out.choices] == [0, 1]
    for prompt, choice in zip(prompts, out.choices):
        ref = _zmq_generate(api, {"prompt": prompt, "max_new_tokens": 6, "temperature": 0})
        assert choice.model_extra["token_ids"] == ref["token_ids"] and choice.text == ref["text"]
    assert out.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in out.choices)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]


def test_streamed_chat_deltas_equal_the_final_text(api, sdk):
    whole = sdk.chat.completions.create(model="gen", messages=MESSAGES, max_tokens=10, temperature=0)
    ref = _zmq_generate(api, {"messages": MESSAGES, "max_new_tokens": 10, "temperature": 0})
    assert whole.choices[0].message.content == ref["text"] and whole.choices[0].message.role == "assistant"
    assert whole.id.startswith("chatcmpl-") and whole.usage.total_tokens > 0

    stream = sdk.chat.completions.create(model="gen", messages=MESSAGES, max_tokens=10, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref["text"] and len(chunks) > 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref["finish_reason"]
    assert chunks[-1].usage.completion_tokens == len(ref["token_ids"])
    assert len({c.id for c in chunks}) == 1

    async def main():
        async with openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="unused") as client:
            s = await client.chat.completions.create(model="gen", messages=MESSAGES, max_tokens=10,
                                                     temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in s])
    assert asyncio.run(main()) == ref["text"]


def _cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_embeddings_match_the_zmq_result(api, sdk):
    texts = ["a sentence about cats", "another one, about the weather"]
    ref = api.client().run("emb", {"texts": texts}, timeout=WAIT)["embeddings"].to_numpy()
    as_base64 = sdk.embeddings.create(model="emb", input=texts)  # the SDK asks for base64 by default
    as_float = sdk.embeddings.create(model="emb", input=texts, encoding_format="float")
    for out in (as_base64, as_float):
        got = [d.embedding for d in sorted(out.data, key=lambda d: d.index)]
        assert _cosines(got, ref).min() >= 0.9999
        assert out.usage.prompt_tokens > 0
    raw = httpx.post(api.url + "/v1/embeddings", json={"model": "emb", "input": texts[0],
                                                       "encoding_format": "base64"}, timeout=WAIT).json()
    assert isinstance(raw["data"][0]["embedding"], str)  # the wire really carried base64

    async def main():
        async with openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="unused") as client:
            return await client.embeddings.create(model="emb", input=texts[1], encoding_format="float")
    one = asyncio.run(main())
    assert _cosines([one.data[0].embedding], ref[1:]).min() >= 0.9999


# ---------------------------------------------------------------------------- curl, errors


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_server_sent_events(api):
    body = {"model": "gen", "prompt": "Hello", "max_tokens": 8, "temperature": 0, "stream": True}
    out = subprocess.run(["curl", "-sN", api.url + "/v1/completions", "-H", "content-type: application/json",
                          "-d", json.dumps(body)], capture_output=True, text=True, timeout=WAIT)
    events = [line[len("data: "):] for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    ref = _zmq_generate(api, {"prompt": "Hello", "max_new_tokens": 8, "temperature": 0})
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == ref["finish_reason"]


@pytest.mark.parametrize("body, status, code", [
    ({"model": "gen", "prompt": "x", "n": 2}, 400, "bad_request"),
    ({"model": "gen", "prompt": "x", "temperature": -1}, 400, "invalid_input"),
    ({"model": "gen"}, 400, "bad_request"),
    ({"model": "emb", "prompt": "x"}, 400, "bad_request"),
    ({"model": "nope", "prompt": "x"}, 404, "unknown_pool"),
])
def test_error_statuses(api, body, status, code):
    r = httpx.post(api.url + "/v1/completions", json=body, timeout=WAIT)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]


def test_unknown_route_and_method_are_client_errors(api):
    r = httpx.get(api.url + "/v1/nope", timeout=WAIT)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", r.text
    r = httpx.get(api.url + "/v1/completions", timeout=WAIT)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_error_statuses_reach_the_sdk_as_its_exceptions(api, sdk):
    with pytest.raises(openai.NotFoundError) as info:
        sdk.completions.create(model="nope", prompt="x")
    assert info.value.status_code == 404 and info.value.code == "unknown_pool"
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="gen", messages=MESSAGES, n=3)
    r = httpx.post(api.url + "/v1/completions", content=b"{not json", timeout=WAIT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    assert httpx.get(api.url + "/v1/nothing", timeout=WAIT).status_code == 404
    # The gateway and the coordinator still serve.
    assert sdk.completions.create(model="gen", prompt="x", max_tokens=2).choices[0].finish_reason


def test_metrics_are_the_coordinators_registry(api, sdk):
    before = _metric(api.url, "orchestrator_jobs_total", pool="gen", outcome="done")
    sdk.completions.create(model="gen", prompt="count me", max_tokens=2)
    assert _metric(api.url, "orchestrator_jobs_total", pool="gen", outcome="done") == before + 1


@pytest.mark.slow
def test_200_concurrent_streams_all_complete(api):
    async def one(client, i):
        s = await client.chat.completions.create(
            model="gen", messages=[{"role": "user", "content": f"number {i}"}], max_tokens=4, temperature=0,
            stream=True)
        chunks = [c async for c in s]
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    async def main():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(limits=limits, timeout=300) as http, \
                openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="unused", http_client=http,
                                   max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))
    before = _metric(api.url, "orchestrator_jobs_total", pool="gen", outcome="done")
    results = asyncio.run(main())
    assert len(results) == 200 and all(text and finish in ("stop", "length") for text, finish in results)
    assert _metric(api.url, "orchestrator_jobs_total", pool="gen", outcome="done") == before + 200


def test_gateway_is_restarted_after_it_dies(api, sdk):
    old = poll_until(lambda: _gateway_pids(api), WAIT, what="the gateway process")
    psutil.Process(old[0]).kill()
    poll_until(lambda: [p for p in _gateway_pids(api) if p not in old], WAIT, what="a new gateway")
    poll_until(lambda: not psutil.pid_exists(old[0]), WAIT, what="the killed gateway to be reaped")
    # Same port: the coordinator holds the listening socket across restarts.
    assert poll_until(lambda: _try_models(sdk), WAIT, what="the restarted gateway to answer") == ["emb", "gen"]
    assert "http gateway: pid" in api.log() and "restarting" in api.log()


def _try_models(sdk):
    try:
        return sorted(m.id for m in sdk.models.list())
    except openai.APIConnectionError:
        return None


# ---------------------------------------------------------------------------- edge: keys, overload, stop


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    d = tmp_path_factory.mktemp("http_edge")
    llama = make_tiny_llama(d / "llama")
    conf = json.loads((d / "llama" / "config.json").read_text())
    conf["max_position_embeddings"] = 16384  # RoPE needs no retraining: a long context for long jobs
    (d / "llama" / "config.json").write_text(json.dumps(conf))
    (d / "keys").write_text(f"\n{KEY}\n")
    cfg = d / "serve.toml"
    cfg.write_text(
        f'[pools.gen]\nhandler = "generate"\ndevices = "cpu:1"\ncapacity = 1\nqueue_size = 1\n'
        f'config = {{ model = "{llama}", max_new_tokens_cap = {LONG} }}\n'
        f'[pools.broken]\nhandler = "generate"\ndevices = "cpu:1"\nmax_restarts = 0\n'
        f'config = {{ model = "{d / "no-such-model"}" }}\n'
        f'[http]\nport = 0\napi_key_file = "{d / "keys"}"\njob_timeout = 5.0\n')
    # --keep-going: serve `gen` although `broken` fails its first load (else serve exits 2 at startup).
    server = Server(d, ["--config", str(cfg), "--keep-going"]).start(ready=False, timeout=WAIT)
    wait_ready(server.address, pools=["gen"], timeout=WAIT)
    server.url = _http_url(server)
    poll_until(lambda: server.workers("broken")[0]["state"] == "failed", WAIT, what="the broken pool to fail")
    yield server
    server.close()


def _auth(key: str = KEY) -> dict:
    return {"authorization": f"Bearer {key}"}


def _idle(server: Server) -> bool:
    return server.status()["jobs_unfinished"] == 0 and server.status()["pools"]["gen"]["inflight"] == 0


class _Stream:
    """A streamed completion held open while the test does other things; leaving the block disconnects."""

    def __init__(self, url: str, body: dict):
        self.url, self.body = url, body

    async def __aenter__(self):
        self.http = httpx.AsyncClient(timeout=WAIT)
        self.ctx = self.http.stream("POST", self.url + "/v1/completions", json=self.body, headers=_auth())
        self.response = await self.ctx.__aenter__()
        self.lines = self.response.aiter_lines()
        return self

    async def next_event(self) -> str:
        async for line in self.lines:
            if line.startswith("data: "):
                return line[len("data: "):]
        return ""

    async def __aexit__(self, *exc):
        await self.ctx.__aexit__(None, None, None)  # closes the connection: a disconnect
        await self.http.aclose()


def test_api_key_is_enforced(edge):
    assert httpx.get(edge.url + "/v1/models", timeout=WAIT).status_code == 401
    r = httpx.get(edge.url + "/v1/models", headers=_auth("wrong"), timeout=WAIT)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=edge.url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=edge.url + "/v1", api_key=KEY, max_retries=0)
    assert sorted(m.id for m in client.models.list()) == ["broken", "gen"]
    assert client.completions.create(model="gen", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_health_is_503_while_a_pool_is_not_ready_and_unavailable_is_503(edge):
    r = httpx.get(edge.url + "/health", timeout=WAIT)  # open to probes: no key needed
    assert r.status_code == 503
    assert r.json()["pools"]["broken"]["status"] == "failed" and r.json()["pools"]["gen"]["status"] == "ready"
    r = httpx.post(edge.url + "/v1/completions", json={"model": "broken", "prompt": "x"}, headers=_auth(),
                   timeout=WAIT)
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"


def test_disconnect_cancels_the_job(edge):
    poll_until(lambda: _idle(edge), WAIT, what="gen to be idle")
    before = edge.status()["pools"]["gen"]["cancelled"]
    metric_before = _metric(edge.url, "orchestrator_jobs_total", pool="gen", outcome="cancelled")

    async def main():
        async with _Stream(edge.url, {"model": "gen", "prompt": "go on", "max_tokens": LONG, "stream": True}) as s:
            assert s.response.status_code == 200
            first = json.loads(await s.next_event())
            assert first["choices"][0]["finish_reason"] is None
        # leaving the block closed the connection mid-stream
    asyncio.run(main())
    poll_until(lambda: edge.status()["pools"]["gen"]["cancelled"] == before + 1, WAIT,
               what="the job to end cancelled in status")
    assert _metric(edge.url, "orchestrator_jobs_total", pool="gen", outcome="cancelled") == metric_before + 1
    poll_until(lambda: _idle(edge), WAIT, what="gen to be idle again")


def test_full_queue_is_429(edge):
    """Capacity 1 and a queue of 1: one long job runs, one waits, the third is `overloaded`."""
    poll_until(lambda: _idle(edge), WAIT, what="gen to be idle")
    long = {"model": "gen", "prompt": "go on", "max_tokens": LONG, "stream": True}

    async def main():
        async with _Stream(edge.url, long) as running, httpx.AsyncClient(timeout=WAIT) as http, \
                openai.AsyncOpenAI(base_url=edge.url + "/v1", api_key=KEY, max_retries=0) as client:
            await running.next_event()  # it runs
            queued = asyncio.ensure_future(http.post(edge.url + "/v1/completions", json={**long, "stream": False},
                                                     headers=_auth()))
            await asyncio.to_thread(poll_until, lambda: edge.status()["pools"]["gen"]["queue_depth"] == 1,
                                    WAIT, 0.02, "the second job to queue")
            try:
                await client.completions.create(model="gen", prompt="x", max_tokens=2)
                third = None
            except openai.RateLimitError as e:
                third = e
            still_running = edge.status()["pools"]["gen"]["inflight"] == 1
            queued.cancel()  # its job stays queued, then runs into the 5 s job timeout
            return third, still_running

    third, still_running = asyncio.run(main())
    assert still_running, "the long job ended before the third request: the check proved nothing"
    assert third is not None and third.status_code == 429 and third.code == "overloaded"
    poll_until(lambda: _idle(edge), WAIT, what="gen to be idle again")


def test_job_timeout_is_504(edge):
    poll_until(lambda: _idle(edge), WAIT, what="gen to be idle")
    r = httpx.post(edge.url + "/v1/completions", json={"model": "gen", "prompt": "go on", "max_tokens": LONG},
                   headers=_auth(), timeout=WAIT)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text[:300]


def test_the_zmq_clients_run_gets_the_same_timeout_code(edge):
    """Client.run(timeout=S) ends with the server's `timeout` error (HTTP's 504), not with a client-side
    TimeoutError that raced it."""
    poll_until(lambda: _idle(edge), WAIT, what="gen to be idle")
    with pytest.raises(RequestError) as e:
        edge.client().run("gen", {"prompt": "go on", "max_new_tokens": LONG}, timeout=2.0)
    assert e.value.code == "timeout"
    poll_until(lambda: _idle(edge), WAIT, what="gen to be idle again")


def test_draining_is_503_then_the_gateway_stops_with_serve(edge):
    """Runs last: SIGTERM drains; new requests get 503 `shutting_down`; serve exits 0 with its gateway."""
    poll_until(lambda: _idle(edge), WAIT, what="gen to be idle")
    gateway = _gateway_pids(edge)
    assert len(gateway) == 1

    async def main():
        async with _Stream(edge.url, {"model": "gen", "prompt": "go on", "max_tokens": LONG, "stream": True}) as s:
            await s.next_event()
            edge.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(poll_until, lambda: edge.status()["state"] != "running", WAIT, 0.02,
                                    "the coordinator to drain")
            async with httpx.AsyncClient(timeout=WAIT) as http:
                return await http.post(edge.url + "/v1/completions", json={"model": "gen", "prompt": "x"},
                                       headers=_auth())
    r = asyncio.run(main())  # leaving it disconnected the long stream: its job is cancelled, the drain ends
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert edge.proc.wait(WAIT) == 0
    assert not psutil.pid_exists(gateway[0])
    assert "http gateway: stopping pid" in edge.log()


# ---------------------------------------------------------------------------- config and orphans


def _serve_once(args: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "serve", "--address", "tcp://127.0.0.1:0",
                           "--handler", "echo", "--devices", "cpu:1", *args], capture_output=True, text=True,
                          timeout=WAIT, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})


def test_non_loopback_http_needs_a_key_or_insecure(tmp_path):
    out = _serve_once(["--http-port", "0", "--http-host", "0.0.0.0"])
    assert out.returncode == 2 and "--api-key-file" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.write_text("\n")
    out = _serve_once(["--http-port", "0", "--api-key-file", str(empty)])
    assert out.returncode == 2 and "holds no key" in out.stderr
    out = _serve_once(["--http-port", "0", "--api-key-file", str(tmp_path / "missing")])
    assert out.returncode == 2 and "api_key_file" in out.stderr
    out = _serve_once(["--http-port", "70000"])
    assert out.returncode == 2 and "port" in out.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        out = _serve_once(["--http-port", str(taken.getsockname()[1])])
    assert out.returncode == 2 and "cannot bind HTTP" in out.stderr


def test_a_mistyped_http_table_is_one_line_and_exit_2(tmp_path):
    """A wrong TOML type is a config error (one line, exit 2), not a traceback from deep in startup."""
    for table, says in [('[http]\nport = 0\nhost = 3\n', "[http]: host must be a string, got 3"),
                        ('http = 3\n', "[http] must be a table, got 3")]:
        cfg = tmp_path / "serve.toml"
        cfg.write_text(table)
        out = _serve_once(["--config", str(cfg)])
        assert out.returncode == 2 and says in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_gateway_dies_with_a_killed_coordinator(tmp_path):
    server = Server(tmp_path, ["--handler", "echo", "--devices", "cpu:1", "--http-port", "0"]).start(timeout=WAIT)
    try:
        url = _http_url(server)
        assert httpx.get(url + "/v1/models", timeout=WAIT).json()["data"] == []  # echo is no OpenAI model
        r = httpx.post(url + "/v1/completions", json={"model": "echo", "prompt": "x"}, timeout=WAIT)
        assert r.status_code == 500 and r.json()["error"]["code"] == "handler_error"  # not generate's schema
        gateway = poll_until(lambda: _gateway_pids(server), WAIT, what="the gateway")
        server.proc.kill()
        server.proc.wait(WAIT)
        poll_until(lambda: not psutil.pid_exists(gateway[0]) or psutil.Process(gateway[0]).status()
                   == psutil.STATUS_ZOMBIE, WAIT, what="the orphaned gateway to die")
    finally:
        server.close()


def test_the_coordinator_imports_no_web_framework():
    code = ("import sys, orchestrator.cli.main, orchestrator.core.coordinator\n"
            "print(sorted(m for m in ('starlette', 'uvicorn', 'httpx', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
