"""Pools on a Ray cluster (`serve --ray`): a real multi-node `ray.cluster_utils.Cluster` on this machine.

One cluster per module (Ray is heavy on 2 cores): a head with no resources and two nodes with 2 CPUs and
2 fake GPUs each. The GPUs are fake, which is fine for handlers that never touch CUDA. Every Ray process
and the GCS bind 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), and so does the worker socket.

The node-loss test changes the cluster (it removes a node and adds another), so tests that count nodes run
before it, and the no-orphans test runs last.
"""
from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import zmq

# Read by Ray when it is imported: every Ray process of these tests binds 127.0.0.1 (and inherits this),
# and none of them tries to report usage statistics over the network.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from orchestrator.config import PoolConfig, ServerConfig
from orchestrator.core.eventloop import EventLoop
from orchestrator.launch.base import Launcher, RankHandle, SlotHandle
from orchestrator.observe.metrics import NullMetrics
from orchestrator.fleet.slots import Slot, SlotSpec
from orchestrator.states import SlotState as WS
from protocol import Codec
from protocol.messages import WHeartbeat
from tests.conftest import REPO, Server, poll_until
from tests.model_fixtures import make_tiny_llama

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

NODE = {"num_cpus": 2, "num_gpus": 2}
START_S = 120.0  # a loaded 2-core machine: Ray starts a Python process per actor, then the worker's


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            c.add_node(**NODE)
        c.wait_for_nodes()
        ray.init(address=c.address, namespace="test-ray")  # this test process also watches the cluster
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def gpu_nodes() -> set:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}


def run_actors(run_dir: str) -> list:
    """This run's actors that are not dead (their names start with the run's id)."""
    run_id = os.path.basename(run_dir)
    return [a for a in ray._private.state.actors().values()
            if (a.get("Name") or "").startswith(run_id + ":") and a["State"] != "DEAD"]


def start(tmp_path, cluster, pools: str, extra: list | None = None, ready: bool = True,
          auto: bool = False) -> Server:
    """serve --ray on the module's cluster, with a config file whose run directory is under tmp_path.
    `auto`: `ray = "auto"`, the cluster found through RAY_ADDRESS."""
    run_parent = tmp_path / "runs"
    run_parent.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "serve.toml"
    address = "auto" if auto else cluster.address
    config.write_text(f'[server]\nrun_dir = "{run_parent}"\n\n[cluster]\nray = "{address}"\n'
                      f'worker_address = "127.0.0.1"\nplacement_timeout = 30.0\n\n{pools}')
    env = {"RAY_ADDRESS": cluster.address} if auto else None
    return Server(tmp_path, ["--config", str(config), *(extra or [])], env).start(ready=ready, timeout=START_S)


