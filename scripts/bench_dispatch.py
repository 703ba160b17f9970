#!/usr/bin/env python
"""Dispatch overhead: no-op (echo) jobs through client -> coordinator -> worker -> client, against the
raw pyzmq floor measured in the same run.

Floor: a DEALER (this process) -> ROUTER|ROUTER proxy process -> DEALER echo process, over tcp loopback
(both hops), one process each: the same three processes and two hops as client -> coordinator -> worker.
The orchestrator figures use the real client API (`Client`; `AsyncClient` for information) against a
real `orchestrator serve --handler echo --devices cpu:N` subprocess.

  latency    one job in flight, sequential: round-trip p50/p99 (Client.run; the floor: send + recv)
  pipelined  `--window` jobs in flight: jobs/s with 1 and 4 workers (Client and AsyncClient: a window of
             submit()s, then result()s oldest first, topping the window up; AsyncClient also with a task
             per job under a Semaphore, for information). Target: AsyncClient >= 0.8x Client.

Targets: round-trip p50 <= 1.5x the floor; pipelined >= 0.3x the floor and >= 10,000 jobs/s.
The machine is shared and its load moves within seconds, so every round measures the floor and the
orchestrator back to back; figures are medians over `--repeat` rounds and each ratio is the median of
the per-round ratios.

  python3 -m scripts.bench_dispatch [--repeat 5] [--out docs/bench_results/bench_dispatch.json]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

import zmq

from orchestrator import AsyncClient, Client
from protocol import Codec
from protocol.messages import Submit
from scripts._bench_common import Serve, fmt_table, interleaved, pct, run_latency, run_pipelined, write_json

PAYLOAD = "ping"  # the echo job's input; the floor sends a message of the same encoded size
RECV_BATCH = 256

# ----------------------------------------------------------------------------------------- the floor


def _floor_proxy(conn) -> None:
    """ROUTER (clients) | ROUTER (echo) proxy: a poll loop that drains each socket without blocking."""
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for s in (front, back):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        s.bind("tcp://127.0.0.1:0")
    conn.send((front.getsockopt_string(zmq.LAST_ENDPOINT), back.getsockopt_string(zmq.LAST_ENDPOINT)))
    echo_id = back.recv_multipart()[0]  # the echo's hello tells us its identity
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            for _ in range(RECV_BATCH):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if sock is front:
                    back.send_multipart([echo_id, *frames])
                else:
                    front.send_multipart(frames[1:])


def _floor_echo(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    sock.send_multipart([b"", b"hello"])
    while True:
        sock.send_multipart(sock.recv_multipart())
        for _ in range(RECV_BATCH):  # then whatever else has arrived, without blocking
            try:
                sock.send_multipart(sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break


class Floor:
    """The two-hop raw pyzmq echo: proxy and echo processes, this process as the client."""

    def __init__(self):
        self.procs = []
        self.sock = None

    def __enter__(self) -> "Floor":
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proxy = ctx.Process(target=_floor_proxy, args=(child,), daemon=True)
        proxy.start()
        self.procs.append(proxy)
        front, back = parent.recv()
        echo = ctx.Process(target=_floor_echo, args=(back,), daemon=True)
        echo.start()
        self.procs.append(echo)
        self.zctx = zmq.Context()
        self.sock = self.zctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(front)
        self.body = Codec().encode(Submit(1, "echo", PAYLOAD))
        self.latency(50)  # connected end to end (the echo may still be starting)
        return self

    def latency(self, n: int) -> list:
        sock, body, out = self.sock, self.body, []
        for _ in range(n):
            t0 = time.perf_counter()
            sock.send(body)
            sock.recv()
            out.append(time.perf_counter() - t0)
        return out

    def pipelined(self, n: int, window: int) -> float:
        sock, body = self.sock, self.body
        sent = got = 0
        t0 = time.perf_counter()
        while got < n:
            while sent < n and sent - got < window:
                sock.send(body)
                sent += 1
            sock.recv()
            got += 1
            while got < sent:
                try:
                    sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                got += 1
        return n / (time.perf_counter() - t0)

    def __exit__(self, *exc) -> None:
        self.sock.close(linger=0)
        self.zctx.term()
        for p in self.procs:
            p.terminate()
            p.join(5)


# ------------------------------------------------------------------------------------ the orchestrator


async def _async_pipelined(address: str, n: int, window: int) -> float:
    """The sync figure's pattern with the asyncio client: a window of submit()s, then result()s oldest
    first, topping the window up (one task, as an asyncio server's request loop would hold it)."""
    from collections import deque

    async with AsyncClient(address) as client:
        await client.run("echo", PAYLOAD)
        jobs: deque = deque()
        sent = 0
        t0 = time.perf_counter()
        while sent < n or jobs:
            while sent < n and len(jobs) < window:
                jobs.append(await client.submit("echo", PAYLOAD))
                sent += 1
            out = await jobs.popleft().result(60)
            if out != PAYLOAD:
                raise AssertionError(f"echo returned {out!r}")
        return n / (time.perf_counter() - t0)


async def _async_pipelined_tasks(address: str, n: int, window: int) -> float:
    """A task per job, `window` at a time (a Semaphore): how an asyncio server's concurrent handlers use
    the client. Heavier per job than the window above (a task, a semaphore wake-up); reported for
    information."""
    async with AsyncClient(address) as client:
        await client.run("echo", PAYLOAD)
        sem = asyncio.Semaphore(window)
        bad = []

        async def one():
            try:
                job = await client.submit("echo", PAYLOAD)
                if await job.result(60) != PAYLOAD:
                    bad.append(1)
            finally:
                sem.release()

        t0 = time.perf_counter()
        tasks = []
        for _ in range(n):
            await sem.acquire()
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)
        rate = n / (time.perf_counter() - t0)
    if bad:
        raise AssertionError(f"{len(bad)} echo jobs returned the wrong output")
    return rate


