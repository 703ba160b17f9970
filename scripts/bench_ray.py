"""Ray mode against the local launcher, on a 2-node Ray cluster made on this machine (CPU only).

    python3 -m scripts.bench_ray [--jobs 2000] [--rounds 3] [--trials 3] [--json PATH]

The cluster is `ray.cluster_utils.Cluster`: a head with no resources and two nodes with 2 CPUs (and
2 fake GPUs) each, every process on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). Three figures:

1. dispatch: an echo job's round trip (p50, p99) and pipelined jobs/s (a window of 64) through a pool of
   one worker, `ray-cpu:1` (TCP + CURVE worker socket, worker started by a Ray actor) against `cpu:1`
   (ipc, a child process). Both servers run at once and are measured in alternating blocks, so that both
   see the same load; the ratio is the median of the per-round ratios. Goal: within 1.5x of local.
2. node loss: a `sleep` pool on `ray-cpu:4` (two workers per node) with jobs running on every worker;
   one node is removed (`Cluster.remove_node`). Detection: from the removal to the coordinator's "down"
   line for each lost slot (its reason says which signal got there first). Requeue: from the removal to
   the first retried job dispatched to a survivor. Then a node joins and the slots come back (re-place
   time). Goal: detection within 5 s.
3. cold start: `serve` launched until 4 echo workers are ready, `ray-cpu:4` against `cpu:4` (the Ray
   figure includes joining the cluster and placing 4 placement groups).

The machine is shared and loaded: figures move between runs; ratios measured in the same run are the
ones to read.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is imported: everything on loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from orchestrator import Client  # noqa: E402  (after the environment above: ray reads it on import)
from scripts._bench_common import (  # noqa: E402
    Serve, Steps, finish, fmt_table, pct, run_latency, run_pipelined, write_pools_toml,
)

PAYLOAD = {"x": 1}
NODE = {"num_cpus": 2, "num_gpus": 2}
SERVER = {"hb_timeout": 2.5, "drain_timeout": 10.0}  # the default heartbeat timeout: it is measured


def start_cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        c.add_node(**NODE)
    c.wait_for_nodes()
    return c


def serve(cluster, tmp: str, name: str, pools: dict, ray: bool) -> Serve:
    server = dict(SERVER)
    args = []
    if ray:
        args = ["--ray", cluster.address, "--worker-address", "127.0.0.1"]
    path = write_pools_toml(os.path.join(tmp, f"{name}.toml"), pools, server)
    return Serve(["--config", path, *args]).start(timeout=300)


# ------------------------------------------------------------------------------------------ dispatch


def dispatch(cluster, tmp: str, jobs: int, rounds: int) -> dict:
    pools = {"echo": {"handler": "echo"}}
    # Unpinned, as a Ray-placed worker is (remote workers get no CPU affinity): the same footing.
    local = serve(cluster, tmp, "local", {"echo": {**pools["echo"], "devices": "cpu:1", "cpu_affinity": False}},
                  ray=False)
    remote = serve(cluster, tmp, "ray", {"echo": {**pools["echo"], "devices": "ray-cpu:1"}}, ray=True)
    try:
        with Client(local.address) as cl, Client(remote.address) as cr:
            run_latency(cl, "echo", PAYLOAD, 200), run_latency(cr, "echo", PAYLOAD, 200)  # warm both paths
            per_round = []
            for _ in range(rounds):
                ll, rl = [], []
                for _ in range(max(1, jobs // 200)):  # alternating blocks: the same load on both
                    ll += run_latency(cl, "echo", PAYLOAD, 100)
                    rl += run_latency(cr, "echo", PAYLOAD, 100)
                lp, rp = run_pipelined(cl, PAYLOAD, jobs, 64), run_pipelined(cr, PAYLOAD, jobs, 64)
                per_round.append({"local_p50_us": pct(ll, 50) * 1e6, "ray_p50_us": pct(rl, 50) * 1e6,
                                  "local_p99_us": pct(ll, 99) * 1e6, "ray_p99_us": pct(rl, 99) * 1e6,
                                  "local_jobs_s": lp, "ray_jobs_s": rp})
    finally:
        local.close()
        remote.close()
    med = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
    med["p50_ratio"] = statistics.median(r["ray_p50_us"] / r["local_p50_us"] for r in per_round)
    med["jobs_s_ratio"] = statistics.median(r["local_jobs_s"] / r["ray_jobs_s"] for r in per_round)
    return {"rounds": per_round, "median": med}


# ----------------------------------------------------------------------------------------- node loss

_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?\] (.*)$")


def log_events(log: str, after: float) -> list:
    """(wall time, message) of the coordinator's log lines after `after` (time.time())."""
    out = []
    for line in log.splitlines():
        m = _LINE.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if t >= after - 0.001:
                out.append((t, m.group(2)))
    return out


