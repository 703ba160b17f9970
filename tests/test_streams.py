"""CPU tests of TransferPool's bookkeeping, and of the handler transfer API through a real worker.

Only the CUDA stream and event objects are fakes (FakeCuda below); the pool, its buffers and the
copies are real torch code on CPU tensors. The fakes log every record, wait and copy in order.
tests/gpu/test_streams_gpu.py runs the same API through a real worker on a GPU.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import poll_until

from worker.streams import PoolExhausted, StreamOps, TransferPool, host_alloc

ROOT = Path(__file__).resolve().parents[1]


class FakeEvent:
    def __init__(self, cuda: FakeCuda, n: int):
        self.cuda, self.name, self.done = cuda, f"e{n}", True
        self.fail_record = self.fail_sync = False

    def record(self, stream):
        if self.fail_record:
            raise RuntimeError(f"injected: record of {self.name} failed")
        self.done = self.cuda.auto_complete
        self.cuda.log.append(("record", self.name, stream.name))

    def query(self) -> bool:
        return self.done

    def synchronize(self):
        if self.fail_sync:
            raise RuntimeError(f"injected: synchronize of {self.name} failed")
        self.done = True  # waiting on the host lasts until the work is done


class FakeStream:
    def __init__(self, cuda: FakeCuda, name: str):
        self.cuda, self.name, self.cuda_stream = cuda, name, id(self)

    def wait_event(self, event):
        self.cuda.log.append(("wait", self.name, event.name))

    def synchronize(self):
        self.cuda.log.append(("sync", self.name))


class FakeCuda:
    """Stands in for CUDA streams and events. `current` follows use_stream, as torch's does per thread."""

    def __init__(self, auto_complete: bool = True):
        self.auto_complete = auto_complete  # False: copies stay in flight until synchronize
        self.log: list[tuple] = []
        self.events: list[FakeEvent] = []
        self.streams = 0
        self.current = threading.local()

    def new_stream(self) -> FakeStream:
        self.streams += 1
        return FakeStream(self, f"s{self.streams}")

    def new_event(self) -> FakeEvent:
        self.events.append(FakeEvent(self, len(self.events)))
        return self.events[-1]

    @contextlib.contextmanager
    def use_stream(self, stream):
        prev = getattr(self.current, "stream", None)
        self.current.stream = stream
        self.log.append(("enter", stream.name))
        try:
            yield
        finally:
            self.current.stream = prev

    def ops(self) -> StreamOps:
        return StreamOps(self.new_stream, self.new_event, self.use_stream, host_alloc)

    def complete_all(self):
        for e in self.events:
            e.done = True


class LoggedTensor(torch.Tensor):
    """A real tensor that logs, as a copy source, which fake stream was current for the copy."""

    cuda: FakeCuda | None = None
    explode = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_ and cls.cuda is not None:
            stream = getattr(cls.cuda.current, "stream", None)
            cls.cuda.log.append(("copy", stream.name if stream else None))
            if cls.explode:
                raise RuntimeError("injected: copy failed mid-transfer")
        return super().__torch_function__(func, types, args, kwargs or {})


def logged(t: torch.Tensor, cuda: FakeCuda, explode: bool = False) -> torch.Tensor:
    cls = type("Logged", (LoggedTensor,), {"cuda": cuda, "explode": explode})
    return t.as_subclass(cls)


def make_pool(cuda: FakeCuda, **kw) -> TransferPool:
    kw.setdefault("max_streams", 4)
    kw.setdefault("buffer_bytes", 256)
    return TransferPool("cpu", pinned=False, ops=cuda.ops(), **kw).start()


def all_free(pool: TransferPool) -> bool:
    s = pool.stats()
    return (s["streams_free"] == s["streams_total"] and s["events_free"] == s["events_total"]
            and s["buffers_free"] == s["buffers_total"] and s["in_flight"] == 0)


@pytest.fixture
def cuda():
    return FakeCuda()


def test_import_does_not_import_torch():
    code = "import sys, worker.streams; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_constructor_is_cheap_and_start_creates_bounded_resources(cuda):
    pool = TransferPool("cpu", max_streams=3, pinned=False, ops=cuda.ops())
    assert cuda.streams == 0 and not cuda.events
    with pytest.raises(RuntimeError, match="start"):
        pool.to_host(torch.ones(2), compute_stream=FakeStream(cuda, "c"))
    pool.start()
    s = pool.stats()
    assert (s["streams_total"], s["events_total"], s["buffers_total"]) == (3, 6, 3)
    assert s["streams_distinct"] == 3 and all_free(pool)


