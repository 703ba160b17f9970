"""Device placement: the pure functions that turn a device spec into per-worker device sets."""
from __future__ import annotations

import os

import pytest

from orchestrator.config import PoolConfig
from orchestrator.fleet.placement import (
    DeviceSet, assign, check_replicas, cuda_visible, parse_devices, pool_cores, split_cores, visible_gpus,
)
from orchestrator.fleet.pools import Pool
from tests.conftest import Server, poll_until

WAIT = 120.0  # generous: the machine is shared and loaded; a correct run never waits this long


# ----------------------------------------------------------------------------- parse_devices


@pytest.mark.parametrize("spec, kind, ids", [
    ("cpu:1", "cpu", ("cpu0",)),
    ("cpu:4", "cpu", ("cpu0", "cpu1", "cpu2", "cpu3")),
    ("cpu", "cpu", ("cpu0",)),
    ("0", "gpu", ("0",)),
    ("0,1,2,3", "gpu", ("0", "1", "2", "3")),
    (" 3, 1 ,2 ", "gpu", ("3", "1", "2")),  # order is kept: it is the user's choice of pairing
    ("0,1,", "gpu", ("0", "1")),
])
def test_parse_explicit_specs(spec, kind, ids):
    assert parse_devices(spec) == DeviceSet(kind, ids)


def test_auto_honours_inherited_cuda_visible_devices():
    assert parse_devices("auto", {"CUDA_VISIBLE_DEVICES": "4,6"}) == DeviceSet("gpu", ("4", "6"))


@pytest.mark.parametrize("env", [{"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"}])
def test_auto_without_visible_gpus_falls_back_to_cpu(env):
    assert parse_devices("auto", env, default_cpu=3) == DeviceSet("cpu", ("cpu0", "cpu1", "cpu2"))


def test_visible_gpus_reads_the_environment_only_when_set():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": " 1 , 2 "}) == ["1", "2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


@pytest.mark.parametrize("spec, needle", [
    ("cpu:0", "N >= 1"),
    ("cpu:-2", "N >= 1"),
    ("cpu:x", "cpu:x"),
    ("a,b", "'a,b'"),
    ("0,gpu1", "'0,gpu1'"),
    ("", "bad device spec"),
    (",", "bad device spec"),
    ("0,1,0", "repeated"),
])
def test_bad_specs_raise_value_errors_naming_the_spec(spec, needle):
    with pytest.raises(ValueError, match="bad device spec") as info:
        parse_devices(spec)
    assert needle in str(info.value)


# ----------------------------------------------------------------------------- assign


def test_assign_one_worker_per_device():
    assert assign(["0", "1", "2", "3"]) == [("0",), ("1",), ("2",), ("3",)]


def test_assign_tp_groups_are_consecutive():
    assert assign(["0", "1", "2", "3"], tp=2) == [("0", "1"), ("2", "3")]
    assert assign(["0", "1", "2", "3"], tp=4) == [("0", "1", "2", "3")]


def test_assign_workers_per_device_repeats_each_device():
    assert assign(["0", "1"], workers_per_device=3) == [("0",)] * 3 + [("1",)] * 3


def test_assign_tp_not_dividing_the_devices_names_the_numbers():
    with pytest.raises(ValueError) as info:
        assign(["0", "1"], tp=3)
    msg = str(info.value)
    assert "tp=3" in msg and "got 2" in msg


@pytest.mark.parametrize("tp, wpd", [(0, 1), (1, 0), (-1, 1)])
def test_assign_rejects_non_positive_counts(tp, wpd):
    with pytest.raises(ValueError, match=f"tp={tp}"):
        assign(["0"], tp=tp, workers_per_device=wpd)


def test_assign_refuses_tp_with_several_workers_per_device():
    with pytest.raises(ValueError, match="workers_per_device"):
        assign(["0", "1"], tp=2, workers_per_device=2)


# ----------------------------------------------------------------------------- check_replicas


def test_check_replicas_accepts_what_fits():
    devices = DeviceSet("gpu", ("0", "1", "2", "3"))
    for n in range(0, 3):
        check_replicas(2, n, 2, devices)  # no exception


