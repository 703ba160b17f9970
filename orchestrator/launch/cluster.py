"""Where workers run: on this host (the local launcher, ipc worker socket), or in Ray mode on a Ray cluster
(the Ray launcher, and a TCP worker socket with CURVE keys made for the run).

Nothing here imports ray: launch/ray/ (which does) is imported only when the config asks for Ray mode,
so a coordinator without `--ray` never loads it.
"""
from __future__ import annotations

import os

from orchestrator.launch.base import Launcher
from orchestrator.security.curve import WorkerKeys


def make_launcher(cfg, run_dir: str, keys: WorkerKeys) -> Launcher:
    """Ray mode: a Ray launcher that has joined the cluster (ValueError if it cannot)."""
    from orchestrator.launch.ray.cluster import RayCluster
    from orchestrator.launch.ray.launcher import RayLauncher

    ray_cluster = RayCluster(cfg.ray, forward_output=cfg.log_format == "text")
    launcher = RayLauncher(ray_cluster, os.path.basename(run_dir), cfg.placement_timeout, keys.worker)
    launcher.connect()
    return launcher


def worker_bind_address(cfg, run_dir: str, launcher: Launcher) -> str:
    """The worker socket's bind address: the private ipc path, or in Ray mode TCP on a routable host
    (port 0: the kernel picks it, and the coordinator reads it back)."""
    if cfg.ray is None:
        return f"ipc://{run_dir}/workers.sock"
    return f"tcp://{cfg.worker_address or launcher.node_address()}:0"


def reserve(cfg, launcher: Launcher, pools: dict) -> None:
    """Ray mode: place every pool's first slots before any worker starts (all or none; ValueError
    names what was asked and what the cluster has). Locally: nothing to do."""
    if cfg.ray is None:
        return
    from orchestrator.launch.ray.cluster import Demand, resource_of

    demands = [Demand(f"{pool.name}/{i}", resource_of(pool.device_set.kind), pool.cfg.tp)
               for pool in pools.values() for i in range(pool.desired)]
    launcher.reserve(demands)