def run_dir_of(tmp_path) -> str:
    dirs = glob.glob(str(tmp_path / "runs" / "orchestrator-*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture
def servers():
    started = []
    yield started
    for s in started:
        s.close()


# ---------------------------------------------------------------------------- without --ray


def test_without_ray_nothing_imports_ray(tmp_path):
    """A local coordinator serves as before and never loads ray (nor the Ray launcher)."""
    code = f"""
import sys
from orchestrator.config import PoolConfig, ServerConfig
from orchestrator.core.coordinator import Coordinator
from orchestrator import Client
import threading
c = Coordinator(ServerConfig(address="tcp://127.0.0.1:0", run_dir={str(tmp_path)!r},
                             pools=[PoolConfig("echo", devices="cpu:1")]))
endpoint = c.start()
t = threading.Thread(target=c.run)
t.start()
with Client(endpoint) as cl:
    assert cl.run("echo", "x", timeout=60) == "x"
c.request_stop("test", drain=True)
t.join(60)
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith(("ray.", "orchestrator.ray")))
print("LOADED", loaded)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": REPO}, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout


def test_cluster_table_and_ray_mode_rules(tmp_path):
    from orchestrator.config import load_toml, validate

    path = tmp_path / "c.toml"
    path.write_text('[cluster]\nray = "auto"\nworker_address = "10.0.0.5"\nplacement_timeout = 7.5\n'
                    '[pools.gen]\nhandler = "echo"\ndevices = "ray-cpu:2"\n')
    cfg = load_toml(str(path))
    validate(cfg)
    assert (cfg.ray, cfg.worker_address, cfg.placement_timeout) == ("auto", "10.0.0.5", 7.5)
    path.write_text('[cluster]\nray = "auto"\nport = 1\n[pools.gen]\nhandler = "echo"\n')
    with pytest.raises(ValueError, match=r"\[cluster\]: unknown key\(s\) \['port'\]"):
        load_toml(str(path))
    path.write_text('[cluster]\nray = "auto"\n[pools.gen]\nhandler = "echo"\ndevices = "cpu:2"\n')
    with pytest.raises(ValueError, match="every pool runs on the cluster: give pool\\(s\\) gen \\(cpu:2\\)"):
        validate(load_toml(str(path)))


class _Waiting(Launcher):
    """A launcher whose ranks wait for room (no process yet), as the Ray launcher's do while their
    placement group is pending; `placed=True` gives them a pid that never says hello."""

    def __init__(self, placed: bool):
        super().__init__()
        self.placed = placed

    def start(self, launch):
        pid = os.getpid() if self.placed else None
        return SlotHandle(launch, [RankHandle(r.rank, r.wid, pid=pid) for r in launch.ranks])

    def kill(self, handle, reason):
        for r in handle.ranks:
            r.note_reason(reason)


def test_a_rank_waiting_for_room_is_not_silent(tmp_path, monkeypatch):
    """Supervision counts start-up silence only from when a rank's process exists, so a slot waiting
    for room in the cluster stays `starting` (it is placed when a node joins) instead of burning its
    restart budget; the same silence from a started rank is still fatal."""
    from orchestrator.fleet import supervisor as sup_mod

    monkeypatch.setattr(sup_mod, "START_TIMEOUT", 0.2)
    states = {}
    for placed in (False, True):
        cfg = ServerConfig(hb_timeout=0.1)
        sup = sup_mod.Supervisor(cfg, f"ipc://{tmp_path}/w.sock", lambda *a: None, _Waiting(placed),
                                 EventLoop(), lambda *a: None, lambda slot: None, NullMetrics())
        slot = Slot(SlotSpec(pool="p", index=0, devices=("raycpu0",), handler="echo", config={}))
        sup.start_slot(slot, PoolConfig(name="p", restart_backoff=60.0))
        # Ticks with the clock moved past START_TIMEOUT, so the verdict depends on no real wait.
        for ahead in (0.5, 1.0):
            sup.tick([slot], time.monotonic() + ahead)
        states[placed] = slot.state
    assert states == {False: WS.STARTING, True: WS.DEAD}, states  # DEAD: declared down, awaiting exit


def test_ray_devices_need_ray_mode(tmp_path):
    out = subprocess.run([sys.executable, "-m", "orchestrator", "serve", "--handler", "echo", "--devices",
                          "ray:2"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": REPO}, cwd=REPO)
    assert out.returncode == 2
    assert "use ray devices: serve with --ray ADDRESS" in out.stderr


# ---------------------------------------------------------------------------- on the cluster


@pytest.mark.slow
def test_placement_two_workers_per_node_with_distinct_devices(cluster, tmp_path, servers):
    s = start(tmp_path, cluster, '[pools.env]\nhandler = "env"\ndevices = "ray:4"\n', ["--metrics-port", "0"])
    servers.append(s)
    c = s.client()
    outs = {}
    poll_until(lambda: outs.update({o["wid"]: o for o in (c.run("env", {}, timeout=60) for _ in range(8))})
               or len(outs) == 4, 60, 0.1, "every worker to answer")
    nodes = gpu_nodes()
    per_node: dict = {}
    for o in outs.values():
        assert o["node"] in nodes  # the node Ray reports, as seen from inside the worker
        per_node.setdefault(o["node"], []).append(o["CUDA_VISIBLE_DEVICES"])
    assert len(per_node) == 2 and all(sorted(v) == ["0", "1"] for v in per_node.values()), per_node
    status = {w["name"]: w for w in s.workers("env")}
    for o in outs.values():  # status shows the node each worker runs on, and its pid
        assert status[o["wid"]]["nodes"] == [o["node"]]
        assert status[o["wid"]]["pids"] == [o["pid"]]
        if os.geteuid() == 0:  # Ray runs actors at niceness 15; the worker is put back at 0 where allowed
            assert psutil.Process(o["pid"]).nice() == 0
    if os.geteuid() != 0:
        assert "RAY_worker_niceness=0" in s.log()  # otherwise the log says why, and what to do
    url = re.search(r"^metrics: (\S+)", s.log(), re.M).group(1)

    def node_series():  # the metric names each worker's node (gauges refresh every 0.5 s)
        import urllib.request

        text = urllib.request.urlopen(url, timeout=10).read().decode()
        series = [dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
                  for m in re.finditer(r"^orchestrator_worker_node\{([^}]*)\} 1\.0$", text, re.M)]
        return {(labels["worker"], labels["node"]) for labels in series}

    want = {(o["wid"], o["node"]) for o in outs.values()}
    poll_until(lambda: node_series() == want, 20, 0.2, "orchestrator_worker_node for every worker")
    table = subprocess.run([sys.executable, "-m", "orchestrator", "status", "--address", s.address],
                           capture_output=True, text=True, timeout=60, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": REPO})
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line.strip()}
    assert rows["WORKER"][4] == "HOST/NODE", table.stdout
    for o in outs.values():  # the table's HOST/NODE column: host/first 8 characters of the node id
        assert rows[o["wid"]][4] == f"{o['host']}/{o['node'][:8]}", table.stdout
    assert s.status()["pools"]["env"]["health"] == "ready"


@pytest.mark.slow
def test_tp_groups_stay_within_one_node_and_all_reduce(cluster, tmp_path, servers):
    s = start(tmp_path, cluster, '[pools.tp]\nhandler = "tests.tp_handlers:AllReduceHandler"\n'
                                 'devices = "ray:4"\ntp = 2\n')
    servers.append(s)
    c = s.client()
    jobs = [(v, c.submit("tp", {"value": v})) for v in range(-3, 9)]
    for v, job in jobs:
        assert job.result(120) == {"sum": 3.0 * v, "world_size": 2}
    groups = s.workers("tp")
    assert len(groups) == 2
    for g in groups:
        assert len(g["nodes"]) == 1 and g["nodes"][0] in gpu_nodes(), g  # STRICT_PACK: one node per group
        assert {r["node"] for r in g["ranks"]} == set(g["nodes"])
    assert {g["nodes"][0] for g in groups} == gpu_nodes()  # 2 GPUs per node: one group each


def serve_expecting_exit_2(tmp_path, cluster, placement_timeout: float, pools: str) -> tuple:
    """Run `serve` on the cluster with `pools`, which cannot be placed: it must exit 2. Returns its run
    directory's parent and the first line of its stderr (the error; the held log lines follow it)."""
    run_parent = tmp_path / "runs"
    run_parent.mkdir()
    config = tmp_path / "serve.toml"
    config.write_text(f'[server]\nrun_dir = "{run_parent}"\n[cluster]\nray = "{cluster.address}"\n'
                      f'worker_address = "127.0.0.1"\nplacement_timeout = {placement_timeout}\n' + pools)
    out = subprocess.run([sys.executable, "-m", "orchestrator", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO},
                         cwd=REPO)
    assert out.returncode == 2, out.stderr
    return run_parent, out.stderr.strip().splitlines()[0]


@pytest.mark.slow
def test_too_few_resources_is_a_clear_error_and_leaves_nothing(cluster, tmp_path):
    run_parent, last = serve_expecting_exit_2(tmp_path, cluster, 5.0,
                                              '[pools.tp]\nhandler = "echo"\ndevices = "ray:6"\ntp = 3\n')
    assert "too few resources: asked for 2 slot(s) of 3 GPU on one node" in last, last
    assert "2 GPU, 2 CPU" in last  # what the cluster has, node by node
    assert not [pg for pg in ray.util.placement_group_table().values()
                if pg["state"] != "REMOVED" and (pg.get("name") or "").startswith("orchestrator-")]
    assert not glob.glob(str(run_parent / "orchestrator-*"))


@pytest.mark.slow
def test_placement_timeout_when_the_cluster_is_busy(cluster, tmp_path, servers):
    """The nodes could hold the pool, but another run holds their GPUs: the placement groups are not
    ready within placement_timeout, and serve stops with what was asked, leaving nothing placed."""
    busy = start(tmp_path / "busy", cluster, '[pools.env]\nhandler = "env"\ndevices = "ray:4"\n')
    servers.append(busy)
    _, last = serve_expecting_exit_2(tmp_path, cluster, 3.0, '[pools.two]\nhandler = "echo"\ndevices = "ray:2"\n')
    assert "asked for 2 slot(s) of 1 GPU on one node" in last and "not ready within 3 s" in last, last
    names = {pg.get("name") or "" for pg in ray.util.placement_group_table().values()
             if pg["state"] != "REMOVED"}
    assert not [n for n in names if n.startswith("orchestrator-") and ":two/" in n], names
    assert busy.client().run("env", {}, timeout=30)["node"] in gpu_nodes()  # the other run is untouched


@pytest.mark.slow
def test_scale_up_and_down_on_the_cluster(cluster, tmp_path, servers):
    s = start(tmp_path, cluster, '[pools.echo]\nhandler = "echo"\ndevices = "ray:4"\nreplicas = 1\n',
              auto=True)
    servers.append(s)
    c = s.client()
    c.scale("echo", 4)
    poll_until(lambda: sum(w["state"] == "ready" for w in s.workers("echo")) == 4, START_S, 0.2,
               "4 ready workers after scale-up")
    assert {n for w in s.workers("echo") for n in w["nodes"]} == gpu_nodes()
    c.scale("echo", 2)
    poll_until(lambda: len(s.workers("echo")) == 2, 60, 0.2, "scale-down to 2")
    assert c.run("echo", [1, 2], timeout=30) == [1, 2]


@pytest.mark.slow
def test_a_connection_without_the_runs_key_gets_nothing(cluster, tmp_path, servers):
    s = start(tmp_path, cluster, '[pools.echo]\nhandler = "echo"\ndevices = "ray-cpu:1"\n')
    servers.append(s)
    endpoint = re.search(r"worker socket (tcp://[\d.]+:\d+)", s.log()).group(1)
    keys_dir = os.path.join(run_dir_of(tmp_path), "worker-keys")
    import zmq.auth

    run_public, run_secret = zmq.auth.load_certificate(os.path.join(keys_dir, "worker.key_secret"))
    ctx = zmq.Context()
    try:
        # The server's public key is only in the workers' specs; a stranger knows it no better than we
        # do here. Learn it the way a worker would not: from a live worker's command line.
        server_key = _server_key_from_a_worker(s)
        other_public, other_secret = zmq.curve_keypair()
        socks = {"plain": _dealer(ctx, endpoint),  # no CURVE at all
                 "wrong": _dealer(ctx, endpoint, (server_key, other_public, other_secret)),  # another key
                 "right": _dealer(ctx, endpoint, (server_key, run_public, run_secret))}  # positive control
        results = {name: _handshake(*pair) for name, pair in socks.items()}
        assert results == {"plain": "failed", "wrong": "failed", "right": "succeeded"}, results
        plain, wrong = socks["plain"][0], socks["wrong"][0]
        hb = Codec().encode(WHeartbeat("echo/0", 1, None, None))
        for sock in (plain, wrong):
            try:
                sock.send(hb, zmq.NOBLOCK)  # a DEALER with no accepted connection has nowhere to send
            except zmq.Again:
                pass
            assert not sock.poll(500)  # and nothing comes back
        poll_until(lambda: "refused worker connection on" in s.log() and "handshake failed" in s.log(),
                   20, 0.1, "the refusal of the keyless connection in the log")
        poll_until(lambda: "refused worker connection: DENIED (CURVE) domain=workers" in s.log(),
                   20, 0.1, "the refusal of the other key in the log")
        assert other_public.decode() in s.log()  # the log names the refused key
        assert s.client().run("echo", "still serving", timeout=30) == "still serving"
    finally:
        ctx.destroy(linger=0)


def _server_key_from_a_worker(s: Server) -> bytes:
    from protocol.workerspec import WorkerSpec

    pid = s.workers("echo")[0]["pids"][0]
    argv = psutil.Process(pid).cmdline()
    return WorkerSpec.decode(argv[argv.index("--spec") + 1]).curve_keys().serverkey


def _dealer(ctx, endpoint: str, keys: tuple | None = None) -> tuple:
    """A DEALER connecting to `endpoint`, with a monitor attached before it connects (no missed event)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys
    mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                  | zmq.EVENT_DISCONNECTED)
    sock.connect(endpoint)
    return sock, mon


def _handshake(sock, mon, timeout: float = 20.0) -> str:
    """How the socket's first ZMTP handshake with the server ended: "succeeded", "failed", or "no answer"."""
    from zmq.utils.monitor import recv_monitor_message

    try:
        if not mon.poll(int(timeout * 1000)):
            return "no answer"
        event = recv_monitor_message(mon)["event"]
        return "succeeded" if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else "failed"
    finally:
        sock.disable_monitor()
        mon.close(linger=0)


@pytest.mark.slow
def test_generate_on_ray_cpu_matches_a_local_pool(cluster, tmp_path, servers, tmp_path_factory):
    llama = make_tiny_llama(tmp_path_factory.mktemp("llama"))
    pool = f'handler = "generate"\nconfig = {{ model = "{llama}", max_new_tokens_cap = 64 }}\n'
    remote = start(tmp_path / "ray", cluster, f'[pools.gen]\ndevices = "ray-cpu:2"\n{pool}')
    servers.append(remote)
    local_cfg = tmp_path / "local.toml"
    local_cfg.write_text(f'[pools.gen]\ndevices = "cpu:1"\n{pool}')
    local = Server(tmp_path, ["--config", str(local_cfg)]).start(timeout=START_S)
    servers.append(local)
    prompts = ["Hello there", "The quick brown fox", "A", "Once upon a time"]
    want = [local.client().run("gen", {"prompt": p, "max_new_tokens": 12}, timeout=120)["token_ids"]
            for p in prompts]
    c = remote.client()
    jobs = [c.submit("gen", {"prompt": p, "max_new_tokens": 12}) for p in prompts]
    got = [j.result(120)["token_ids"] for j in jobs]
    assert got == want
    assert all(w["nodes"] for w in remote.workers("gen"))


@pytest.mark.slow
def test_node_loss_requeues_every_job_once_and_slots_come_back(cluster, tmp_path, servers):
    s = start(tmp_path, cluster, '[pools.echo]\nhandler = "echo"\ndevices = "ray:4"\nretries = 3\n'
                                 'capacity = 8\n')
    servers.append(s)
    workers = s.workers("echo")
    victim_node = workers[0]["nodes"][0]
    lost = sorted(w["name"] for w in workers if w["nodes"] == [victim_node])
    assert len(lost) == 2
    victim = next(n for n in cluster.worker_nodes if n.node_id == victim_node)
    c = s.client()
    results, done = {}, threading.Event()

    def submit():  # a steady stream, so that the node dies while jobs run
        jobs = []
        for i in range(1000):
            jobs.append((i, c.submit("echo", {"i": i})))
            if i % 50 == 49:
                time.sleep(0.05)
        for i, job in jobs:
            results[i] = job.result(120)
        done.set()

    t = threading.Thread(target=submit)
    t.start()
    poll_until(lambda: s.status()["pools"]["echo"]["completed"] >= 100, 60, 0.02, "the first 100 results")
    cluster.remove_node(victim)
    t.join(240)
    assert done.is_set()
    assert results == {i: {"i": i} for i in range(1000)}  # every job, its own result
    pool = s.status()["pools"]["echo"]
    assert pool["completed"] == 1000 and pool["failed"] == 0  # exactly one result each, none failed
    down = [line for line in s.log().splitlines() if ": down:" in line]
    assert {name for name in lost if any(f"{name}: down:" in line for line in down)} == set(lost), down
    # Lost slots wait for room; a node with room joins and they come back there.
    poll_until(lambda: sum(w["state"] == "ready" for w in s.workers("echo")) == 2, 30, 0.2, "2 survivors")
    new = cluster.add_node(**NODE)
    poll_until(lambda: sum(w["state"] == "ready" for w in s.workers("echo")) == 4, START_S, 0.2,
               "the lost slots to come back on the new node")
    back = {w["name"]: w["nodes"] for w in s.workers("echo") if w["name"] in lost}
    assert all(nodes == [new.node_id] for nodes in back.values()), back
    assert s.client().run("echo", "after", timeout=30) == "after"


@pytest.mark.slow
def test_no_orphans_after_the_coordinator_is_killed(cluster, tmp_path):
    s = start(tmp_path, cluster, '[pools.echo]\nhandler = "echo"\ndevices = "ray:2"\n')
    try:
        run_dir = run_dir_of(tmp_path)
        pids = [pid for w in s.workers("echo") for pid in w["pids"]]
        assert len(pids) == 2 and len(run_actors(run_dir)) == 2
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait(10)

        def gone():
            alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
            return not alive and not run_actors(run_dir)

        poll_until(gone, 10, 0.1, "no worker process and no actor of the run")
        run_id = os.path.basename(run_dir)
        poll_until(lambda: not [pg for pg in ray.util.placement_group_table().values()
                                if (pg.get("name") or "").startswith(run_id) and pg["state"] != "REMOVED"],
                   30, 0.2, "no placement group of the run")
    finally:
        s.close()
