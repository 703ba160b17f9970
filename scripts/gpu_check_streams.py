#!/usr/bin/env python
"""GPU checks of the worker's stream discipline (worker/streams.py).

  threads   A second thread inside a worker entering torch.cuda.stream(s) leaves the compute thread's
            current stream alone; no worker module holds a stream in a global (seed bug 001).
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
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.streams import (  # noqa: E402
    ComputeStreams, PoolExhausted, StreamOps, TicketGroup, TransferPool, host_alloc,
)

CHECKS = ("threads", "enqueue", "failure", "stale")


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


# check 1: threads


def check_threads(torch, device, check: Check) -> None:
    streams = ComputeStreams(device)
    pool = TransferPool(device, max_streams=4, buffer_bytes=1 << 16).start()
    other = torch.cuda.Stream(device)
    entered, release, seen = threading.Event(), threading.Event(), {}

    def second_thread():
        try:
            with torch.cuda.stream(other):
                seen["inside"] = torch.cuda.current_stream(device)
                x = torch.ones(4096, device=device)  # queued on `other`
                seen["copy_ok"] = bool((pool.to_host(x, compute_stream=other) == 1).all())
                seen["its_compute"] = streams.get()
                entered.set()
                release.wait(10)
            seen["after"] = torch.cuda.current_stream(device)
        except Exception as e:
            seen["error"] = repr(e)
        finally:
            entered.set()

    with streams.use() as mine:
        before = torch.cuda.current_stream(device)
        thread = threading.Thread(target=second_thread)
        thread.start()
        entered.wait(10)
        during = [torch.cuda.current_stream(device) for _ in range(1000)]
        y = torch.full((4096,), 2.0, device=device)  # queued on `mine`
        mine_copy_ok = bool((pool.to_host(y, compute_stream=mine) == 2).all())
        release.set()
        thread.join(10)
        after = torch.cuda.current_stream(device)
    globals_with_streams = module_streams(torch) + source_stream_globals()
    patched = torch.cuda.set_stream.__module__ != "torch.cuda"
    default = torch.cuda.default_stream(device)
    n = check.numbers
    n.update({
        "compute_stream": hex(mine.cuda_stream), "other_thread_stream": hex(other.cuda_stream),
        "before_is_compute": before == mine,
        "samples_while_other_inside": len(during),
        "samples_not_compute": sum(s != mine for s in during),
        "after_is_compute": after == mine,
        "other_thread_saw_its_stream": seen.get("inside") == other,
        "other_thread_back_to_default": seen.get("after") == default,
        "other_thread_compute_stream_differs": seen.get("its_compute") not in (None, mine),
        "copies_ok": bool(seen.get("copy_ok")) and mine_copy_ok,
        "worker_globals_holding_streams": globals_with_streams,
        "torch_set_stream_patched": patched,
    })
    if "error" in seen:
        check.notes.append(f"second thread raised: {seen['error']}")
    bools = [k for k, v in n.items() if isinstance(v, bool) and k != "torch_set_stream_patched"]
    check.passed = (all(n[k] for k in bools) and n["samples_not_compute"] == 0
                    and not globals_with_streams and not patched)
    pool.close()


def module_streams(torch) -> list:
    """`module.name` of every stream held at module level in a loaded worker module."""
    kinds = tuple(k for k in (getattr(torch, "Stream", None), torch.cuda.Stream) if k is not None)
    found = []
    for name, module in list(sys.modules.items()):
        if name == "worker" or name.startswith("worker."):
            found += [f"{name}.{k}" for k, v in vars(module).items() if isinstance(v, kinds)]
    return found


def source_stream_globals() -> list:
    """`path:line` of every `global ...stream...` or `set_stream =` in worker/ (the seed-001 shape)."""
    pattern = re.compile(r"^\s*global\s+.*stream|set_stream\s*=", re.IGNORECASE)
    return [f"{path.relative_to(ROOT)}:{i}" for path in sorted((ROOT / "worker").rglob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]


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


def run_pool(torch, ctx, pool, fence: bool) -> dict:
    n, rows, compute = ctx["n"], ctx["rows"], ctx["compute"]
    tickets = [None] * n
    done = ctx["kernel"].run(compute, ctx["seconds"])
    if fence:
        with pool.fence(compute) as f:
            def enqueue_one(i):
                tickets[i] = pool.to_host_async(rows[i], fence=f)
            times, total = timed(n, enqueue_one)
    else:
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
        "pool: stream per transfer, one fence": lambda: run_pool(torch, ctx, pool, fence=True),
        "pool: stream per transfer, event per transfer": lambda: run_pool(torch, ctx, pool, False),
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
    pool = check.numbers["pool: stream per transfer, one fence"]
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
    per_event = check.numbers["pool: stream per transfer, event per transfer"]
    check.notes.append(f"pool with an event per transfer on the compute stream (informational): "
                       f"p99 {per_event['p99_us']} us, max {per_event['max_us'] / 1e3:.1f} ms, kernel "
                       f"running after enqueue: {per_event['kernel_running_after_enqueue']}")


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

    def job_fails():
        with TicketGroup() as group:
            kernel.run(compute, 0.3)
            for _ in range(4):
                group.add(pool.to_host_async(x, compute_stream=compute))
            for _ in range(2):
                group.add(pool.to_device(torch.ones(4096), compute_stream=compute)[1])
            raise ValueError("job failed with 6 transfers in flight")

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
    scenario("job raises with transfers in flight", job_fails, "ValueError", 0)
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
        "threads": lambda c: check_threads(torch, device, c),
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