async def _async_latency(address: str, n: int) -> list:
    async with AsyncClient(address) as client:
        await client.run("echo", PAYLOAD)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await client.run("echo", PAYLOAD)
            out.append(time.perf_counter() - t0)
        return out


# ------------------------------------------------------------------------------------------ the run
# The machine is shared: load comes and goes within seconds. Each round therefore measures the floor
# and the orchestrator back to back, and each figure's ratio is the median of its per-round ratios.


def rounds(args, floor: Floor, workers: int) -> list:
    """`repeat` rounds against one `serve --devices cpu:N --handler echo`; each a dict of figures."""
    out = []
    with Serve(["--handler", "echo", "--devices", f"cpu:{workers}"]) as serve, Client(serve.address) as c:
        run_latency(c, "echo", PAYLOAD, 300)  # warm-up: connections, caches, the worker's first batch
        for _ in range(args.repeat):
            r = {}
            if workers == 1:
                r["floor_lat"], r["lat"] = interleaved(floor.latency, lambda k: run_latency(c, "echo", PAYLOAD, k),
                                                       args.n_latency)
                r["async_lat"] = asyncio.run(_async_latency(serve.address, args.n_latency // 2))
            r["floor_rate"] = floor.pipelined(args.n_pipelined, args.window)
            r["rate"] = run_pipelined(c, PAYLOAD, args.n_pipelined, args.window)
            r["async_rate"] = asyncio.run(_async_pipelined(serve.address, args.n_pipelined // 2, args.window))
            r["async_tasks_rate"] = asyncio.run(_async_pipelined_tasks(serve.address, args.n_pipelined // 2,
                                                                       args.window))
            out.append(r)
            print("  round:", _round_line(r), flush=True)
        served = [w["completed"] for w in c.status()["pools"]["echo"]["workers"]]
    out[-1]["served"] = served
    return out


def _round_line(r: dict) -> str:
    parts = []
    if "lat" in r:
        parts.append(f"p50 floor {pct(r['floor_lat'], 50) * 1e6:.0f} us, orch {pct(r['lat'], 50) * 1e6:.0f} us")
    parts.append(f"floor {r['floor_rate']:,.0f}/s, orch {r['rate']:,.0f}/s (async {r['async_rate']:,.0f}/s, "
                 f"task per job {r['async_tasks_rate']:,.0f}/s)")
    return "; ".join(parts)


def summarize(one: list, four: list) -> dict:
    med = statistics.median
    fl_lat = [pct(r["floor_lat"], q) * 1e6 for r in one for q in (50,)]
    s = {
        "floor_p50_us": med(fl_lat),
        "floor_p99_us": med(pct(r["floor_lat"], 99) * 1e6 for r in one),
        "floor_msgs_per_s": med(r["floor_rate"] for r in one + four),
        "p50_us": med(pct(r["lat"], 50) * 1e6 for r in one),
        "p99_us": med(pct(r["lat"], 99) * 1e6 for r in one),
        "p50_ratio": med(pct(r["lat"], 50) / pct(r["floor_lat"], 50) for r in one),
        "async_p50_us": med(pct(r["async_lat"], 50) * 1e6 for r in one),
        "async_p50_ratio": med(pct(r["async_lat"], 50) / pct(r["floor_lat"], 50) for r in one),
    }
    for name, rs in (("1w", one), ("4w", four)):
        s[f"jobs_per_s_{name}"] = med(r["rate"] for r in rs)
        s[f"ratio_{name}"] = med(r["rate"] / r["floor_rate"] for r in rs)
        s[f"async_jobs_per_s_{name}"] = med(r["async_rate"] for r in rs)
        s[f"async_ratio_{name}"] = med(r["async_rate"] / r["floor_rate"] for r in rs)
        s[f"async_vs_client_{name}"] = med(r["async_rate"] / r["rate"] for r in rs)
        s[f"async_tasks_jobs_per_s_{name}"] = med(r["async_tasks_rate"] for r in rs)
        s[f"async_tasks_vs_client_{name}"] = med(r["async_tasks_rate"] / r["rate"] for r in rs)
        s[f"served_{name}"] = rs[-1].get("served")
    s["checks"] = {"latency_p50_le_1.5x_floor": s["p50_ratio"] <= 1.5}
    for name in ("1w", "4w"):
        s["checks"][f"pipelined_{name}_ge_0.3x_floor_and_10k"] = \
            s[f"ratio_{name}"] >= 0.3 and s[f"jobs_per_s_{name}"] >= 10_000
        s["checks"][f"async_{name}_ge_0.8x_client"] = s[f"async_vs_client_{name}"] >= 0.8
    return s


def report(s: dict) -> str:
    def verdict(key):
        return "PASS" if s["checks"][key] else "MISS"

    rows = [
        ["floor: round trip (2 hops)", f"{s['floor_p50_us']:.0f} us p50 / {s['floor_p99_us']:.0f} us p99", "1.00", ""],
        ["floor: pipelined", f"{s['floor_msgs_per_s']:,.0f} msg/s", "1.00", ""],
        ["round trip, Client (1 worker)", f"{s['p50_us']:.0f} us p50 / {s['p99_us']:.0f} us p99",
         f"{s['p50_ratio']:.2f}", f"<= 1.50 {verdict('latency_p50_le_1.5x_floor')}"],
        ["round trip, AsyncClient", f"{s['async_p50_us']:.0f} us p50", f"{s['async_p50_ratio']:.2f}", "(info)"],
    ]
    for name, label in (("1w", "1 worker"), ("4w", "4 workers")):
        key = f"pipelined_{name}_ge_0.3x_floor_and_10k"
        rows.append([f"pipelined, Client, {label}", f"{s[f'jobs_per_s_{name}']:,.0f} jobs/s",
                     f"{s[f'ratio_{name}']:.2f}", f">= 0.30 and >= 10,000/s {verdict(key)}"])
        key = f"async_{name}_ge_0.8x_client"
        rows.append([f"pipelined, AsyncClient, {label}", f"{s[f'async_jobs_per_s_{name}']:,.0f} jobs/s",
                     f"{s[f'async_ratio_{name}']:.2f}",
                     f"{s[f'async_vs_client_{name}']:.2f}x Client, >= 0.80 {verdict(key)}"])
        rows.append([f"pipelined, AsyncClient task per job, {label}",
                     f"{s[f'async_tasks_jobs_per_s_{name}']:,.0f} jobs/s", "",
                     f"{s[f'async_tasks_vs_client_{name}']:.2f}x Client (info)"])
    return fmt_table(["figure", "value (median of rounds)", "x floor", "target"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-latency", type=int, default=2000, help="sequential jobs per latency run")
    p.add_argument("--n-pipelined", type=int, default=20000, help="jobs per pipelined run")
    p.add_argument("--window", type=int, default=1000, help="jobs in flight in pipelined runs")
    p.add_argument("--repeat", type=int, default=5, help="rounds; medians are reported")
    p.add_argument("--out", help="write the results as JSON here (and to $OUT/bench_dispatch.json)")
    args = p.parse_args(argv)
    started = time.time()
    load_before = os.getloadavg()
    with Floor() as floor:
        floor.latency(500)
        print("1 worker:", flush=True)
        one = rounds(args, floor, 1)
        print("4 workers:", flush=True)
        four = rounds(args, floor, 4)
    s = summarize(one, four)
    print(f"bench_dispatch  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  cpus={os.cpu_count()}  "
          f"loadavg {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}  tcp loopback  {args.repeat} rounds")
    print(report(s))
    print(f"jobs served per worker (last round): 1w {s['served_1w']}, 4w {s['served_4w']}")
    data = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "args": vars(args),
            "command": " ".join(sys.argv), "summary": s,
            "rounds": {"1w": [_compact(r) for r in one], "4w": [_compact(r) for r in four]},
            "seconds": round(time.time() - started, 1)}
    for path in write_json(data, args.out, "bench_dispatch.json"):
        print(f"wrote {path}")
    return 0


def _compact(r: dict) -> dict:
    out = {k: v for k, v in r.items() if not isinstance(v, list) or k == "served"}
    for k in ("floor_lat", "lat", "async_lat"):
        if k in r:
            out[k + "_p50_us"] = round(pct(r[k], 50) * 1e6, 1)
            out[k + "_p99_us"] = round(pct(r[k], 99) * 1e6, 1)
    return out


if __name__ == "__main__":
    sys.exit(main())
