"""Resource figures a worker reports with its heartbeats (every few beats, from the control thread)."""
from __future__ import annotations

import os
import sys

import psutil

_PROC = psutil.Process()


def device_stats(devices: list) -> dict:
    """RSS plus, on GPU workers, memory used/total per device.

    NVML first: it needs no CUDA context, so the control thread never touches CUDA state that the
    compute thread owns. torch's counters are the fallback, read only once the handler started CUDA.
    """
    stats = {"rss_bytes": _PROC.memory_info().rss}
    gpus = [d for d in devices if not str(d).startswith("cpu")]
    if gpus:
        stats["gpu"] = _nvml_memory(gpus) or _torch_memory(len(gpus))
    return stats


def _nvml_memory(gpus: list) -> list | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        out = []
        for d in gpus:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(int(d)))
            out.append({"device": str(d), "used_bytes": int(info.used), "total_bytes": int(info.total)})
        return out
    except Exception:  # NVML missing from the driver image, or device index mismatch: fall back
        return None


def _torch_memory(n: int) -> list | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    out = []
    for i in range(n):
        free, total = torch.cuda.mem_get_info(i)
        out.append({"device": os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[i],
                    "used_bytes": int(total - free), "total_bytes": int(total),
                    "allocated_bytes": int(torch.cuda.memory_allocated(i))})
    return out
