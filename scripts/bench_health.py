#!/usr/bin/env python
"""`health` and `status` latency while every worker is busy (goal: p99 < 50 ms on the 2-core box).

Starts `orchestrator serve --handler sleep --devices cpu:N`, fills every worker's credits with
`--sleep-s` second sleep jobs, and while they run makes `--calls` health and `--calls` status calls,
from two threads at once (one per kind; a real Client each). The same calls against the idle server
give the baseline. Each answer also records whether every worker was still busy, so the figures are
known to come from the busy window.

With `--devices 0,1,...` (GPU ids) the workers run `CudaSleep` below instead: the same sleep, but
holding a CUDA allocation, so that each worker reports GPU memory used/total. The run ends by printing
`orchestrator status` as the CLI shows it and the `orchestrator_gpu_memory_*` metrics.

  python3 -m scripts.bench_health [--workers 2 | --devices 0,1] [--sleep-s 10] [--calls 200]
                                 [--out docs/bench_results/health.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
import urllib.request

from orchestrator import Client
from orchestrator.cli.status_table import render_status
from scripts._bench_common import Serve, fmt_table, pct, write_json
from worker.handlers.basic import Sleep

TARGET_P99_MS = 50.0
CUDA_HOLD_BYTES = 512 * 2**20


class CudaSleep(Sleep):
    """`sleep`, holding CUDA memory from load() on, so the worker has GPU memory to report.
    Workers load it as `scripts.bench_health:CudaSleep` (the repository root is on their path)."""

    def load(self) -> None:
        import torch

        self.hold = torch.empty(CUDA_HOLD_BYTES, dtype=torch.uint8, device=self.ctx.device)


def timed(fn, n: int) -> tuple[list, list]:
    """n calls of fn(); (latencies in ms, answers)."""
    lat, answers = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        answers.append(fn())
        lat.append((time.perf_counter() - t0) * 1000)
    return lat, answers


def both_at_once(address: str, calls: int) -> dict:
    """health and status from two threads at the same time: {kind: (latencies, answers)}."""
    out: dict = {}
    clients = {kind: Client(address, timeout=30) for kind in ("health", "status")}

    def run(kind: str) -> None:
        out[kind] = timed(getattr(clients[kind], kind), calls)

    threads = [threading.Thread(target=run, args=(k,)) for k in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients.values():
        c.close()
    return out


def all_busy(answer: dict, kind: str) -> bool:
    pool = answer["pools"]["sleep"]
    ws = pool["workers"].values() if kind == "health" else pool["workers"]
    return all(w["state"] == "busy" for w in ws)


def fill_credits(client: Client, sleep_s: float) -> list:
    workers = client.status()["pools"]["sleep"]["workers"]
    ms = int(sleep_s * 1000)
    jobs = [client.submit("sleep", {"ms": ms}) for w in workers for _ in range(w["capacity"])]
    deadline = time.monotonic() + 60
    while not all(w["state"] == "busy" and w["inflight"] == w["capacity"]
                  for w in client.status()["pools"]["sleep"]["workers"]):
        if time.monotonic() > deadline:
            sys.exit("workers did not all become busy within 60 s")
        time.sleep(0.02)
    return jobs


def gpu_metrics(url: str) -> list:
    with urllib.request.urlopen(url, timeout=10) as r:
        return [line for line in r.read().decode().splitlines() if line.startswith("orchestrator_gpu_memory")]


def metrics_url(server: Serve) -> str:
    return next(line.split()[1] for line in server.log().splitlines() if line.startswith("metrics: "))


def wait_for_stats(client: Client, gpu: bool, timeout: float = 15.0) -> dict:
    """Status once every worker has reported its resources (stats ride every 4th heartbeat)."""
    deadline = time.monotonic() + timeout
    while True:
        st = client.status()
        ws = st["pools"]["sleep"]["workers"]
        if all(w["rss_bytes"] and (w["gpu_memory"] or not gpu) for w in ws) or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def row(scenario: str, kind: str, lat: list, busy: int) -> dict:
    return {"scenario": scenario, "op": kind, "n": len(lat), "p50_ms": round(pct(lat, 50), 3),
            "p99_ms": round(pct(lat, 99), 3), "max_ms": round(max(lat), 3), "answered_all_busy": busy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="CPU workers (without --devices)")
    ap.add_argument("--devices", help="GPU ids, one CudaSleep worker each (instead of CPU workers)")
    ap.add_argument("--sleep-s", type=float, default=10.0)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", help="results JSON (also written under $OUT when set)")
    args = ap.parse_args()
    rows = []
    devices = args.devices or f"cpu:{args.workers}"
    handler = "scripts.bench_health:CudaSleep" if args.devices else "sleep"
    serve_args = ["--handler", handler, "--pool", "sleep", "--devices", devices, "--metrics-port", "0"]
    with Serve(serve_args) as server:
        client = Client(server.address, timeout=30)
        for kind, (lat, answers) in both_at_once(server.address, args.calls).items():
            rows.append(row("idle", kind, lat, sum(all_busy(a, kind) for a in answers)))
        jobs = fill_credits(client, args.sleep_s)
        t0 = time.monotonic()
        for kind, (lat, answers) in both_at_once(server.address, args.calls).items():
            rows.append(row("all busy", kind, lat, sum(all_busy(a, kind) for a in answers)))
        window = time.monotonic() - t0
        st = wait_for_stats(client, gpu=bool(args.devices))
        table, gpu = render_status(st), gpu_metrics(metrics_url(server))
        finished = sum(1 for j in jobs if j.result(timeout=args.sleep_s + 60))
        client.close()
    print(fmt_table(["SCENARIO", "OP", "N", "P50 ms", "P99 ms", "MAX ms", "ANSWERED WHILE ALL BUSY"],
                    [[r["scenario"], r["op"], r["n"], f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['max_ms']:.2f}", r["answered_all_busy"]] for r in rows]))
    print(f"\nstatus while busy:\n{table}\n")
    print("\n".join(gpu) or "no orchestrator_gpu_memory_* metrics (CPU workers)")
    busy_p99 = max(r["p99_ms"] for r in rows if r["scenario"] == "all busy")
    verdict = "PASS" if busy_p99 < TARGET_P99_MS else "FAIL"
    print(f"\n{len(jobs)} sleep jobs of {args.sleep_s:g} s on workers {devices} ({finished} finished); "
          f"calls took {window:.2f} s. Busy p99 {busy_p99:.2f} ms vs target < {TARGET_P99_MS:g} ms: "
          f"{verdict}")
    record = {"bench": "health", "target_p99_ms": TARGET_P99_MS, "verdict": verdict, "rows": rows,
              "gpu_metrics": gpu, "args": vars(args),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version()},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for path in write_json(record, args.out, "bench_health.json"):
        print(f"wrote {path}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
