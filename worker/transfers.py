"""Host<->device copies of job payloads: what `ctx.to_device(array)` and `ctx.to_host(tensor)` do.

A CUDA worker copies through a `worker.streams.TransferPool`: each copy on a pooled stream of its own,
ordered against the calling thread's current compute stream by events, so a copy neither waits behind
unrelated kernels on the default stream nor reads a tensor before the kernel that writes it is done. A
CPU worker (or a worker given GPU ids on a machine without CUDA, as in the placement tests) converts in
place: numpy <-> torch share memory there, so there is nothing to copy.

torch is imported lazily: a worker whose handler never touches tensors (echo) never loads it.
"""
from __future__ import annotations

import logging
import sys
import threading

from protocol.codec import NDArray

log = logging.getLogger("worker.transfers")


def as_numpy(array):
    """An NDArray (a job input decoded from the wire) or anything numpy accepts, as a writable array
    (torch warns on, and may not write into, the read-only view np.frombuffer gives)."""
    import numpy as np

    a = array.to_numpy() if isinstance(array, NDArray) else np.asarray(array)
    return a if a.flags.writeable else a.copy()


def _host_array(tensor):
    """A host tensor as numpy; bfloat16 (no numpy dtype) widens to float32."""
    import torch

    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.detach().numpy()


class Transfers:
    """The interface `WorkerContext` delegates to. `start()` may be slow; `close()` waits for copies."""

    def start(self) -> None:
        """Create what copies need, if the handler's load brought torch in; otherwise on first use."""

    def to_device(self, array):
        raise NotImplementedError

    def to_host(self, tensor):
        raise NotImplementedError

    def stats(self) -> dict | None:
        return None

    def close(self) -> None:
        """Wait for copies in flight and release what `start` made."""


class HostTransfers(Transfers):
    """CPU worker: plain conversions, counted so that a test can see the API was used."""

    def __init__(self):
        self.count = 0

    def to_device(self, array):
        import torch

        self.count += 1
        return torch.from_numpy(as_numpy(array))

    def to_host(self, tensor):
        self.count += 1
        return _host_array(tensor.cpu())

    def stats(self) -> dict:
        return {"kind": "host", "transfers": self.count}


class DeviceTransfers(Transfers):
    """CUDA worker: copies through a TransferPool on `device` (pooled streams, events, pinned buffers).
    Construct cheaply; the pool is made by `start()` after the handler loaded torch, or on first use."""

    def __init__(self, device: str, max_streams: int = 8, buffer_bytes: int = 1 << 20):
        self.device = device
        self.max_streams, self.buffer_bytes = max_streams, buffer_bytes
        self._pool = None
        self._fallback: HostTransfers | None = None  # GPU ids on a machine without CUDA (CPU tests)
        self._lock = threading.Lock()

    def start(self) -> None:
        if "torch" in sys.modules:
            self._ready()

    def _ready(self):
        with self._lock:
            if self._pool is None and self._fallback is None:
                import torch

                from worker.streams import TransferPool

                if torch.cuda.is_available():
                    self._pool = TransferPool(self.device, max_streams=self.max_streams,
                                              buffer_bytes=self.buffer_bytes).start()
                else:
                    log.info("no CUDA on this machine: %s copies are plain conversions", self.device)
                    self._fallback = HostTransfers()
            return self._pool or self._fallback

    def to_device(self, array):
        import torch

        pool = self._ready()
        if pool is self._fallback:
            return pool.to_device(array)
        host = torch.from_numpy(as_numpy(array))
        # The compute stream waits for the copy on the device, so the caller may use the tensor at once;
        # the ticket (the staging buffer) is finished by a later reap, once the copy is done.
        out, _ticket = pool.to_device(host, compute_stream=torch.cuda.current_stream(self.device))
        return out

    def to_host(self, tensor):
        import torch

        pool = self._ready()
        if pool is self._fallback:
            return pool.to_host(tensor)
        if tensor.device.type == "cpu":
            return _host_array(tensor)
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        host = pool.to_host(tensor, compute_stream=torch.cuda.current_stream(tensor.device)).numpy()
        # Every copy this thread issued before is done now (the compute stream waited on its inputs):
        # give their streams and buffers back instead of holding them until the pool runs short.
        pool.reap()
        return host

    def stats(self) -> dict | None:
        if self._fallback is not None:
            return self._fallback.stats()
        return None if self._pool is None else {"kind": "cuda", **self._pool.stats()}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


def make_transfers(device: str) -> Transfers:
    return DeviceTransfers(device) if device.startswith("cuda") else HostTransfers()
