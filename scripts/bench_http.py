#!/usr/bin/env python
"""What the OpenAI-compatible HTTP gateway costs, against baselines measured in the same run.

One `serve` runs two pools on one CPU worker each: `gen`, a tiny Llama (generate handler), and `instant`
(scripts/bench_handlers.py:InstantGenerate), which answers in generate's schema at once with no model, so
that what is left of a request's cost is the HTTP gateway, the coordinator and the worker's dispatch.

  latency     one request in flight, sequential: a 1-token greedy completion of the tiny Llama through
              HTTP (POST /v1/completions, one keep-alive connection, stdlib http.client) against the same
              job through the ZMQ `Client` (Client.run). Interleaved in blocks so both see the same load.
              Goal: HTTP adds <= 1 ms at p50. The same pair on `instant` is shown for information.
  throughput  requests/s with 64 concurrent keep-alive HTTP connections: completions on `instant` through
              the gateway, against a bare endpoint of the same stack (Starlette on uvicorn, h11, asyncio,
              one process) that answers a small JSON body and does no work: the most that stack serves on
              this machine. Goal: >= 0.5 of the bare endpoint. For information: the tiny Llama's
              completions at 64 connections, and the ZMQ Client with 64 jobs in flight on each pool.

The load generator is a small asyncio client over raw sockets (HTTP/1.1, Content-Length bodies), far
lighter than httpx, so that the client takes as little of the 2 cores as it can. It runs on the same
machine as the server: every figure includes that contention, for the baseline too.

  python3 -m scripts.bench_http [--repeat 3] [--seconds 5] [--out docs/bench_results/bench_http.json]
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from orchestrator import Client
from scripts._bench_common import Serve, fmt_table, interleaved, pct, run_latency, write_json

JOB = {"prompt": "Hello", "max_new_tokens": 1, "temperature": 0}


def body(pool: str) -> bytes:
    return json.dumps({"model": pool, "prompt": "Hello", "max_tokens": 1, "temperature": 0}).encode()


# ------------------------------------------------------------------------------------- bare endpoint


def _bare_server(conn) -> None:
    """Starlette + uvicorn (h11, asyncio), one route, no work: the stack's ceiling on this machine."""
    import socket

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def handler(request):
        await request.body()
        return JSONResponse({"id": "x", "object": "text_completion", "choices": [{"text": "ok"}]})

    app = Starlette(routes=[Route("/v1/completions", handler, methods=["POST"])])
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it uvicorn's two writes per response (head, body) meet delayed ACKs: 40 ms a request.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    conn.send(sock.getsockname()[1])
    config = uvicorn.Config(app, loop="asyncio", http="h11", access_log=False, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


class Bare:
    def __enter__(self) -> "Bare":
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_bare_server, args=(child,), daemon=True)
        self.proc.start()
        self.url = f"http://127.0.0.1:{parent.recv()}"
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.join(10)


# ---------------------------------------------------------------------------------- load generator


async def _one_connection(host: str, port: int, request: bytes, deadline: float, counts: list) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            writer.write(request)
            length = -1
            status = await reader.readline()
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            counts[0 if status.split()[1] == b"200" else 1] += 1
    finally:
        writer.close()


def cpu_s(pids: list) -> float:
    """User + system CPU seconds used so far by these processes."""
    import psutil

    return sum(sum(psutil.Process(p).cpu_times()[:2]) for p in pids)


def requests_per_s(url: str, path: str, body: bytes | None, connections: int, seconds: float,
                   cpu: list | None = None) -> float:
    """Requests/s over `seconds` with `connections` keep-alive connections; every answer must be 200.
    With `cpu` = [pids, totals]: adds each process's CPU seconds and the request count to `totals`."""
    host, port = url.removeprefix("http://").split(":")
    method = b"POST" if body is not None else b"GET"
    head = (method + b" " + path.encode() + b" HTTP/1.1\r\nhost: " + host.encode()
            + b"\r\ncontent-type: application/json\r\n")
    request = head + (b"content-length: %d\r\n\r\n" % len(body) + body if body is not None else b"\r\n")

    async def run() -> list:
        counts = [0, 0]
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(_one_connection(host, int(port), request, deadline, counts)
                               for _ in range(connections)))
        return counts

    before = [cpu_s([p]) for p in cpu[0]] if cpu else []
    t0 = time.perf_counter()
    ok, bad = asyncio.run(run())
    elapsed = time.perf_counter() - t0
    if cpu:
        for i, p in enumerate(cpu[0]):
            cpu[1][i] += cpu_s([p]) - before[i]
        cpu[1][-1] += ok
    if bad:
        raise AssertionError(f"{bad} non-200 answers from {url}{path}")
    return ok / elapsed


