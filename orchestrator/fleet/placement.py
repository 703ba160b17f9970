"""Device placement: pure functions from a device spec to per-worker device sets.

Nothing here starts CUDA: GPUs are counted with nvidia-smi or /proc, so the coordinator stays torch-free.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

CPU = "cpu"
RAY_KINDS = {"ray": ("ray-gpu", "ray"), "ray-cpu": ("ray-cpu", "raycpu")}  # spec prefix -> (kind, id prefix)


@dataclass(frozen=True)
class DeviceSet:
    """The devices a pool may use. `kind` is "gpu" (ids are CUDA_VISIBLE_DEVICES entries) or "cpu"
    (ids are virtual slot names "cpu0", "cpu1"... that bind no GPU); or, in Ray mode, "ray-gpu" /
    "ray-cpu" (virtual ids "ray0"... / "raycpu0"...: Ray picks the node and the devices at start)."""

    kind: str
    ids: tuple

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def on_ray(self) -> bool:
        return self.kind.startswith("ray-")


def visible_gpus(environ: dict | None = None) -> list[str]:
    """GPU ids this process may use: the inherited CUDA_VISIBLE_DEVICES if set, else all GPUs found.

    >>> visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"})
    ['2', '3']
    >>> visible_gpus({"CUDA_VISIBLE_DEVICES": ""})
    []
    """
    env = os.environ if environ is None else environ
    inherited = env.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:
        return [d.strip() for d in inherited.split(",") if d.strip() and d.strip() != "-1"]
    return [str(i) for i in range(count_gpus())]


def count_gpus() -> int:
    """Number of NVIDIA GPUs, without importing torch or initialising CUDA."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
            return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def parse_devices(spec: str, environ: dict | None = None, default_cpu: int = 2) -> DeviceSet:
    """Parse a device spec: "auto", "cpu:N", explicit GPU ids "0,1,2,3", or on a Ray cluster "ray:N"
    (N GPUs) and "ray-cpu:N" (N CPU slots).

    >>> parse_devices("cpu:3")
    DeviceSet(kind='cpu', ids=('cpu0', 'cpu1', 'cpu2'))
    >>> parse_devices("0,1, 3")
    DeviceSet(kind='gpu', ids=('0', '1', '3'))
    >>> parse_devices("auto", {"CUDA_VISIBLE_DEVICES": "4,5"})
    DeviceSet(kind='gpu', ids=('4', '5'))
    >>> parse_devices("auto", {"CUDA_VISIBLE_DEVICES": ""}, default_cpu=2)
    DeviceSet(kind='cpu', ids=('cpu0', 'cpu1'))
    >>> parse_devices("ray:2"), parse_devices("ray-cpu:1")
    (DeviceSet(kind='ray-gpu', ids=('ray0', 'ray1')), DeviceSet(kind='ray-cpu', ids=('raycpu0',)))
    """
    spec = spec.strip()
    prefix, _, count = spec.partition(":")
    if prefix in RAY_KINDS:
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"bad device spec {spec!r}: {prefix}:N needs N >= 1")
        kind, id_prefix = RAY_KINDS[prefix]
        return DeviceSet(kind, tuple(f"{id_prefix}{i}" for i in range(int(count))))
    if spec == "auto":
        gpus = visible_gpus(environ)
        return DeviceSet("gpu", tuple(gpus)) if gpus else _cpu_slots(default_cpu)
    if spec == CPU:
        return _cpu_slots(1)
    if spec.startswith("cpu:"):
        n = spec[4:]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"bad device spec {spec!r}: cpu:N needs N >= 1")
        return _cpu_slots(int(n))
    ids = [p.strip() for p in spec.split(",") if p.strip()]
    if not ids or not all(i.isdigit() for i in ids):
        raise ValueError(f"bad device spec {spec!r}: use 'auto', 'cpu:N' or GPU ids like '0,1'")
    if len(set(ids)) != len(ids):
        raise ValueError(f"bad device spec {spec!r}: a GPU id is repeated")
    return DeviceSet("gpu", tuple(ids))


def _cpu_slots(n: int) -> DeviceSet:
    return DeviceSet(CPU, tuple(f"cpu{i}" for i in range(n)))


