"""The core end to end: real `orchestrator serve` processes, real workers, real sockets (placement and the CLI
have files of their own: test_placement.py, test_cli.py).

Timings are printed for information only; benchmarks live in scripts/, never in assertions here.
"""
from __future__ import annotations

import asyncio
import collections
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import psutil
import pytest
import zmq

from orchestrator import AsyncClient, RequestError
from protocol import NDArray, PROTOCOL_VERSION

from .conftest import REPO, Server, poll_until

WAIT = 120.0  # generous: the machine is shared and loaded; a correct run never waits this long


# ----------------------------------------------------------------------------- helpers


def pack(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


class Raw:
    """A bare DEALER socket speaking the wire protocol by hand, as a foreign-language client would."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, body: bytes) -> None:
        self.sock.send(body)

    def recv(self, timeout: float = WAIT) -> dict:
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"no reply within {timeout} s")
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def ask(self, body: bytes) -> dict:
        self.send(body)
        return self.recv()

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def raw():
    ctx = zmq.Context()
    socks = []

    def make(address: str) -> Raw:
        socks.append(Raw(ctx, address))
        return socks[-1]

    yield make
    for s in socks:
        s.close()
    ctx.term()


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    """One shared echo coordinator for the read-only tests (saves a start-up per test)."""
    srv = Server(tmp_path_factory.mktemp("echo"), ["--devices", "cpu:2", "--handler", "echo"]).start()
    yield srv
    srv.close()


def by_name(workers: list) -> dict:
    return {w["name"]: w for w in workers}


def pool_status(client, pool: str) -> dict:
    return client.status()["pools"][pool]


def gone(procs: list) -> bool:
    def dead(p):
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return all(dead(p) for p in procs)


# ----------------------------------------------------------------------------- throughput and spread


@pytest.mark.slow
def test_throughput_and_spread_10000_jobs_from_4_threads(serve):
    srv = serve(["--devices", "cpu:4", "--handler", "echo"])
    client = srv.client()  # one client shared by four threads: it must be thread-safe

    def work(t: int) -> tuple:
        inputs = [{"t": t, "i": i, "s": "x" * (i % 5)} for i in range(2500)]
        handles = [client.submit("echo", x) for x in inputs]  # pipelined: all submitted, then collected
        wrong = sum(h.result(timeout=WAIT) != x for h, x in zip(handles, inputs))
        return wrong, collections.Counter(h.meta["worker"] for h in handles)

    start = time.perf_counter()
    with ThreadPoolExecutor(4) as ex:
        parts = list(ex.map(work, range(4)))
    wrong, served = sum(p[0] for p in parts), sum((p[1] for p in parts), collections.Counter())
    elapsed = time.perf_counter() - start
    print(f"\n10,000 echo jobs from 4 threads, 4 workers: {elapsed:.2f} s ({10_000 / elapsed:.0f} jobs/s)")
    assert wrong == 0
    workers = by_name(pool_status(client, "echo")["workers"])
    completed = {name: w["completed"] for name, w in workers.items()}
    print(f"jobs per worker: {completed}")
    assert sorted(completed) == ["echo/0", "echo/1", "echo/2", "echo/3"]
    assert all(n > 0 for n in completed.values()), completed
    assert sum(completed.values()) == 10_000
    assert served == completed  # each result names the worker that ran it


# ----------------------------------------------------------------------------- scaling under load


class Streamer(threading.Thread):
    """Keeps `window` sleep jobs in flight over a raw socket, so every reply (duplicates too) is seen.

    Each job is labelled with the phase current when it was sent; the main thread moves the phase on
    only after a scale request was answered, so a job of phase N was accepted after that scale."""

    def __init__(self, address: str, pool: str, window: int = 8, ms: int = 20):
        super().__init__(daemon=True)
        self.address, self.pool, self.window, self.ms = address, pool, window, ms
        self.phase = 0
        self.sent: dict = {}  # id -> (phase, input)
        self.replies: dict = collections.defaultdict(list)  # id -> every reply message for it
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def done_in(self, phase: int) -> list:
        with self.lock:
            return [r for i, rs in self.replies.items() for r in rs if self.sent[i][0] == phase]

    def run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        try:
            self._stream(sock)
            self._barrier(sock)
        except BaseException as e:  # surfaced by the test after join()
            self.error = e
        finally:
            sock.close()
            ctx.term()

    def _stream(self, sock) -> None:
        next_id, pending = 0, set()  # a set, not a count: a duplicate reply must not skew it
        deadline = time.monotonic() + 4 * WAIT
        while (not self.stopping.is_set() or pending) and time.monotonic() < deadline:
            while not self.stopping.is_set() and len(pending) < self.window:
                body = {"ms": self.ms, "n": next_id}
                with self.lock:
                    self.sent[next_id] = (self.phase, body)
                sock.send(pack(v=PROTOCOL_VERSION, op="submit", id=next_id, pool=self.pool, input=body))
                pending.add(next_id)
                next_id += 1
            if sock.poll(100):
                msg = msgpack.unpackb(sock.recv(), raw=False)
                with self.lock:
                    self.replies[msg["id"]].append(msg)
                if msg["op"] in ("result", "error"):
                    pending.discard(msg["id"])

    def _barrier(self, sock) -> None:
        """A ping answered after every result: a duplicate sent earlier would have arrived before it."""
        sock.send(pack(v=PROTOCOL_VERSION, op="ping", id="barrier"))
        while sock.poll(int(WAIT * 1000)):
            msg = msgpack.unpackb(sock.recv(), raw=False)
            if msg["id"] == "barrier":
                return
            with self.lock:
                self.replies[msg["id"]].append(msg)
        raise AssertionError("no barrier reply")


def serving(client, pool: str) -> list:
    workers = pool_status(client, pool)["workers"]
    return sorted(w["name"] for w in workers if w["state"] in ("ready", "busy"))


@pytest.mark.slow
def test_scaling_under_load_loses_and_duplicates_nothing(serve):
    srv = serve(["--devices", "cpu:4", "--handler", "sleep", "--replicas", "2"])
    client = srv.client()
    assert serving(client, "sleep") == ["sleep/0", "sleep/1"]
    streamer = Streamer(srv.address, "sleep")
    streamer.start()
    try:
        poll_until(lambda: len(streamer.done_in(0)) >= 10, WAIT, what="jobs on 2 workers")

        assert client.scale("sleep", 4) == {"pool": "sleep", "replicas": 4}
        streamer.phase = 1
        poll_until(lambda: len(serving(client, "sleep")) == 4, WAIT, what="4 serving workers")
        new_served = lambda: {r["meta"]["worker"] for r in streamer.done_in(1) if r["op"] == "result"}
        poll_until(lambda: {"sleep/2", "sleep/3"} <= new_served(), WAIT, what="new workers serving")

        assert client.scale("sleep", 1) == {"pool": "sleep", "replicas": 1}
        streamer.phase = 2  # every job from here on was accepted after the drain began
        poll_until(lambda: len(pool_status(client, "sleep")["workers"]) == 1, WAIT,
                   what="scale-down to finish draining")
        poll_until(lambda: len(streamer.done_in(2)) >= 10, WAIT, what="jobs on 1 worker")
    finally:
        streamer.stopping.set()
        streamer.join(WAIT)
    assert streamer.error is None, streamer.error
    assert not streamer.is_alive()

    # Exactly one reply per job, every one a correct result; nothing for ids never sent.
    counts = collections.Counter(len(r) for r in streamer.replies.values())
    assert counts == {1: len(streamer.replies)}, f"jobs by number of replies: {counts}"
    assert set(streamer.replies) == set(streamer.sent)
    bad = [(i, r[0]) for i, r in streamer.replies.items()
           if r[0]["op"] != "result" or r[0]["output"]["input"] != streamer.sent[i][1]
           or r[0]["meta"]["attempts"] != 1]  # 2+ would mean it was replayed: run twice
    assert bad == []
    print(f"\n{len(streamer.sent)} jobs across scale 2->4->1, each answered once")

    (survivor,) = pool_status(client, "sleep")["workers"]
    assert {r["meta"]["worker"] for r in streamer.done_in(2)} == {survivor["name"]}
    all_workers = {r[0]["meta"]["worker"] for r in streamer.replies.values()}
    assert all_workers == {"sleep/0", "sleep/1", "sleep/2", "sleep/3"}

    # Beyond the free devices: a scale_error, and the pool is exactly as it was.
    before = pool_status(client, "sleep")
    for replicas in (5, 100, -1):
        with pytest.raises(RequestError) as info:
            client.scale("sleep", replicas)
        assert info.value.code == "scale_error" and str(replicas) in info.value.message
    after = pool_status(client, "sleep")
    assert after["desired"] == before["desired"] == 1
    assert [(w["name"], w["pids"]) for w in after["workers"]] == \
           [(w["name"], w["pids"]) for w in before["workers"]]
    assert len(srv.children()) == 1
    with pytest.raises(RequestError) as info:
        client.scale("nope", 1)
    assert info.value.code == "unknown_pool"


# ----------------------------------------------------------------------------- bad input


def test_bad_input_gets_coded_errors_and_service_continues(serve, raw):
    srv = serve(["--devices", "cpu:1", "--handler", "echo", "--max-message-bytes", "65536"])
    sock = raw(srv.address)
    v = PROTOCOL_VERSION
    cases = [  # (what, body, expected code, expected id in the reply)
        ("random bytes", b"\xc1" + os.urandom(64), "bad_request", None),  # 0xc1: never valid msgpack
        # The id is read before the cut, so the reply still reaches the request.
        ("truncated msgpack", pack(v=v, op="submit", id=1, pool="echo", input="abc")[:-4],
         "bad_request", 1),
        ("not a map", msgpack.packb([v, "ping", 1]), "bad_request", None),
        ("wrong version", pack(v=v + 98, op="ping", id=2), "unsupported_version", 2),
        ("no version", pack(op="ping", id=3), "unsupported_version", 3),
        ("unknown op", pack(v=v, op="frobnicate", id=4), "unknown_op", 4),
        ("reply op from a client", pack(v=v, op="result", id=5, output=1), "unknown_op", 5),
        ("worker op from a client", pack(v=v, op="w_run", jid=1, input=None), "unknown_op", None),
        ("missing op", pack(v=v, id=6), "bad_request", 6),
        ("missing field", pack(v=v, op="submit", id=7, input=1), "bad_request", 7),
        ("mistyped field", pack(v=v, op="submit", id=8, pool=["echo"]), "bad_request", 8),
        ("mistyped int", pack(v=v, op="scale", id=9, pool="echo", replicas="2"), "bad_request", 9),
        ("unknown field", pack(v=v, op="status", id=10, verbose=True), "bad_request", 10),
        ("NaN timeout", pack(v=v, op="submit", id=11, pool="echo", timeout=float("nan")),
         "bad_request", 11),
        ("oversize", pack(v=v, op="submit", id=12, pool="echo", input="x" * 100_000), "too_large", 12),
        ("oversize string field", pack(v=v, op="submit", id=13, pool="e" * 70_000), "too_large", 13),
        ("unknown pool", pack(v=v, op="submit", id=14, pool="nope", input=1), "unknown_pool", 14),
        ("unknown job", pack(v=v, op="cancel", id=15, job=999), "unknown_job", 15),
    ]
    for what, body, code, rid in cases:
        reply = sock.ask(body)
        assert (reply["op"], reply["code"], reply["id"]) == ("error", code, rid), (what, reply)
        assert isinstance(reply["message"], str) and reply["message"], what

    # Wrong frame counts: the ROUTER sees [identity, *frames]; only one body frame is a message.
    for frames in ([b"a", b"b"], [b"a", b"b", b"c"], [b"x", pack(v=v, op="ping", id=16)]):
        sock.sock.send_multipart(frames)
        reply = sock.recv()
        assert (reply["op"], reply["code"]) == ("error", "bad_request"), (frames, reply)

    # The same connection still works, for every op.
    reply = sock.ask(pack(v=v, op="submit", id="ok", pool="echo", input={"k": [1, 2]}))
    assert (reply["op"], reply["id"], reply["output"]) == ("result", "ok", {"k": [1, 2]})
    assert reply["meta"]["worker"] == "echo/0"
    assert sock.ask(pack(v=v, op="ping", id="p"))["op"] == "ok"
    client = srv.client()
    assert client.run("echo", "still fine", timeout=WAIT) == "still fine"

    # A client-side Client gets too_large for its own oversized job instead of waiting forever.
    with pytest.raises(RequestError) as info:
        client.submit("echo", "y" * 100_000).result(timeout=WAIT)
    assert info.value.code == "too_large"

    expected = collections.Counter(code for *_, code, _rid in cases)
    expected["bad_request"] += 3
    expected["too_large"] += 1
    assert client.status()["rejected"] == dict(expected)
    assert "rejected request from client" in srv.log()
    assert srv.proc.poll() is None


def test_message_over_the_transport_cap_is_dropped_without_harm(serve, raw):
    # Past 2 x max_message_bytes libzmq drops the message (and the connection) before we see it.
    srv = serve(["--devices", "cpu:1", "--handler", "echo", "--max-message-bytes", "65536"])
    raw(srv.address).send(pack(v=PROTOCOL_VERSION, op="submit", id=1, pool="echo", input="z" * 300_000))
    assert raw(srv.address).ask(pack(v=PROTOCOL_VERSION, op="ping", id=2))["op"] == "ok"
    assert srv.client().run("echo", [1, 2, 3], timeout=WAIT) == [1, 2, 3]
    assert srv.proc.poll() is None


# ----------------------------------------------------------------------------- clean shutdown


@pytest.mark.slow
def test_sigterm_drains_200_inflight_jobs_then_exits_0_leaving_no_children(serve):
    srv = serve(["--devices", "cpu:4", "--handler", "sleep"])
    client = srv.client()
    inputs = [{"ms": 50 + i % 51, "i": i} for i in range(200)]
    handles = [client.submit("sleep", x) for x in inputs]

    def all_accepted_and_running():
        st = client.status()
        pool = st["pools"]["sleep"]
        return st["jobs_unfinished"] + pool["completed"] == 200 and pool["inflight"] > 0

    poll_until(all_accepted_and_running, WAIT, what="200 accepted jobs with some running")
    children = srv.children()
    assert len(children) == 4
    srv.proc.send_signal(signal.SIGTERM)

    outputs = [h.result(timeout=WAIT) for h in handles]  # raises on any error reply
    assert [o["input"] for o in outputs] == inputs
    assert srv.proc.wait(WAIT) == 0
    poll_until(lambda: gone(children), WAIT, what="every worker process to be gone")
    log = srv.log()
    assert "draining (received SIGTERM)" in log
    assert "killing pid" not in log  # workers stopped by message, not by SIGKILL


# ----------------------------------------------------------------------------- slow handlers


def test_status_answers_while_every_worker_runs_a_5s_job(serve):
    srv = serve(["--devices", "cpu:2", "--handler", "sleep", "--capacity", "1"])
    client = srv.client()
    jobs = [client.submit("sleep", {"ms": 5000}) for _ in range(2)]

    def all_busy():
        workers = pool_status(client, "sleep")["workers"]
        return all(w["state"] == "busy" and w["inflight"] == 1 and (w["step_age"] or 0) > 0
                   for w in workers) and len(workers) == 2

    poll_until(all_busy, WAIT, what="both workers busy with a running step")
    latencies = []
    for _ in range(20):
        t = time.perf_counter()
        st = client.status()
        latencies.append((time.perf_counter() - t) * 1000)
        assert st["pools"]["sleep"]["inflight"] == 2
    health = client.health()
    assert set(health["pools"]["sleep"]["workers"]) == {"sleep/0", "sleep/1"}
    print(f"\nstatus latency while all workers sleep 5 s: p50 {statistics.median(latencies):.2f} ms, "
          f"max {max(latencies):.2f} ms")
    for job in jobs:  # end early; also exercises cancel of a running job
        job.cancel()
        with pytest.raises(RequestError) as info:
            job.result(timeout=WAIT)
        assert info.value.code == "cancelled"


# ----------------------------------------------------------------------------- cancel


def test_cancel_queued_and_running_jobs(serve):
    srv = serve(["--devices", "cpu:1", "--handler", "sleep", "--capacity", "1"])
    client = srv.client()
    pids = pool_status(client, "sleep")["workers"][0]["pids"]
    running = client.submit("sleep", {"ms": 600_000})
    poll_until(lambda: pool_status(client, "sleep")["inflight"] == 1, WAIT, what="job to run")
    queued = client.submit("sleep", {"ms": 50, "which": "queued"})
    other = client.submit("sleep", {"ms": 50, "which": "other"})
    poll_until(lambda: pool_status(client, "sleep")["queue_depth"] == 2, WAIT, what="2 queued jobs")

    assert queued.cancel() == {"job": queued.id, "state": "queued"}
    with pytest.raises(RequestError) as info:
        queued.result(timeout=WAIT)
    assert info.value.code == "cancelled"

    assert running.cancel() == {"job": running.id, "state": "running"}
    with pytest.raises(RequestError) as info:
        running.result(timeout=WAIT)  # a 600 s sleep: only a cancel ends it within WAIT
    assert info.value.code == "cancelled"

    assert other.result(timeout=WAIT)["input"] == {"ms": 50, "which": "other"}
    with pytest.raises(RequestError) as info:
        other.cancel()  # already finished
    assert info.value.code == "unknown_job"
    worker = pool_status(client, "sleep")["workers"][0]
    assert worker["pids"] == pids and worker["restarts"] == 0  # cancel never killed the worker


# ----------------------------------------------------------------------------- clients


def test_sync_client_streaming_and_binary_arrays(echo_server):
    client = echo_server.client()
    job = client.submit("echo", {"stream": "me"}, stream=True)
    assert list(job) == [{"stream": "me"}]
    assert job.result(timeout=WAIT) == {"stream": "me"}

    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = client.run("echo", {"x": array, "ids": np.arange(5, dtype=np.int64)}, timeout=WAIT)
    assert isinstance(out["x"], NDArray) and out["x"].dtype == "float32"
    assert np.array_equal(out["x"].to_numpy(), array)
    assert np.array_equal(out["ids"].to_numpy(), np.arange(5))

    with pytest.raises(RequestError) as info:
        client.run("no-such-pool", 1, timeout=WAIT)
    assert info.value.code == "unknown_pool"


def test_async_client_round_trip_and_streaming(echo_server):
    async def main():
        async with AsyncClient(echo_server.address, timeout=WAIT) as ac:
            assert await ac.run("echo", {"a": [1, 2], "b": "x"}) == {"a": [1, 2], "b": "x"}
            job = await ac.submit("echo", "streamed", stream=True)
            chunks = [c async for c in job]
            final = await job.result(timeout=WAIT)
            many = await asyncio.gather(*(ac.run("echo", i) for i in range(100)))
            with pytest.raises(RequestError) as info:
                await ac.run("nope", 1)
            status = await ac.status()
            return chunks, final, many, info.value.code, status

    chunks, final, many, code, status = asyncio.run(main())
    assert chunks == ["streamed"] and final == "streamed"
    assert many == list(range(100))
    assert code == "unknown_pool"
    assert status["pools"]["echo"]["health"] == "ready"


def test_coordinator_process_never_loads_torch(echo_server):
    maps = psutil.Process(echo_server.proc.pid).memory_maps()
    assert [m.path for m in maps if "torch" in m.path] == []


def test_importing_orchestrator_and_protocol_does_not_import_torch():
    code = (
        "import importlib, pkgutil, sys\n"
        "import orchestrator, protocol\n"
        "bad = []\n"
        "for pkg in (orchestrator, protocol):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if not m.name.endswith('__main__'):\n"
        "            importlib.import_module(m.name)\n"
        "        if 'torch' in sys.modules and not bad:\n"
        "            bad.append(m.name)\n"
        "import worker.runtime, worker.process, worker.control, worker.handlers.basic\n"
        "print(bad, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=WAIT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] False False"