def workers(client: Client) -> list:
    return client.status()["pools"]["sleep"]["workers"]


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout} s")
        time.sleep(0.05)
    return value


def node_loss(cluster, tmp: str, trials: int) -> dict:
    pools = {"sleep": {"handler": "sleep", "devices": "ray-cpu:4", "retries": 5, "capacity": 4}}
    s = serve(cluster, tmp, "loss", pools, ray=True)
    out = {"remove": [], "freeze": []}
    try:
        with Client(s.address) as c:
            for _ in range(trials):
                for kind in out:
                    out[kind].append(_loss_trial(cluster, s, c, kind))
    finally:
        s.close()
    summary = {}
    for kind, rows in out.items():
        keys = [k for k in rows[0] if k.endswith("_s") and all(r.get(k) is not None for r in rows)]
        summary[kind] = {"trials": rows, "median": {k: statistics.median(r[k] for r in rows) for k in keys},
                         "max": {k: max(r[k] for r in rows) for k in keys}}
    return summary


def _loss_trial(cluster, s: Serve, c: Client, kind: str) -> dict:
    """One node lost while 8 jobs run (2 per worker; each worker has 2 credits to spare, so a retried
    job is dispatched as soon as it is requeued). `remove`: Cluster.remove_node kills the node's
    processes (a crash). `freeze`: SIGSTOP on every process of the node (raylet, actors, workers): they
    hold their sockets open and say nothing, as a node cut off by the network would."""
    import psutil
    import ray

    wait_for(lambda: sum(w["state"] == "ready" for w in workers(c)) == 4, 180, "4 ready workers")
    ws = workers(c)
    victim_id = ws[0]["nodes"][0]
    lost = [w["name"] for w in ws if w["nodes"] == [victim_id]]
    victim = next(n for n in cluster.worker_nodes if n.node_id == victim_id)
    raylet = psutil.Process(victim.all_processes["raylet"][0].process.pid)
    procs = [raylet] + raylet.children(recursive=True)
    jobs = [c.submit("sleep", {"ms": 3000}) for _ in range(8)]
    wait_for(lambda: sum(w["inflight"] for w in workers(c)) == 8, 30, "8 running jobs")
    time.sleep(0.3)
    t_lost = time.time()
    if kind == "remove":
        cluster.remove_node(victim)
    else:
        for p in procs:
            p.suspend()
    results = [j.result(120) for j in jobs]  # every job ends with its result (retried if it was lost)
    ray_dead_s = None
    if kind == "freeze":  # how long Ray's own health checks take to call the node dead
        ray_dead_s = _ray_marks_dead(ray, victim_id, t_lost, 90)
        for p in procs:
            p.kill()
        cluster.remove_node(victim, allow_graceful=False)
    events = log_events(s.log(), t_lost)
    down = {name: next((t - t_lost, msg) for t, msg in events if msg.startswith(f"{name}: down:"))
            for name in lost}
    requeue = next(t - t_lost for t, msg in events if "attempt 2 dispatched" in msg)
    t_add = time.time()
    new = cluster.add_node(**NODE)
    wait_for(lambda: sum(w["state"] == "ready" and w["nodes"] == [new.node_id] for w in workers(c)) == 2,
             180, "the lost slots back on the new node")
    return {"detect_s": max(d for d, _ in down.values()), "requeue_s": requeue,
            "replace_s": time.time() - t_add, "ray_marks_node_dead_s": ray_dead_s,
            "reasons": [m.split("down: ", 1)[1] for _, m in down.values()], "jobs_ok": len(results)}