# ------------------------------------------------------------------------------------------ latency


def http_latency(conn: http.client.HTTPConnection, pool: str, n: int) -> list:
    out, request = [], body(pool)
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", request, {"content-type": "application/json"})
        r = conn.getresponse()
        answer = r.read()
        out.append(time.perf_counter() - t0)
        if r.status != 200:
            raise AssertionError(f"HTTP {r.status}: {answer[:300]!r}")
    return out


def zmq_rate(client: Client, pool: str, window: int, seconds: float) -> float:
    """Jobs/s with `window` jobs in flight (submit()s, then result()s oldest first, topping up)."""
    from collections import deque

    handles: deque = deque()
    done, t0 = 0, time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline or handles:
        while len(handles) < window and time.perf_counter() < deadline:
            handles.append(client.submit(pool, JOB))
        handles.popleft().result(60)
        done += 1
    return done / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ the run


def serve_processes(serve: Serve) -> dict:
    """pids of the gateway, the coordinator and the `instant` pool's worker."""
    import psutil

    coordinator = psutil.Process(serve.pid())
    gateway = next(p.pid for p in coordinator.children() if "orchestrator.http" in " ".join(p.cmdline()))
    with Client(serve.address) as c:
        worker = c.status()["pools"]["instant"]["workers"][0]["pids"][0]
    return {"gateway": gateway, "coordinator": coordinator.pid, "worker": worker}


def make_model(directory: str) -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from worker.models import make_tiny_llama

    return make_tiny_llama(Path(directory) / "llama")


def one_round(args, url: str, bare: Bare, client: Client, procs: dict) -> dict:
    r = {}
    # A fresh connection each round: uvicorn closes a keep-alive connection left idle for 5 s.
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port))
    for pool in ("gen", "instant"):
        r[f"http_lat_{pool}"], r[f"zmq_lat_{pool}"] = interleaved(
            lambda k: http_latency(conn, pool, k), lambda k: run_latency(client, pool, JOB, k, timeout=30),
            args.n_latency, block=50)
    conn.close()
    n, secs = args.connections, args.seconds
    # Alternate the bare endpoint and the gateway in short blocks: the load on a shared machine moves
    # within seconds, and each ratio must compare the two under the same load.
    bare_rates, gateway_rates = [], []
    bare_cpu = [[bare.proc.pid], [0.0, 0]]
    path_cpu = [list(procs.values()), [0.0] * len(procs) + [0]]
    for _ in range(args.blocks):
        bare_rates.append(requests_per_s(bare.url, "/v1/completions", body("instant"), n, secs / args.blocks,
                                         bare_cpu))
        gateway_rates.append(requests_per_s(url, "/v1/completions", body("instant"), n, secs / args.blocks,
                                            path_cpu))
    r["bare_rps"], r["http_rps_instant"] = statistics.mean(bare_rates), statistics.mean(gateway_rates)
    # CPU per request: a figure that the machine's other load moves far less than requests/s.
    r["cpu_us_bare"] = bare_cpu[1][0] / bare_cpu[1][1] * 1e6
    for i, name in enumerate(procs):
        r[f"cpu_us_{name}"] = path_cpu[1][i] / path_cpu[1][-1] * 1e6
    r["http_rps_gen"] = requests_per_s(url, "/v1/completions", body("gen"), n, secs)
    r["zmq_rps_instant"] = zmq_rate(client, "instant", n, secs)
    r["zmq_rps_gen"] = zmq_rate(client, "gen", n, secs)
    print("  round: p50 gen http {:.2f} / zmq {:.2f} ms; instant http {:.2f} / zmq {:.2f} ms; req/s bare {:,.0f}, "
          "instant http {:,.0f} / zmq {:,.0f}, gen http {:,.0f} / zmq {:,.0f}".format(
              *(pct(r[k], 50) * 1e3 for k in ("http_lat_gen", "zmq_lat_gen", "http_lat_instant", "zmq_lat_instant")),
              r["bare_rps"], r["http_rps_instant"], r["zmq_rps_instant"], r["http_rps_gen"], r["zmq_rps_gen"]),
          flush=True)
    return r


def summarize(rounds: list) -> dict:
    med = statistics.median
    s = {}
    for pool in ("gen", "instant"):
        for way in ("http", "zmq"):
            for q in (50, 99):
                s[f"{way}_p{q}_ms_{pool}"] = med(pct(r[f"{way}_lat_{pool}"], q) * 1e3 for r in rounds)
        s[f"added_p50_ms_{pool}"] = med((pct(r[f"http_lat_{pool}"], 50) - pct(r[f"zmq_lat_{pool}"], 50)) * 1e3
                                        for r in rounds)
        for way in ("http", "zmq"):
            s[f"{way}_rps_{pool}"] = med(r[f"{way}_rps_{pool}"] for r in rounds)
    s["bare_rps"] = med(r["bare_rps"] for r in rounds)
    for k in [k for k in rounds[0] if k.startswith("cpu_us_")]:
        s[k] = med(r[k] for r in rounds)
    s["rps_ratio"] = med(r["http_rps_instant"] / r["bare_rps"] for r in rounds)
    s["checks"] = {"added_p50_le_1ms": s["added_p50_ms_gen"] <= 1.0, "rps_ge_0.5x_bare": s["rps_ratio"] >= 0.5}
    return s


