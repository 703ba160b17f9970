#!/usr/bin/env python
"""Dispatch overhead: no-op (echo) jobs through client -> coordinator -> worker -> client, against the
raw pyzmq floor measured in the same run.

Floor: a DEALER (this process) -> ROUTER|ROUTER proxy process -> DEALER echo process, over tcp loopback
(both hops), one process each: the same three processes and two hops as client -> coordinator -> worker.
The orchestrator figures use the real client API (`Client`, `AsyncClient`) against a real
`orchestrator serve --handler echo` subprocess.

  latency    one job in flight, sequential: round-trip p50/p99 (Client.run; the floor: send + recv)
  pipelined  a window of jobs in flight: jobs/s with 1 and 4 workers (AsyncClient, and the sync Client
             with a window of submit()s then result()s)

Targets (issue 2): round-trip p50 <= 1.5x the floor; pipelined >= 0.3x the floor and >= 10,000 jobs/s.
Each measurement runs --repeat times; the median is reported (the machine is shared and noisy).

  python scripts/bench_dispatch.py [--n-latency 3000] [--n-pipelined 20000] [--window 1000] [--repeat 3]
                                   [--out docs/bench_results/dispatch.json]
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import Serve, fmt_table, pct, write_json  # noqa: E402

import zmq  # noqa: E402

from orchestrator import AsyncClient, Client  # noqa: E402
from protocol import Codec  # noqa: E402
from protocol.messages import Submit  # noqa: E402

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


def orch_latency(client: Client, n: int) -> list:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.run("echo", PAYLOAD)
        out.append(time.perf_counter() - t0)
    return out


def orch_pipelined_sync(client: Client, n: int, window: int) -> float:
    """A window of submit()s, then result()s oldest first, topping the window up as they finish."""
    from collections import deque

    handles: deque = deque()
    t0 = time.perf_counter()
    sent = 0
    while sent < n or handles:
        while sent < n and len(handles) < window:
            handles.append(client.submit("echo", PAYLOAD))
            sent += 1
        out = handles.popleft().result(60)
        if out != PAYLOAD:
            raise AssertionError(f"echo returned {out!r}")
    return n / (time.perf_counter() - t0)


async def _orch_pipelined_async(address: str, n: int, window: int) -> float:
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


def orch_pipelined_async(address: str, n: int, window: int) -> float:
    return asyncio.run(_orch_pipelined_async(address, n, window))


# ------------------------------------------------------------------------------------------ the run


def median_of(fn, repeat: int):
    values = [fn() for _ in range(repeat)]
    return statistics.median(values), values


def lat_summary(fn, repeat: int) -> dict:
    runs = [fn() for _ in range(repeat)]
    p50s = [pct(r, 50) * 1e6 for r in runs]
    p99s = [pct(r, 99) * 1e6 for r in runs]
    return {"p50_us": statistics.median(p50s), "p99_us": statistics.median(p99s),
            "p50_runs_us": [round(v, 1) for v in p50s], "p99_runs_us": [round(v, 1) for v in p99s]}


def measure_floor(args) -> dict:
    with Floor() as floor:
        lat = lat_summary(lambda: floor.latency(args.n_latency), args.repeat)
        rate, runs = median_of(lambda: floor.pipelined(args.n_pipelined, args.window), args.repeat)
    return {**lat, "msgs_per_s": rate, "msgs_per_s_runs": [round(r) for r in runs]}


def measure_orchestrator(args, workers: int, latency: bool) -> dict:
    res: dict = {"workers": workers}
    with Serve(["--handler", "echo", "--devices", f"cpu:{workers}"]) as serve:
        with Client(serve.address) as client:
            orch_latency(client, 200)  # warm-up: connections, caches
            if latency:
                res.update(lat_summary(lambda: orch_latency(client, args.n_latency), args.repeat))
            rate, runs = median_of(lambda: orch_pipelined_sync(client, args.n_pipelined, args.window),
                                   args.repeat)
            res["sync_jobs_per_s"], res["sync_runs"] = rate, [round(r) for r in runs]
            served = {w["name"]: w.get("completed") for p in client.status()["pools"].values()
                      for w in p["workers"]}
        rate, runs = median_of(lambda: orch_pipelined_async(serve.address, args.n_pipelined, args.window),
                               args.repeat)
        res["async_jobs_per_s"], res["async_runs"] = rate, [round(r) for r in runs]
        res["jobs_per_s"] = max(res["sync_jobs_per_s"], res["async_jobs_per_s"])
        res["served_per_worker"] = served
    return res


def report(floor: dict, one: dict, four: dict) -> tuple[str, dict]:
    rows, checks = [], {}
    fl_p50, fl_rate = floor["p50_us"], floor["msgs_per_s"]
    rows.append(["floor round trip", f"{fl_p50:.0f} us p50 / {floor['p99_us']:.0f} us p99", "1.00", ""])
    rows.append(["floor pipelined", f"{fl_rate:,.0f} msg/s", "1.00", ""])
    if "p50_us" in one:
        r = one["p50_us"] / fl_p50
        checks["latency_p50_le_1.5x"] = r <= 1.5
        rows.append(["orch round trip (1 worker)", f"{one['p50_us']:.0f} us p50 / {one['p99_us']:.0f} us p99",
                     f"{r:.2f}", f"<= 1.50  {'PASS' if r <= 1.5 else 'MISS'}"])
    for res in (one, four):
        for kind in ("async", "sync"):
            rate = res[f"{kind}_jobs_per_s"]
            rows.append([f"orch pipelined {res['workers']}w ({kind} client)", f"{rate:,.0f} jobs/s",
                         f"{rate / fl_rate:.2f}", ""])
        best = res["jobs_per_s"]
        ok = best / fl_rate >= 0.3 and best >= 10_000
        checks[f"pipelined_{res['workers']}w"] = ok
        rows[-1][3] = rows[-2][3] = ""
        rows.append([f"  best, {res['workers']} worker(s)", f"{best:,.0f} jobs/s", f"{best / fl_rate:.2f}",
                     f">= 0.30 and >= 10,000/s  {'PASS' if ok else 'MISS'}"])
    return fmt_table(["figure", "value", "x floor", "target"], rows), checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-latency", type=int, default=3000, help="sequential jobs per latency run")
    p.add_argument("--n-pipelined", type=int, default=20000, help="jobs per pipelined run")
    p.add_argument("--window", type=int, default=1000, help="jobs in flight in pipelined runs")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is reported")
    p.add_argument("--out", help="write the results as JSON here (and to $OUT/bench_dispatch.json)")
    args = p.parse_args(argv)
    started = time.time()
    load_before = os.getloadavg()
    floor = measure_floor(args)
    one = measure_orchestrator(args, 1, latency=True)
    four = measure_orchestrator(args, 4, latency=False)
    table, checks = report(floor, one, four)
    print(f"bench_dispatch  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  cpus={os.cpu_count()}  "
          f"load={load_before[0]:.2f}->{os.getloadavg()[0]:.2f}  tcp loopback")
    print(table)
    data = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "args": vars(args),
            "floor": floor, "orchestrator_1w": one, "orchestrator_4w": four, "checks": checks,
            "seconds": round(time.time() - started, 1)}
    for path in write_json(data, args.out, "bench_dispatch.json"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