def _ray_marks_dead(ray, node_id: str, since: float, timeout: float) -> float | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            return time.time() - since
        time.sleep(0.2)
    return None


# ---------------------------------------------------------------------------------------- cold start


def cold_start(cluster, tmp: str, trials: int) -> dict:
    out = {"local_s": [], "ray_s": []}
    for _ in range(trials):
        for key, devices, ray in (("local_s", "cpu:4", False), ("ray_s", "ray-cpu:4", True)):
            s = serve(cluster, tmp, key, {"echo": {"handler": "echo", "devices": devices}}, ray=ray)
            out[key].append(s.ready_s)
            s.close()
    out["median_local_s"] = statistics.median(out["local_s"])
    out["median_ray_s"] = statistics.median(out["ray_s"])
    return out


# ---------------------------------------------------------------------------------------------- main


def report(data: dict) -> str:
    lines = []
    d = data.get("dispatch")
    if d:
        m = d["median"]
        lines.append(fmt_table(["echo, 1 worker", "local (ipc)", "Ray (tcp+CURVE)", "ratio"], [
            ["round trip p50 (us)", f"{m['local_p50_us']:.0f}", f"{m['ray_p50_us']:.0f}", f"{m['p50_ratio']:.2f}x"],
            ["round trip p99 (us)", f"{m['local_p99_us']:.0f}", f"{m['ray_p99_us']:.0f}", ""],
            ["pipelined (jobs/s)", f"{m['local_jobs_s']:.0f}", f"{m['ray_jobs_s']:.0f}",
             f"{m['jobs_s_ratio']:.2f}x"]]))
    for kind, n in (data.get("node_loss") or {}).items():
        lines.append(fmt_table([f"node loss: {kind} (s)", "median", "max"], [
            [k, f"{n['median'][k]:.2f}", f"{n['max'][k]:.2f}"] for k in n["median"]]))
        lines.append(f"{kind}: down reasons: " + "; ".join(sorted({r for t in n["trials"] for r in t["reasons"]})))
    cs = data.get("cold_start")
    if cs:
        lines.append(fmt_table(["cold start, 4 echo workers (s)", "median", "all"], [
            ["local cpu:4", f"{cs['median_local_s']:.2f}", " ".join(f"{v:.2f}" for v in cs["local_s"])],
            ["Ray ray-cpu:4", f"{cs['median_ray_s']:.2f}", " ".join(f"{v:.2f}" for v in cs["ray_s"])]]))
    return "\n\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000, help="round trips and pipelined jobs per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=3, help="node losses and cold starts")
    ap.add_argument("--steps", default="dispatch,node_loss,cold_start", help="which figures, comma-separated")
    ap.add_argument("--json", help="write the results here (and to $OUT/bench_ray.json when set)")
    args = ap.parse_args(argv)
    import ray

    data = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "ray": ray.__version__,
            "cpus": os.cpu_count(), "load_1m_before": os.getloadavg()[0], "args": vars(args)}
    steps = Steps()
    cluster = start_cluster()
    ray.init(address=cluster.address, namespace="bench-ray")  # to read the cluster's own view of its nodes
    try:
        with tempfile.TemporaryDirectory() as tmp:
            chosen = args.steps.split(",")
            if "dispatch" in chosen:
                data["dispatch"] = steps.run("dispatch", dispatch, cluster, tmp, args.jobs, args.rounds)
            if "node_loss" in chosen:
                data["node_loss"] = steps.run("node loss", node_loss, cluster, tmp, args.trials)
            if "cold_start" in chosen:
                data["cold_start"] = steps.run("cold start", cold_start, cluster, tmp, args.trials)
    finally:
        ray.shutdown()
        cluster.shutdown()
    data["load_1m_after"] = os.getloadavg()[0]
    print(report(data))
    finish(data, steps.errors, args.json, "bench_ray.json")
    return 1 if steps.errors else 0


if __name__ == "__main__":
    sys.exit(main())
