"""Recovery benchmark: how fast the coordinator notices a dead or hung worker and re-runs its job.

Runs a real `orchestrator serve` (4 CPU workers, `sleep` handler) and measures:

- kill -> noticed: SIGKILL of a busy worker until the coordinator logs "pid N exited" (pidfd wake-up);
- kill -> re-dispatched: SIGKILL until the coordinator sends the victim's in-flight job to another
  worker (its log line "job N: attempt 2 dispatched to ...");
- kill -> running again: SIGKILL until that job runs on the other worker: its result's arrival minus the
  run time the worker measured (result meta `run_ms`). An upper bound: it also holds the result's trip
  back to this script, and any wait for a CPU on a loaded machine;
- SIGSTOP -> declared dead: a stopped (hung) worker until the coordinator logs "heartbeat lost";
- coordinator SIGKILL -> no workers: until every worker process is gone (PR_SET_PDEATHSIG).

Times come from one wall clock: this script reads time.time() around each signal, and the coordinator's
JSON log lines carry time.time() of the event (ms resolution). Percentiles are nearest-rank.

    python3 -m scripts.bench_recovery [--kills 50] [--hangs 5] [--orphans 3] [--json samples.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import tempfile
import time

import psutil
import zmq

from protocol import Codec
from protocol.messages import Error, Ok, Result, Status, Submit
from scripts._bench_common import Serve, pct

JOB_MS = 300  # long enough that the job is still running when its worker is killed
CONFIG = """
[server]
log_format = "json"

[pools.sleep]
handler = "sleep"
devices = "cpu:4"
max_restarts = 100000
# Restart quickly: each trial waits for the victim's replacement before the next kill.
restart_backoff = 0.01
restart_backoff_max = 0.05
"""


class Server:
    """A `Serve` on the config above whose JSON log is followed line by line (read incrementally: a
    trial polls it every few ms)."""

    def __init__(self, workdir: str):
        config = os.path.join(workdir, "bench.toml")
        with open(config, "w") as f:
            f.write(CONFIG)
        self.serve = Serve(["--config", config], log_dir=workdir).start(ready=False, timeout=60)
        self.proc, self.endpoint = self.serve.proc, self.serve.address
        self._reader = open(self.serve.log_path, "r", errors="replace")
        self._partial = ""
        self.entries: list[dict] = []

    def read_log(self) -> None:
        text = self._partial + self._reader.read()
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.startswith("{"):
                try:
                    self.entries.append(json.loads(line))
                except ValueError:
                    pass

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 0.005):
        deadline = time.monotonic() + timeout
        while True:
            self.read_log()
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode} waiting for {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {timeout} s")
            time.sleep(interval)

    def log_time(self, text: str, after: float) -> float | None:
        """Timestamp of the first log line after `after` whose message contains `text`."""
        for e in self.entries:
            if e["ts"] >= after - 0.002 and text in e["msg"]:
                return e["ts"]
        return None

    def close(self) -> None:
        self._reader.close()
        self.serve.close()


class RawClient:
    """One DEALER socket: every reply, with its meta (the library client hands back outputs only)."""

    def __init__(self, address: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.codec = Codec()
        self.ids = itertools.count(1)

    def send(self, make) -> int:
        rid = next(self.ids)
        self.sock.send(self.codec.encode(make(rid)))
        return rid

    def wait(self, rid: int, timeout: float = 60.0):
        """The terminal reply to `rid` and the time.time() it arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                msg = self.codec.decode(self.sock.recv())
                if isinstance(msg, (Result, Error, Ok)) and msg.id == rid:
                    return msg, time.time()
        raise TimeoutError(f"no reply to request {rid} within {timeout} s")

    def status(self) -> dict:
        reply, _ = self.wait(self.send(Status))
        return reply.data

    def workers(self) -> list[dict]:
        return self.status()["pools"]["sleep"]["workers"]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def poll(predicate, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout} s")
        time.sleep(interval)


def all_ready(c: RawClient):
    ws = c.workers()
    return ws if len(ws) == 4 and all(w["state"] == "ready" for w in ws) else None


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---------------------------------------------------------------------------- trials