def test_check_replicas_names_the_numbers():
    with pytest.raises(ValueError) as info:
        check_replicas(4, 6, 1, DeviceSet("cpu", ("cpu0", "cpu1", "cpu2", "cpu3")))
    msg = str(info.value)
    assert "6 replicas" in msg and "need 6 devices" in msg and "has 4" in msg and "room for 4" in msg


def test_check_replicas_refuses_negative():
    with pytest.raises(ValueError, match="-1"):
        check_replicas(2, -1, 1, DeviceSet("gpu", ("0", "1")))


def test_pool_with_too_many_replicas_fails_before_anything_starts():
    with pytest.raises(ValueError, match="3 replicas with tp=2 need 6 devices"):
        Pool(PoolConfig(name="p", devices="0,1,2,3", tp=2, replicas=3))


def test_pool_defaults_to_one_slot_per_device_group():
    pool = Pool(PoolConfig(name="p", devices="0,1,2,3", tp=2))
    assert pool.desired == 2 and pool.groups == [("0", "1"), ("2", "3")]
    assert pool.slot_spec(1, [[0], [1]]).devices == ("2", "3")


# ----------------------------------------------------------------------------- cores and env


@pytest.mark.parametrize("cores, n", [(list(range(8)), 3), (list(range(4)), 4), ([0, 1], 5),
                                      ([2, 5, 7], 1), (list(range(16)), 6)])
def test_split_cores_covers_every_worker_evenly(cores, n):
    parts = split_cores(cores, n)
    assert len(parts) == n and all(parts)
    if len(cores) >= n:  # disjoint, all used, sizes differ by at most one
        flat = [c for p in parts for c in p]
        assert sorted(flat) == sorted(cores) and len(flat) == len(set(flat))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    else:  # shared round-robin, one core each
        assert [p[0] for p in parts] == [cores[i % len(cores)] for i in range(n)]


def test_split_cores_for_no_workers():
    assert split_cores([0, 1], 0) == []


def _pools_with_cores(cores: list) -> dict:
    pools = {c.name: Pool(c) for c in (
        PoolConfig(name="gen", devices="0,1,2,3", tp=2, replicas=1),  # room for 2 slots, starts 1
        PoolConfig(name="emb", devices="cpu:3"))}
    shares = pool_cores(cores, {p.name: p.rank_capacity for p in pools.values()})
    for pool in pools.values():
        pool.cores = shares[pool.name]
    return pools


def test_scale_up_slot_never_gets_another_pools_cores():
    pools = _pools_with_cores(list(range(14)))
    gen, emb = pools["gen"], pools["emb"]
    # What a scale-up of gen to 2 starts (slot 1) against what emb's slots were started with.
    scaled = {c for rank in gen.slot_spec(1, gen.slot_cores(1)).cores for c in rank}
    started = {c for i in range(3) for rank in emb.slot_spec(i, emb.slot_cores(i)).cores for c in rank}
    assert scaled and started and not scaled & started
    # Every rank of every slot either pool can ever run holds its own cores; all cores are used.
    every = [rank for p in pools.values() for i in range(len(p.groups)) for rank in p.slot_cores(i)]
    flat = [c for rank in every for c in rank]
    assert len(every) == 4 + 3 and sorted(flat) == list(range(14))


def test_slot_cores_are_the_same_at_start_and_at_scale():
    pools = _pools_with_cores(list(range(8)))
    gen = pools["gen"]
    assert gen.slot_cores(0) == [[0, 1], [2]] and gen.slot_cores(1) == [[3], [4]]
    assert len(gen.slot_cores(1)) == gen.cfg.tp  # one share per rank


@pytest.mark.parametrize("devices, value", [
    (("0",), "0"), (("2", "3"), "2,3"), (("cpu0",), ""), (("cpu3", "cpu4"), ""),
])
def test_cuda_visible(devices, value):
    assert cuda_visible(devices) == value


# ----------------------------------------------------------------------------- through a real server