def assign(devices: list | tuple, tp: int = 1, workers_per_device: int = 1) -> list[tuple]:
    """Split devices into worker slots: one per device, per group of `tp` devices, or
    `workers_per_device` per device.

    >>> assign(["0", "1", "2", "3"], tp=2)
    [('0', '1'), ('2', '3')]
    >>> assign(["0", "1"], workers_per_device=2)
    [('0',), ('0',), ('1',), ('1',)]
    >>> assign(["0", "1", "2"], tp=2)
    Traceback (most recent call last):
    ...
    ValueError: tp=2 needs a multiple of 2 devices, got 3: ['0', '1', '2']
    """
    if tp < 1 or workers_per_device < 1:
        raise ValueError(f"tp and workers_per_device must be >= 1 (tp={tp}, "
                         f"workers_per_device={workers_per_device})")
    if tp > 1 and workers_per_device > 1:
        raise ValueError("workers_per_device > 1 cannot be combined with tp > 1")
    devices = list(devices)
    if len(devices) % tp:
        raise ValueError(f"tp={tp} needs a multiple of {tp} devices, got {len(devices)}: {devices}")
    groups = [tuple(devices[i:i + tp]) for i in range(0, len(devices), tp)]
    return [g for g in groups for _ in range(workers_per_device)]


def check_replicas(slots: int, replicas: int, tp: int, devices: DeviceSet) -> None:
    """Raise a ValueError naming the numbers when `replicas` slots do not fit the device set.

    >>> check_replicas(2, 3, 2, DeviceSet("gpu", ("0", "1", "2", "3")))
    Traceback (most recent call last):
    ...
    ValueError: 3 replicas with tp=2 need 6 devices; the pool has 4 (0,1,2,3), room for 2
    """
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, got {replicas}")
    if replicas > slots:
        raise ValueError(f"{replicas} replicas with tp={tp} need {replicas * tp} devices; the pool has "
                         f"{len(devices)} ({','.join(devices.ids)}), room for {slots}")


def split_cores(cores: list[int], n: int) -> list[list[int]]:
    """Split CPU cores across n workers as evenly as possible; with fewer cores than workers,
    workers share cores round-robin.

    >>> split_cores([0, 1, 2, 3], 2)
    [[0, 1], [2, 3]]
    >>> split_cores([0, 1], 3)
    [[0], [1], [0]]
    """
    if n <= 0:
        return []
    if len(cores) < n:
        return [[cores[i % len(cores)]] for i in range(n)]
    size, extra = divmod(len(cores), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(cores[start:end])
        start = end
    return out


def pool_cores(cores: list[int], ranks: dict[str, int]) -> dict[str, list[list[int]]]:
    """The CPU-core split: one share of `cores` per rank each pool can ever run, in pool order.

    `ranks` maps each pool to its rank capacity (device groups x tp). Shares are fixed per slot index,
    so a slot gets the same cores whether it starts with the server or later by scale-up, and never
    cores given to another pool (unless there are fewer cores than ranks: then shares repeat, as in
    `split_cores`). Slot i of a tp-k pool takes shares i*k .. i*k+k-1.

    >>> pool_cores([0, 1, 2, 3, 4, 5, 6, 7], {"a": 2, "b": 4})
    {'a': [[0, 1], [2, 3]], 'b': [[4], [5], [6], [7]]}
    >>> pool_cores([0, 1], {"a": 2, "b": 1})
    {'a': [[0], [1]], 'b': [[0]]}
    """
    shares = split_cores(cores, max(sum(ranks.values()), 1))
    out, k = {}, 0
    for pool, n in ranks.items():
        out[pool] = shares[k:k + n]
        k += n
    return out


def available_cores() -> list[int]:
    """Cores this process may run on (its affinity), or all cores where affinity is unsupported."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def cuda_visible(devices: tuple) -> str:
    """CUDA_VISIBLE_DEVICES value for a worker slot; "" hides every GPU from CPU workers.

    >>> cuda_visible(("2", "3")), cuda_visible(("cpu0",)), cuda_visible(("ray0",))
    ('2,3', '', '')
    """
    # Virtual ids bind no GPU here (Ray-placed slots get theirs from Ray); real ids may be UUIDs.
    return ",".join(d for d in devices if not d.startswith((CPU, "ray")))