def test_round_trip_values_and_everything_returned(cuda):
    pool = make_pool(cuda)
    compute = FakeStream(cuda, "compute")
    src = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # non-contiguous on purpose
    dev, ticket = pool.to_device(src, compute_stream=compute)
    assert torch.equal(ticket.wait(), src) and dev is ticket.wait()
    back = pool.to_host(dev, compute_stream=compute)
    assert torch.equal(back, src) and back.dtype == src.dtype
    for _ in range(pool.stats()["buffers_total"]):  # reuse every buffer with other values
        pool.to_host(torch.zeros_like(dev), compute_stream=compute)
    assert torch.equal(back, src)  # the result is the caller's own memory, not a pool buffer
    s = pool.stats()
    assert all_free(pool) and s["transfers"] == 2 + s["buffers_total"] and s["failures"] == 0


def test_d2h_copy_waits_on_compute_event_before_copying(cuda):
    pool = make_pool(cuda)
    compute = FakeStream(cuda, "compute")
    pool.to_host(logged(torch.ones(8), cuda), compute_stream=compute)
    kinds = [entry[0] for entry in cuda.log]
    assert kinds == ["record", "wait", "enter", "copy", "record"]
    (_, ready, on), (_, transfer, waited), _, (_, copied_on), (_, _, done_on) = cuda.log
    assert on == "compute" and waited == ready  # the event recorded on compute is the one waited on
    assert transfer == copied_on == done_on != "compute"  # copy runs on the transfer stream


def test_h2d_compute_stream_waits_for_the_copy(cuda):
    pool = make_pool(cuda)
    compute = FakeStream(cuda, "compute")
    src = logged(torch.arange(8.0), cuda)
    dev, ticket = pool.to_device(src, compute_stream=compute)
    assert torch.equal(ticket.wait(), torch.arange(8.0))
    # host staging copy; output allocated on compute; ready recorded there; the transfer stream
    # waits on it, copies (its context), records done; compute waits on done
    assert [e[:2] for e in cuda.log[:2]] == [("copy", None), ("enter", "compute")]
    assert [e[0] for e in cuda.log[2:]] == ["record", "wait", "enter", "record", "wait"]
    (_, transfer, ready), (_, copy_on), (_, done, done_on), (_, waiter, waited) = cuda.log[3:]
    assert ready == cuda.log[2][1] and cuda.log[2][2] == "compute"
    assert transfer == copy_on == done_on != "compute"
    assert waiter == "compute" and waited == done


def test_transfers_beyond_max_streams_block_then_time_out(cuda):
    cuda.auto_complete = False
    pool = make_pool(cuda, max_streams=2, acquire_timeout=0.2)
    compute = FakeStream(cuda, "compute")
    tickets = [pool.to_host_async(torch.ones(4), compute_stream=compute) for _ in range(2)]
    t0 = time.monotonic()
    with pytest.raises(PoolExhausted, match=r"2 transfers in flight \(max_streams=2\)"):
        pool.to_host_async(torch.ones(4), compute_stream=compute)
    assert time.monotonic() - t0 >= 0.19
    s = pool.stats()
    assert s["in_flight"] == 2 and s["streams_free"] == 0 and s["streams_total"] == 2
    assert cuda.streams == 2  # exhausting the pool never creates a stream
    for t in tickets:
        t.wait()
    assert all_free(pool)


def test_blocked_acquire_resumes_when_another_thread_finishes_a_ticket(cuda):
    cuda.auto_complete = False
    pool = make_pool(cuda, max_streams=1, acquire_timeout=5.0)
    compute = FakeStream(cuda, "compute")
    first = pool.to_host_async(torch.ones(4), compute_stream=compute)
    got = []
    waiter = threading.Thread(target=lambda: got.append(
        pool.to_host_async(torch.full((4,), 2.0), compute_stream=compute)))
    waiter.start()
    time.sleep(0.05)
    assert not got and waiter.is_alive()
    first.wait()
    waiter.join(timeout=5)
    assert got and torch.equal(got[0].wait(), torch.full((4,), 2.0)) and all_free(pool)


def test_abandoned_tickets_are_reaped_once_done(cuda):
    cuda.auto_complete = False
    pool = make_pool(cuda, max_streams=2, acquire_timeout=2.0)
    compute = FakeStream(cuda, "compute")
    kept = pool.to_host_async(torch.full((3,), 7.0), compute_stream=compute)
    pool.to_device(torch.ones(3), compute_stream=compute)  # ticket dropped on purpose
    assert pool.reap() == 0 and pool.stats()["in_flight"] == 2
    cuda.complete_all()
    # acquiring with the pool full finishes done tickets instead of waiting or creating streams
    pool.to_host(torch.ones(3), compute_stream=compute)
    assert pool.stats()["reaped"] == 2 and all_free(pool)
    assert torch.equal(kept.wait(), torch.full((3,), 7.0))  # value kept although reaped


