"""The worker's transfer path on a GPU: ctx.to_device/to_host (worker/transfers.py) over the TransferPool
(worker/streams.py), through a real worker and in this process. The host enqueue times behind a long kernel
are in docs/benchmarks.md ("Stream discipline"); here only what must hold."""
from __future__ import annotations

import ctypes
import os

import pytest

from worker.streams import PoolExhausted, StreamOps, TransferPool, host_alloc
from tests.conftest import poll_until

# As in GPU workers (orchestrator/fleet/slots.py): with the default 8 hardware queues the host blocked at
# transfer 4,084 of 10,000 behind a long kernel; with 32 it never did.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

pytestmark = [pytest.mark.gpu(gpus=1, dry_run=False), pytest.mark.slow]

ROUND_TRIP = "tests.handlers_for_tests:DeviceRoundTrip"
ROUND_TRIPS = 200


@pytest.fixture(scope="module")
def torch():
    import torch

    return torch


@pytest.fixture(scope="module")
def device(torch):
    return torch.device("cuda:0")


class LongKernel:
    """torch.cuda._sleep calibrated in seconds; `run` queues it (then optional writes) on a stream."""

    def __init__(self, torch, device):
        self.torch = torch
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


@pytest.fixture(scope="module")
def kernel(torch, device):
    return LongKernel(torch, device)


def all_free(pool: TransferPool) -> bool:
    s = pool.stats()
    return (s["streams_free"] == s["streams_total"] and s["events_free"] == s["events_total"]
            and s["buffers_free"] == s["buffers_total"] and s["in_flight"] == 0)


# ------------------------------------------------------------------------------ through a real worker


def test_round_trips_through_a_gpu_worker_are_exact_and_return_the_pool(serve, tmp_path):
    import numpy as np

    config = tmp_path / "serve.toml"
    config.write_text(f'[pools.rt]\nhandler = "{ROUND_TRIP}"\ndevices = "0"\n'
                      '\n[pools.embed_gpu]\nhandler = "embed"\ndevices = "0"\n'
                      '\n[pools.embed_cpu]\nhandler = "embed"\ndevices = "cpu:1"\n')
    server = serve(["--config", str(config)], timeout=300)
    client = server.client(timeout=120)
    rng = np.random.default_rng(2)
    for i in range(ROUND_TRIPS):
        x = rng.standard_normal((256, 1024)).astype(np.float32)
        # Every 4th job's y is written behind a sleep kernel: a copy that did not wait would read it early.
        out = client.run("rt", {"x": x, "delay_cycles": 20_000_000 if i % 4 == 0 else 0}, timeout=120)
        assert out["device"].startswith("cuda")
        np.testing.assert_array_equal(out["y"].to_numpy(), x * 2 + 1)

    def counted(pool: str, at_least: int):
        stats = server.workers(pool)[0]["ranks"][0]["transfers"]  # rides every few heartbeats
        return stats if stats and stats.get("transfers", 0) >= at_least and stats["in_flight"] == 0 else None

    stats = poll_until(lambda: counted("rt", 2 * ROUND_TRIPS), 30, interval=0.5, what="the pool's counts")
    assert stats["kind"] == "cuda"
    assert stats["streams_free"] == stats["streams_total"] and stats["buffers_free"] == stats["buffers_total"]

    texts = [f"sentence number {i} about streams and copies" for i in range(64)]
    gpu = client.run("embed_gpu", {"texts": texts}, timeout=300)["embeddings"].to_numpy()
    cpu = client.run("embed_cpu", {"texts": texts}, timeout=300)["embeddings"].to_numpy()
    assert float(np.abs(gpu.astype(np.float32) - cpu).max()) < 1e-3
    poll_until(lambda: counted("embed_gpu", 1), 30, interval=0.5, what="embed outputs through the pool")


# ------------------------------------------------------------------------------------ in this process


class DedicatedStreams:
    """Streams of our own (cudaStreamCreate), so 10,000 transfers get 10,000 distinct streams;
    torch.cuda.Stream() would hand out the same 32 pool streams round-robin.

    They are never destroyed: torch's pinned-memory allocator remembers the streams that used a block
    and records events on them when the block is freed, possibly later. They die with the process.
    """

    def __init__(self, torch, device):
        self.torch, self.device = torch, device

    def new(self):
        handle = ctypes.c_void_p()
        with self.torch.cuda.device(self.device):
            err = self.torch.cuda.cudart().cudaStreamCreate(ctypes.addressof(handle))
        assert int(err) == 0, f"cudaStreamCreate failed with error {int(err)}"
        return self.torch.cuda.ExternalStream(handle.value, device=self.device)


