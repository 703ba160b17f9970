"""The Ray cluster as the coordinator sees it: joining it, its nodes, and whether pools can ever fit.

Imported only in Ray mode. `Demand` says what one slot asks for; `RayCluster.check_fits` turns "too few
resources" into one readable line naming what was asked and what each node has.
"""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

log = logging.getLogger("orchestrator.ray")


@dataclass(frozen=True)
class Demand:
    """What one slot asks of the cluster: `ranks` bundles of one `resource` each, on one node."""

    slot: str
    resource: str  # "GPU" or "CPU"
    ranks: int

    def bundles(self) -> list[dict]:
        return [{self.resource: 1} for _ in range(self.ranks)]


def resource_of(device_kind: str) -> str:
    """Ray resource for a pool's device kind (placement.DeviceSet.kind).

    >>> resource_of("ray-gpu"), resource_of("ray-cpu")
    ('GPU', 'CPU')
    """
    return {"ray-gpu": "GPU", "ray-cpu": "CPU"}[device_kind]


def too_few(demands: list[Demand], cluster: str) -> str:
    """The error line for pools the cluster cannot hold.

    >>> too_few([Demand("a/0", "GPU", 2), Demand("a/1", "GPU", 2)], "1 node(s): ...")
    'the Ray cluster has too few resources: asked for 2 slot(s) of 2 GPU on one node; the cluster has 1 node(s): ...'
    """
    asked: dict[tuple, int] = {}
    for d in demands:
        asked[(d.resource, d.ranks)] = asked.get((d.resource, d.ranks), 0) + 1
    what = ", ".join(f"{n} slot(s) of {k} {res} on one node" for (res, k), n in asked.items())
    return f"the Ray cluster has too few resources: asked for {what}; the cluster has {cluster}"


def fits(demands: list[Demand], nodes: dict) -> bool:
    """Whether each slot can have its own place on one node (largest groups first; node totals).

    >>> nodes = {"a": {"GPU": 2, "CPU": 2}, "b": {"GPU": 2, "CPU": 2}}
    >>> fits([Demand("s/0", "GPU", 2)] * 2, nodes), fits([Demand("s/0", "GPU", 3)], nodes)
    (True, False)
    """
    free = {nid: dict(n) for nid, n in nodes.items()}
    for d in sorted(demands, key=lambda d: -d.ranks):
        fit = next((nid for nid, n in free.items() if n[d.resource] >= d.ranks), None)
        if fit is None:
            return False
        free[fit][d.resource] -= d.ranks
    return True


class RayCluster:
    """Construct cheaply; `connect()` joins the cluster as a driver and returns the `ray` module."""

    def __init__(self, address: str, forward_output: bool = True):
        self.address = address  # "auto" or HOST:PORT
        # Ray prints the actors' output (the workers' lines) on our stderr, as plain text; with JSON logs
        # it stays in the nodes' Ray logs, and each exit still quotes the worker's last lines.
        self.forward_output = forward_output
        self.ray = None

    def connect(self):
        import ray

        self._check_reachable()
        try:
            # Not detached: the actors fate-share with this driver. When the coordinator dies, Ray ends
            # its job and kills them (and they their workers).
            ray.init(address=self.address, namespace="orchestrator", log_to_driver=self.forward_output,
                     logging_level=logging.WARNING, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ValueError(f"cannot join the Ray cluster at {self.address!r}: {e}") from None
        self.ray = ray
        log.info("joined Ray cluster %s: %s", self.address, self.describe())
        return ray

    def _check_reachable(self, timeout: float = 5.0) -> None:
        """Fail fast on a HOST:PORT nobody listens on (ray.init would retry for minutes)."""
        if self.address == "auto":
            return
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--ray {self.address!r}: use auto or HOST:PORT")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        except OSError as e:
            raise ValueError(f"cannot reach the Ray cluster at {self.address}: {e}") from None

    def node_address(self) -> str:
        """This host's address on the Ray network (where remote workers can reach us)."""
        return self.ray.util.get_node_ip_address()

    def nodes(self) -> dict[str, dict]:
        """Alive nodes: node id -> {"host", "GPU", "CPU"} totals."""
        out = {}
        for n in self.ray.nodes():
            if n.get("Alive"):
                res = n.get("Resources", {})
                out[n["NodeID"]] = {"host": n.get("NodeManagerAddress"), "GPU": int(res.get("GPU", 0)),
                                    "CPU": int(res.get("CPU", 0))}
        return out

    def describe(self) -> str:
        nodes = self.nodes()
        parts = [f"node {nid[:8]} ({n['host']}): {n['GPU']} GPU, {n['CPU']} CPU" for nid, n in nodes.items()]
        return f"{len(nodes)} node(s): " + "; ".join(parts)

    def too_few(self, demands: list[Demand]) -> str:
        return too_few(demands, self.describe())

    def check_fits(self, demands: list[Demand]) -> None:
        """Raise ValueError when the cluster's nodes, as they are, can never hold these slots (each on
        one node), naming what was asked and what the cluster has."""
        if not fits(demands, self.nodes()):
            raise ValueError(self.too_few(demands))