def env_reports(client, pool: str, n_workers: int) -> dict:
    """{wid: env handler output}, submitting rounds of jobs until every worker has answered."""
    seen: dict = {}

    def round_():
        handles = [client.submit(pool, None) for _ in range(4 * n_workers)]
        for h in handles:
            out = h.result(timeout=WAIT)
            seen[out["wid"]] = out
        return len(seen) >= n_workers

    poll_until(round_, timeout=WAIT, what=f"all {n_workers} {pool} workers to answer")
    return seen


def child_cuda_env(srv: Server) -> list:
    """CUDA_VISIBLE_DEVICES of every worker process, read from the OS (not from the worker's word)."""
    return sorted(p.environ().get("CUDA_VISIBLE_DEVICES") for p in srv.children())


def test_placement_one_gpu_id_per_worker_without_gpus(serve):
    srv = serve(["--devices", "0,1,2,3", "--handler", "env"])
    seen = env_reports(srv.client(), "env", 4)
    assert {wid: out["CUDA_VISIBLE_DEVICES"] for wid, out in seen.items()} == {
        "env/0": "0", "env/1": "1", "env/2": "2", "env/3": "3"}
    assert all(out["device"] == "cuda:0" for out in seen.values())  # renumbered from 0 inside
    assert child_cuda_env(srv) == ["0", "1", "2", "3"]
    # CPU affinity: the serve process's cores split across the 4 workers, in slot order.
    cores = split_cores(sorted(os.sched_getaffinity(0)), 4)
    assert {wid: out["affinity"] for wid, out in seen.items()} == {
        f"env/{i}": cores[i] for i in range(4)}


def test_placement_workers_per_device(serve):
    srv = serve(["--devices", "0,1", "--workers-per-device", "2", "--handler", "env"])
    seen = env_reports(srv.client(), "env", 4)
    assert {wid: out["CUDA_VISIBLE_DEVICES"] for wid, out in seen.items()} == {
        "env/0": "0", "env/1": "0", "env/2": "1", "env/3": "1"}
    assert child_cuda_env(srv) == ["0", "0", "1", "1"]


def test_placement_cpu_workers_see_no_gpu(serve):
    srv = serve(["--devices", "cpu:2", "--handler", "env"])
    seen = env_reports(srv.client(), "env", 2)
    assert all(out["CUDA_VISIBLE_DEVICES"] == "" and out["device"] == "cpu" for out in seen.values())


def test_placement_cpu_affinity_off_leaves_threads_free(serve, tmp_path):
    config = tmp_path / "free.toml"
    config.write_text('[pools.env]\nhandler = "env"\ndevices = "cpu:2"\ncpu_affinity = false\n')
    srv = serve(["--config", str(config)])
    seen = env_reports(srv.client(), "env", 2)
    everything = sorted(os.sched_getaffinity(0))
    assert all(out["affinity"] == everything for out in seen.values()), seen
    # Thread pools are still sized to the worker's share, so unpinned workers don't oversubscribe.
    shares = [len(c) for c in split_cores(everything, 2)]
    assert sorted(int(p.environ()["OMP_NUM_THREADS"]) for p in srv.children()) == sorted(shares)


def ready_or_fail(client, pool: str) -> bool:
    """Readiness poll that fails at once, with the reason, when a worker exits while starting."""
    health = client.health()["pools"][pool]
    reasons = [w["last_exit_reason"] for w in health["workers"].values() if w["last_exit_reason"]]
    assert not reasons, f"{pool} workers died while starting: {reasons}"
    return health["status"] == "ready"


@pytest.mark.slow
def test_placement_tp2_groups_see_their_pair(serve):
    srv = serve(["--devices", "0,1,2,3", "--tp", "2", "--handler", "env"], ready=False)
    client = srv.client()
    poll_until(lambda: ready_or_fail(client, "env"), WAIT, what="both tp=2 groups ready")
    seen = env_reports(client, "env", 2)
    assert {wid: out["CUDA_VISIBLE_DEVICES"] for wid, out in seen.items()} == {
        "env/0": "0,1", "env/1": "2,3"}
    assert all(out["rank"] == 0 and out["device"] == "cuda:0" for out in seen.values())
    # Every rank process of a group (not only rank 0) was started with the group's devices.
    assert child_cuda_env(srv) == ["0,1", "0,1", "2,3", "2,3"]