def test_ten_thousand_transfers_queue_behind_a_long_kernel_without_blocking_the_host(torch, device, kernel):
    n, width, seconds = 10_000, 256, 3.0  # 1 KiB each
    compute = torch.cuda.Stream(device)
    with torch.cuda.stream(compute):
        src = torch.arange(n * width, dtype=torch.float32, device=device).view(n, width)
    compute.synchronize()
    rows, expected = list(src.unbind(0)), src.cpu()
    ops = StreamOps(DedicatedStreams(torch, device).new, torch.cuda.Event, torch.cuda.stream, host_alloc)
    pool = TransferPool(device, max_streams=n, buffer_bytes=width * 4, ops=ops, acquire_timeout=10 * seconds)
    pool.start()
    for row in rows[:64]:  # first calls pay for lazy initialisation
        pool.to_host_async(row, compute_stream=compute).wait()
    done = kernel.run(compute, seconds)
    tickets = [pool.to_host_async(row, compute_stream=compute) for row in rows]
    # Every transfer went in while the kernel still ran: no hardware queue filled up and blocked the host.
    assert not done.query()
    assert all(torch.equal(t.wait(), expected[i]) for i, t in enumerate(tickets))
    assert all_free(pool)
    pool.close()


def _exploding(torch, tensor):
    """`tensor` whose copy_ raises: a failure after the pool has taken a stream, events and a buffer."""

    class Exploding(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.copy_:
                raise RuntimeError("forced failure mid-transfer")
            return super().__torch_function__(func, types, args, kwargs or {})

    return tensor.as_subclass(Exploding)


def test_failed_abandoned_and_refused_transfers_return_everything_to_the_pool(torch, device, kernel):
    pool = TransferPool(device, max_streams=8, buffer_bytes=1 << 16).start()
    compute = torch.cuda.Stream(device)
    with torch.cuda.stream(compute):
        x = torch.ones(4096, device=device)
    compute.synchronize()

    with pytest.raises(RuntimeError, match="forced failure"):
        pool.to_host(_exploding(torch, x), compute_stream=compute)
    with pytest.raises(RuntimeError, match="forced failure"):
        pool.to_device(_exploding(torch, torch.ones(8)), compute_stream=compute)
    assert pool.stats()["failures"] == 2 and all_free(pool)

    for _ in range(8):
        pool.to_device(torch.ones(4096), compute_stream=compute)  # tickets dropped
    torch.cuda.synchronize(device)
    pool.reap()
    assert all_free(pool)

    pool.acquire_timeout = 0.2
    kernel.run(compute, 1.0)
    tickets = [pool.to_host_async(x, compute_stream=compute) for _ in range(8)]
    with pytest.raises(PoolExhausted):
        pool.to_host_async(x, compute_stream=compute)  # a 9th with 8 in flight
    for t in tickets:
        t.wait()
    assert all_free(pool) and pool.stats()["failures"] == 2
    pool.close()


def test_a_copy_waits_for_the_kernel_writing_its_source(torch, device, kernel):
    old, new, n, seconds = 1.0, 2.0, 1 << 20, 0.5
    compute = torch.cuda.Stream(device)
    with torch.cuda.stream(compute):
        src = torch.full((n,), old, device=device)
    compute.synchronize()
    pool = TransferPool(device, max_streams=4, buffer_bytes=n * 4).start()
    done = kernel.run(compute, seconds, then=lambda: src.fill_(new))
    ticket = pool.to_host_async(src, compute_stream=compute)
    assert not ticket.done() and not done.query()  # issued while the kernel still runs
    assert int((ticket.wait() != new).sum()) == 0
    pool.close()

    # The control: the same copy on a side stream that does not wait reads stale values, so the race is real.
    with torch.cuda.stream(compute):
        src.fill_(old)
    compute.synchronize()
    side = torch.cuda.Stream(device)
    while side == compute:  # torch's pool hands out 32 streams round-robin
        side = torch.cuda.Stream(device)
    host = torch.empty(n, dtype=torch.float32, pin_memory=True)
    kernel.run(compute, seconds, then=lambda: src.fill_(new))
    with torch.cuda.stream(side):
        host.copy_(src, non_blocking=True)
    side.synchronize()
    compute.synchronize()
    assert int((host != new).sum()) > 0
