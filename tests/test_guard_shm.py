"""The collective guard's transports on CPU, with bare rank processes (no server): shared memory between the
ranks of one host, gloo as the fallback. Each test starts real processes that rendezvous over a TCPStore,
create a gloo group and run `CollectiveGuard.check` steps; a rank's behaviour at step 2 is the test's lever.

Covers: a mismatch named by rank (with every rank's readable fingerprint, exchanged without pickle), a rank
that never arrives (timeout naming it), a stopped rank (named as stopped), a rank killed between steps
(named as dead, before the timeout), and the segment's cleanup (its name is gone once both ranks mapped it,
so no death can leak it).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = r"""
import json, os, signal, sys, threading, time
from datetime import timedelta
import torch.distributed as dist
from worker.guard import Batch, CollectiveGuard, GroupError, side_group
rank, port_file, transport, act = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
if rank == 0:
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=120))
    with open(port_file + ".tmp", "w") as f:
        f.write(str(store.port))
    os.rename(port_file + ".tmp", port_file)
else:
    deadline = time.monotonic() + 120
    while not os.path.exists(port_file):
        if time.monotonic() > deadline:
            sys.exit("no port file")
        threading.Event().wait(0.05)
    store = dist.TCPStore("127.0.0.1", int(open(port_file).read()), 2, is_master=False,
                          timeout=timedelta(seconds=120))
dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
guard = CollectiveGuard(side_group(2.0), rank, 2, 2.0, transport=transport)
out = {"first": guard.check(Batch.of([1, 2])), "transport": guard.stats()["transport"]}
if out["transport"] == "shm":
    out["segment"] = guard.transport.path
    out["segment_exists_after_setup"] = os.path.exists(guard.transport.path)
with open(port_file + f".rank{rank}", "w") as f:
    f.write(json.dumps(out))  # the parent reads this even if the step below never returns
if act == "absent":
    threading.Event().wait(60)  # alive, but never reaches step 2
    os._exit(0)
if act == "stop":
    os.kill(os.getpid(), signal.SIGSTOP)  # the parent kills it
if act == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
batch = Batch.of([9]) if act == "differ" else Batch.of([3])
start = time.monotonic()
try:
    out["second"] = guard.check(batch)
except GroupError as e:
    out.update(error=type(e).__name__, code=e.code, message=e.message, details=e.details)
out["elapsed"] = time.monotonic() - start
print(json.dumps(out), flush=True)
os._exit(0)  # as our workers do: no gloo teardown with a collective its peer never joined
"""


def run_ranks(tmp_path, transport: str, acts: tuple) -> list:
    """Run rank 0 and rank 1 with their acts; returns each rank's output (None for one that printed none)."""
    port_file = str(tmp_path / "port")
    env = {**os.environ, "PYTHONPATH": REPO, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(r), port_file, transport, acts[r]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for r in (0, 1)]
    results = []
    try:
        for r, p in enumerate(procs):
            if acts[r] in ("absent", "stop", "kill"):
                results.append(None)
                continue
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for r in (0, 1):  # what each rank wrote after step 1, also for the ranks that went away
        path = Path(f"{port_file}.rank{r}")
        first = json.loads(path.read_text()) if path.exists() else {}
        results[r] = {**first, **(results[r] or {})}
    return results


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_a_mismatch_names_the_differing_rank_on_every_rank(tmp_path, transport):
    r0, r1 = run_ranks(tmp_path, transport, ("same", "differ"))
    for r in (r0, r1):
        assert r["first"] is True and r["transport"] == transport
        assert r["error"] == "CollectiveMismatch" and r["code"] == "collective_mismatch"
        # Rank 0 (the leader) holds the reference on a tie, so rank 1 is the one that differs.
        assert r["details"]["differing"] == [1], r["message"]
        assert "rank(s) [1] differ" in r["message"]
    # Each rank's readable fingerprint came across (fixed-size bytes, no pickle): rank 0 shows rank 1's.
    fps = r0["details"]["fingerprints"]
    assert fps[0].startswith("step=2 batch=1 tokens=1") and fps[1].startswith("step=2 batch=1 tokens=1")
    assert fps[0] != fps[1]  # the id hashes differ
    assert fps == r1["details"]["fingerprints"]


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_a_rank_that_never_arrives_is_named_after_the_timeout(tmp_path, transport):
    """Both ranks pass step 1; rank 1 then stays alive but away, so rank 0's step 2 ends in
    CollectiveMismatch after the guard timeout (2 s) instead of waiting forever."""
    r0, r1 = run_ranks(tmp_path, transport, ("same", "absent"))
    assert r1["first"] is True
    assert r0["error"] == "CollectiveMismatch" and r0["code"] == "collective_mismatch"
    assert r0["details"]["differing"] == [1] and "did not all arrive" in r0["message"], r0["message"]
    if transport == "shm":  # shared memory also knows the missing rank's process state
        assert "rank 1 (alive) did not all arrive" in r0["message"], r0["message"]
    print(f"absent rank named after {r0['elapsed']:.2f} s (guard timeout 2 s)")


def test_a_stopped_rank_is_named_as_stopped(tmp_path):
    r0, _ = run_ranks(tmp_path, "shm", ("same", "stop"))
    assert r0["error"] == "CollectiveMismatch" and r0["details"]["differing"] == [1]
    assert "rank 1 (stopped)" in r0["message"], r0["message"]


def test_a_killed_rank_is_named_as_dead_and_leaves_no_segment(tmp_path):
    r0, r1 = run_ranks(tmp_path, "shm", ("same", "kill"))
    assert r0["transport"] == "shm" and r1["first"] is True
    assert r0["details"]["differing"] == [1]
    assert "lost a peer: rank 1 (dead)" in r0["message"], r0["message"]
    # The name was unlinked as soon as both ranks had mapped the segment: nothing is left behind by the
    # death of a rank, nor by the end of the other.
    assert r0["segment_exists_after_setup"] is False and r1["segment_exists_after_setup"] is False
    assert re.fullmatch(r"/dev/shm/gpuorch-guard-[0-9a-f]{16}", r0["segment"])
    assert not os.path.exists(r0["segment"])
    print(f"dead rank named after {r0['elapsed']:.3f} s (guard timeout 2 s)")


def test_no_pickled_collective_in_the_worker_or_scripts():
    """The guard's path must not pickle: no `*_object` collective in the guard, its transports, its bench
    or the TP tests' handlers."""
    files = [Path(REPO, p) for p in ("worker/guard.py", "worker/shm_guard.py", "scripts/bench_guard.py",
                                     "tests/tp_handlers.py", "tests/gpu/test_tp_gpu.py")]
    found = [f"{f.name}: {m.group(0)}" for f in files
             for m in re.finditer(r"\b\w+_object(?:_list)?\s*\(", f.read_text())
             if m.group(0).split("(")[0].strip() in ("all_gather_object", "broadcast_object_list",
                                                       "gather_object", "scatter_object_list",
                                                       "send_object_list", "recv_object_list")]
    assert not found, found