def kill_trial(server: Server, c: RawClient) -> dict | None:
    """SIGKILL the worker running one job; None when the job was not retried (it finished first)."""
    poll(lambda: all_ready(c), 60, "4 ready workers")
    rid = c.send(lambda r: Submit(r, "sleep", {"ms": JOB_MS}))
    busy = poll(lambda: [w for w in c.workers() if w["inflight"] == 1], 30, "the job dispatched")[0]
    pid = busy["pids"][0]
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    reply, t_reply = c.wait(rid)
    if not isinstance(reply, Result) or reply.meta["attempts"] != 2:
        return None
    t_noticed = server.wait_for(lambda: server.log_time(f" pid {pid} exited:", t_kill), 30,
                                "the exit log line")
    t_sent = server.wait_for(lambda: server.log_time(": attempt 2 dispatched to", t_kill), 30,
                             "the retry's dispatch log line")
    started_again = t_reply - reply.meta["run_ms"] / 1000
    return {"victim": busy["name"], "retried_on": reply.meta["worker"],
            "noticed_ms": (t_noticed - t_kill) * 1000, "redispatched_ms": (t_sent - t_kill) * 1000,
            "running_again_ms": (started_again - t_kill) * 1000}


def hang_trial(server: Server, c: RawClient, k: int) -> float:
    """SIGSTOP one worker; ms until the coordinator declares its heartbeat lost."""
    ws = poll(lambda: all_ready(c), 60, "4 ready workers")
    victim = ws[k % len(ws)]
    t_stop = time.time()
    os.kill(victim["pids"][0], signal.SIGSTOP)
    t_dead = server.wait_for(lambda: server.log_time(f"{victim['name']}: down: heartbeat lost", t_stop),
                             60, "heartbeat loss", interval=0.01)
    return (t_dead - t_stop) * 1000


def orphan_trial(workdir: str) -> float:
    """SIGKILL a coordinator whose 4 workers are busy; ms until no worker process remains."""
    server = Server(workdir)
    c = RawClient(server.endpoint)
    try:
        poll(lambda: all_ready(c), 60, "4 ready workers")
        for _ in range(8):
            c.send(lambda r: Submit(r, "sleep", {"ms": 60_000}))
        poll(lambda: c.status()["pools"]["sleep"]["inflight"] == 8, 30, "8 jobs running")
        pids = [p.pid for p in psutil.Process(server.proc.pid).children()]
        t0 = time.monotonic()
        server.proc.kill()
        poll(lambda: all(gone(p) for p in pids), 30, "every worker gone", interval=0.001)
        return (time.monotonic() - t0) * 1000
    finally:
        c.close()
        server.close()


# ---------------------------------------------------------------------------- report


def row(name: str, values: list[float], target: str) -> str:
    if not values:
        return f"| {name} | 0 | - | - | - | {target} |"
    return (f"| {name} | {len(values)} | {pct(values, 50):.1f} | {pct(values, 99):.1f} | "
            f"{max(values):.1f} | {target} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--hangs", type=int, default=5)
    ap.add_argument("--orphans", type=int, default=3)
    ap.add_argument("--json", help="write every sample to this file")
    args = ap.parse_args()

    kills, skipped, hangs, orphans = [], 0, [], []
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as workdir:
        server = Server(workdir)
        c = RawClient(server.endpoint)
        try:
            while len(kills) < args.kills:
                sample = kill_trial(server, c)
                if sample is None:
                    skipped += 1
                    if skipped > args.kills:
                        raise RuntimeError("the job keeps finishing before the kill")
                    continue
                kills.append(sample)
                print(f"kill {len(kills):3d}: noticed {sample['noticed_ms']:6.1f} ms, re-dispatched "
                      f"{sample['redispatched_ms']:6.1f} ms, running again {sample['running_again_ms']:6.1f}"
                      f" ms ({sample['victim']} -> {sample['retried_on']})", flush=True)
            for k in range(args.hangs):
                hangs.append(hang_trial(server, c, k))
                print(f"hang {k + 1}: declared dead after {hangs[-1]:.0f} ms", flush=True)
        finally:
            c.close()
            server.close()
        for k in range(args.orphans):
            orphans.append(orphan_trial(workdir))
            print(f"orphans {k + 1}: no worker left {orphans[-1]:.1f} ms after the coordinator's SIGKILL",
                  flush=True)

    print()
    print("| measure | n | p50 ms | p99 ms | max ms | target |")
    print("|---|---|---|---|---|---|")
    print(row("worker SIGKILL -> coordinator notices", [k["noticed_ms"] for k in kills], "p99 <= 100 ms"))
    print(row("worker SIGKILL -> job re-dispatched", [k["redispatched_ms"] for k in kills], "p99 <= 200 ms"))
    print(row("worker SIGKILL -> job running again (upper bound)", [k["running_again_ms"] for k in kills],
              "-"))
    print(row("worker SIGSTOP -> declared dead (heartbeat)", hangs, "<= 3000 ms"))
    print(row("coordinator SIGKILL -> no worker left", orphans, "<= 2000 ms"))
    if skipped:
        print(f"\n({skipped} kill trial(s) skipped: the job finished before its worker was killed)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kills": kills, "hangs_ms": hangs, "orphans_ms": orphans}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