def test_copy_failing_mid_transfer_returns_everything(cuda):
    pool = make_pool(cuda)
    compute = FakeStream(cuda, "compute")
    before = pool.stats()
    with pytest.raises(RuntimeError, match="copy failed mid-transfer"):
        pool.to_host(logged(torch.ones(8), cuda, explode=True), compute_stream=compute)
    after = pool.stats()
    assert all_free(pool) and after["failures"] == before["failures"] + 1
    assert ("sync", cuda.log[1][1]) in cuda.log  # transfer stream drained before reuse
    with pytest.raises(RuntimeError, match="copy failed"):
        pool.to_device(logged(torch.ones(8), cuda, explode=True), compute_stream=compute)
    assert all_free(pool) and pool.stats()["failures"] == 2


def test_event_record_failing_after_copy_returns_everything(cuda):
    pool = make_pool(cuda)
    for e in cuda.events:
        e.fail_record = True
    with pytest.raises(RuntimeError, match="record"):
        pool.to_host(torch.ones(8), compute_stream=FakeStream(cuda, "compute"))
    assert all_free(pool) and pool.stats()["failures"] == 1


def test_wait_failing_returns_everything_and_reraises(cuda):
    cuda.auto_complete = False
    pool = make_pool(cuda)
    ticket = pool.to_host_async(torch.ones(8), compute_stream=FakeStream(cuda, "compute"))
    for e in cuda.events:
        e.fail_sync = True
    for _ in range(2):  # the error stays with the ticket
        with pytest.raises(RuntimeError, match="synchronize"):
            ticket.wait()
    assert all_free(pool) and pool.stats()["failures"] == 1


def test_payload_larger_than_buffer_grows_a_buffer_without_adding_one(cuda):
    pool = make_pool(cuda, buffer_bytes=64)
    big = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(pool.to_host(big, compute_stream=FakeStream(cuda, "c")), big)
    assert pool.stats()["buffers_total"] == 4 and all_free(pool)


def test_close_drains_and_refuses_new_transfers(cuda):
    cuda.auto_complete = False
    pool = make_pool(cuda)
    ticket = pool.to_host_async(torch.ones(2), compute_stream=FakeStream(cuda, "c"))
    pool.close()
    assert ticket.done() and pool.stats()["in_flight"] == 0
    with pytest.raises(RuntimeError, match="closed"):
        pool.to_host(torch.ones(2), compute_stream=FakeStream(cuda, "c"))
    with pytest.raises(RuntimeError, match="from closed to started"):
        pool.start()


def test_no_module_level_stream_state():
    import worker.streams as ws

    names = [n for n, v in vars(ws).items() if "stream" in n.lower() and not callable(v)]
    assert names == [], f"module-level stream state: {names}"


# ----------------------------------------------------------------------------- the handler API, in a worker

ROUND_TRIP_TOML = """
[pools.cpu]
handler = "tests.handlers_for_tests:DeviceRoundTrip"
devices = "cpu:1"

[pools.gpuid]
handler = "tests.handlers_for_tests:DeviceRoundTrip"
devices = "0"
"""


@pytest.mark.slow
def test_ctx_to_device_and_to_host_round_trip_arrays_through_a_real_worker(serve, tmp_path):
    """ctx.to_device/to_host on a CPU worker, and on a worker given a GPU id on a machine without CUDA
    (its device is cuda:0 but it converts on the host): values exact, and the heartbeat's transfer counts
    (status, per rank) show that the API carried them."""
    import numpy as np

    config = tmp_path / "serve.toml"
    config.write_text(ROUND_TRIP_TOML)
    s = serve(["--config", str(config)], timeout=120)
    client = s.client(timeout=60)
    rng = np.random.default_rng(14)
    for pool in ("cpu", "gpuid"):
        for shape, dtype in (((3, 5), np.float32), ((7,), np.int64), ((2, 2, 2), np.float64)):
            x = (rng.standard_normal(shape) * 100).astype(dtype)
            out = client.run(pool, {"x": x}, timeout=60)
            assert out["device"] == "cpu"
            assert np.array_equal(out["y"].to_numpy(), x.astype(np.float32) * 2 + 1)

    def counted(pool):
        stats = s.workers(pool)[0]["ranks"][0]["transfers"]
        return stats if stats and stats["transfers"] >= 6 else None
    for pool in ("cpu", "gpuid"):
        stats = poll_until(lambda: counted(pool), 30, 0.1, f"{pool}: transfer counts in a heartbeat")
        assert stats == {"kind": "host", "transfers": 6}
