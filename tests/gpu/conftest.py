"""GPU acceptance checks: `pytest -m gpu` on a GPU machine. Each test's `gpu(gpus=N)` marker says how many
GPUs it needs; with fewer visible it is skipped, so these stay in the default run at no cost on CPU.
`--gpu-dry-run` runs the tests that can on CPU workers with tiny models: their plumbing, not the GPU."""
from __future__ import annotations

import os

import pytest

from orchestrator.fleet.placement import visible_gpus
from orchestrator.fleet.slots import GPU_SAFE_ENV

# Before this process can start CUDA or NCCL: the same environment the coordinator gives its workers.
for _name, _value in {**GPU_SAFE_ENV, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}.items():
    os.environ.setdefault(_name, _value)


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("gpu")
    if marker is None:
        return
    if item.config.getoption("gpu_dry_run"):
        if not marker.kwargs.get("dry_run", True):
            pytest.skip("needs CUDA itself: no CPU dry run")
        return
    need, have = marker.kwargs.get("gpus", 1), len(visible_gpus())
    if have < need:
        pytest.skip(f"needs {need} GPU(s), found {have}")


@pytest.fixture(scope="session")
def on_gpu(request) -> bool:
    """False under --gpu-dry-run: pools then run on CPU slots, with tiny models."""
    return not request.config.getoption("gpu_dry_run")