def report(s: dict, n: int) -> str:
    def verdict(key):
        return "PASS" if s["checks"][key] else "MISS"

    def lat(way, pool):
        return f"{s[f'{way}_p50_ms_{pool}']:.2f} ms p50 / {s[f'{way}_p99_ms_{pool}']:.2f} ms p99"

    rows = [
        ["1-token completion, tiny Llama, ZMQ Client", lat("zmq", "gen"), ""],
        ["1-token completion, tiny Llama, HTTP", lat("http", "gen"), ""],
        ["HTTP adds (p50), tiny Llama", f"{s['added_p50_ms_gen']:.2f} ms", f"<= 1 ms {verdict('added_p50_le_1ms')}"],
        ["instant completion, ZMQ Client", lat("zmq", "instant"), ""],
        ["instant completion, HTTP", lat("http", "instant"), ""],
        ["HTTP adds (p50), instant", f"{s['added_p50_ms_instant']:.2f} ms", "(info)"],
        [f"bare Starlette/uvicorn, {n} conns", f"{s['bare_rps']:,.0f} req/s", "1.00"],
        [f"gateway, instant completions, {n} conns", f"{s['http_rps_instant']:,.0f} req/s",
         f"{s['rps_ratio']:.2f} (>= 0.50 {verdict('rps_ge_0.5x_bare')})"],
        [f"ZMQ Client, instant, {n} in flight", f"{s['zmq_rps_instant']:,.0f} jobs/s", "(info)"],
        ["CPU per request: bare endpoint", f"{s['cpu_us_bare']:.0f} us", "(info)"],
        ["CPU per request: gateway / coordinator / worker",
         f"{s['cpu_us_gateway']:.0f} / {s['cpu_us_coordinator']:.0f} / {s['cpu_us_worker']:.0f} us", "(info)"],
        [f"gateway, tiny Llama completions, {n} conns", f"{s['http_rps_gen']:,.0f} req/s", "(info)"],
        [f"ZMQ Client, tiny Llama, {n} in flight", f"{s['zmq_rps_gen']:,.0f} jobs/s", "(info)"],
    ]
    return fmt_table(["figure", "value (median of rounds)", "x bare / target"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-latency", type=int, default=500, help="sequential requests per latency run (each way)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--seconds", type=float, default=6.0, help="length of each throughput run")
    p.add_argument("--blocks", type=int, default=3, help="bare/gateway alternations per throughput run")
    p.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    p.add_argument("--out", help="write the results as JSON here (and to $OUT/bench_http.json)")
    args = p.parse_args(argv)
    started, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(tmp)
        config = Path(tmp) / "serve.toml"
        config.write_text(f'[pools.gen]\nhandler = "generate"\ndevices = "cpu:1"\nconfig = {{ model = "{model}" }}\n'
                          f'[pools.instant]\nhandler = "scripts.bench_handlers:InstantGenerate"\ndevices = "cpu:1"\n'
                          f'[http]\nport = 0\n')
        serve = Serve(["--config", str(config)]).start()
        try:
            url = next(line.split()[1] for line in serve.log().splitlines() if line.startswith("http: "))
            host, port = url.removeprefix("http://").split(":")
            with Bare() as bare, Client(serve.address) as client:
                conn = http.client.HTTPConnection(host, int(port))
                for pool in ("gen", "instant"):  # warm-up
                    interleaved(lambda k: http_latency(conn, pool, k),
                                lambda k: run_latency(client, pool, JOB, k, timeout=30), 100, block=50)
                conn.close()
                procs = serve_processes(serve)
                rounds = [one_round(args, url, bare, client, procs) for _ in range(args.repeat)]
        finally:
            serve.close()
    s = summarize(rounds)
    print(f"bench_http  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  cpus={os.cpu_count()}  "
          f"loadavg {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}  {args.repeat} rounds")
    print(report(s, args.connections))
    data = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "args": vars(args), "command": " ".join(sys.argv), "summary": s,
            "rounds": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()
                        if not isinstance(v, list)} for r in rounds],
            "seconds": round(time.time() - started, 1)}
    for path in write_json(data, args.out, "bench_http.json"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
