#!/usr/bin/env python
"""Where the time of a multi-GPU generation wave goes (issue 8: scaling efficiency at N = 2).

bench_gpu_scaling.py measures one number per mode, from one server start and three waves of ~1.5 s.
This script takes that number apart, with the same model, engine config and waves (it reuses the
benchmark's `Bench`):

  A. pools   One server with one pool per GPU (g0, g1, ...), so that each GPU can be driven alone or
             together with the others *without restarting anything*. Interleaved, `--repeats` times:
             each GPU alone, then every GPU at once. Per GPU it compares its rate alone with its rate
             while the others run: a drop there is contention between busy workers (CPU, memory,
             the coordinator); no drop means a slower total comes from the wave barrier instead.
  B. bench   The benchmark's own mode: a fresh server with one pool over GPUs 0..N-1 for each N of
             `--gpus` (1 first), alternating, `--repeats` times. Reports tok/s and efficiency per
             repeat, so that a miss can be told apart from run-to-run spread.

For every wave and worker it prints where the time went, from the result's `timing` (the worker's
CLOCK_MONOTONIC stamps, the same clock as this process): dispatch (wave start until the worker received
its first / last job), cohorts (how many separate engine admissions the wave's jobs were scheduled in;
1 = the whole wave prefilled together), engine (first scheduled until last finished), done (wave start
until the worker's last job finished) and straggle (wave end minus this worker's done).

  PYTHONPATH=$PWD python scripts/diag_scaling.py --gpus 1,2,4 --out docs/bench_results/diag_scaling.json
"""
import os

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
               "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_k, _v)  # before anything can start CUDA; every child inherits them

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import Serve, Steps, finish, fmt_table, require_gpus, write_pools_toml  # noqa: E402
from bench_gpu_scaling import Bench  # noqa: E402

COHORT_GAP_S = 0.002  # scheduled stamps further apart than this belong to separate engine admissions


# ----------------------------------------------------------------------------------------- waves

def run_wave(client, targets: list, new_tokens: int, timeout: float) -> dict:
    """Submit every (pool, prompts) of `targets` at once, wait for all; per job: worker, tokens, timing."""
    start = time.perf_counter()
    handles = [client.submit(pool, {"input_ids": p, "max_new_tokens": new_tokens})
               for pool, prompts in targets for p in prompts]
    outs = [(h.result(timeout), h.meta) for h in handles]
    end = time.perf_counter()
    jobs = [{"worker": meta["worker"], "tokens": len(out["token_ids"]), **out["timing"]} for out, meta in outs]
    return {"start": start, "end": end, "jobs": jobs}


def wave_breakdown(wave: dict) -> dict:
    """Per worker, milliseconds from the wave's start: see the module docstring."""
    per: dict = {}
    for job in wave["jobs"]:
        per.setdefault(job["worker"], []).append(job)
    out = {}
    for worker, jobs in sorted(per.items()):
        rel = lambda key: sorted((j[key] - wave["start"]) * 1000 for j in jobs)  # noqa: E731
        received, scheduled, finished = rel("received"), rel("scheduled"), rel("finished")
        cohorts = 1 + sum(b - a > COHORT_GAP_S * 1000 for a, b in zip(scheduled, scheduled[1:]))
        out[worker] = {"jobs": len(jobs), "tokens": sum(j["tokens"] for j in jobs),
                       "recv_first": received[0], "recv_last": received[-1], "cohorts": cohorts,
                       "sched_first": scheduled[0], "sched_last": scheduled[-1],
                       "engine": finished[-1] - scheduled[0], "done": finished[-1],
                       "straggle": (wave["end"] - wave["start"]) * 1000 - finished[-1]}
    return out


def summarize_waves(waves: list) -> dict:
    """tok/s of the waves, and per worker its mean breakdown and its own rate (tokens / its done time)."""
    wall = sum(w["end"] - w["start"] for w in waves)
    tokens = sum(j["tokens"] for w in waves for j in w["jobs"])
    per: dict = {}
    for w in waves:
        for worker, b in wave_breakdown(w).items():
            per.setdefault(worker, []).append(b)
    workers = {}
    for worker, rows in per.items():
        mean = {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k not in ("jobs", "tokens")}
        mean["cohorts_max"] = max(r["cohorts"] for r in rows)
        mean["tok_s"] = sum(r["tokens"] for r in rows) / (sum(r["done"] for r in rows) / 1000)
        workers[worker] = mean
    return {"seconds": wall, "tokens": tokens, "tok_s": tokens / wall,
            "wave_ms": statistics.fmean((w["end"] - w["start"]) * 1000 for w in waves), "workers": workers}


# ------------------------------------------------------------------------------- thread sampling

def _cpu_topology() -> dict:
    """vCPU -> physical core key (package, core id) from sysfs; SMT siblings share a key."""
    out = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            out[cpu] = (Path(base + "physical_package_id").read_text().strip(), Path(base + "core_id").read_text().strip())
        except OSError:
            out[cpu] = ("?", str(cpu))
    return out


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # the thread or process ended
        return None


def _schedstat(pid: int) -> dict:
    """tid -> (ns on a CPU, ns runnable but waiting for one, involuntary switches) for every thread."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        st, status = _read(f"/proc/{pid}/task/{tid}/schedstat"), _read(f"/proc/{pid}/task/{tid}/status")
        if st is None or status is None:
            continue
        run, wait, _ = (int(x) for x in st.split())
        inv = next((int(line.split()[1]) for line in status.splitlines()
                    if line.startswith("nonvoluntary_ctxt_switches")), 0)
        out[int(tid)] = (run, wait, inv)
    return out


def _steal() -> dict:
    """vCPU -> jiffies stolen by the hypervisor so far (/proc/stat): time the vCPU wanted to run but the
    host ran something else."""
    out = {}
    for line in (_read("/proc/stat") or "").splitlines():
        f = line.split()
        if f and f[0].startswith("cpu") and f[0] != "cpu" and len(f) > 8:
            out[int(f[0][3:])] = int(f[8])
    return out


class GpuUtil:
    """Mean `utilization.gpu` (the share of time a kernel was running) per GPU over a span, from
    `nvidia-smi -lms`; nothing where nvidia-smi is missing."""

    def __init__(self, period_ms: int = 100):
        import shutil
        import subprocess

        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
                                          f"-lms={period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def stop(self) -> dict:
        if self.proc is None:
            return {}
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        per: dict = {}
        for line in out.splitlines():
            try:
                idx, util = (int(x) for x in line.split(","))
            except ValueError:
                continue
            per.setdefault(idx, []).append(util)
        return {i: statistics.fmean(v) / 100 for i, v in per.items()}


class ThreadSampler:
    """Per worker process over a span: its CPU time, and for its hottest threads (the ones that used the
    most CPU during `pick_hot`) the CPU time, the time spent runnable but waiting for a CPU (the
    scheduler's run-queue delay), involuntary switches, and the vCPUs they ran on, sampled every
    `period` s. With the sysfs topology, it counts samples in which a hot thread of one worker ran on
    the same physical core (an SMT sibling) as a hot thread of another worker. It also reads the
    hypervisor's steal time of those vCPUs and, given `gpus` (worker -> GPU index), each GPU's kernel
    utilisation."""

    def __init__(self, pids: dict, gpus: dict | None = None, period: float = 0.005, hot_per_worker: int = 2):
        import threading

        self.pids, self.gpus, self.period, self.k = pids, gpus or {}, period, hot_per_worker
        self.hot: dict = {}  # worker -> [tid, ...]
        self.topo = _cpu_topology()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._samples: list = []

    def pick_hot(self, fn) -> None:
        """Run fn() and keep each worker's `k` threads that used the most CPU meanwhile."""
        before = {w: _schedstat(pid) for w, pid in self.pids.items()}
        fn()
        for w, pid in self.pids.items():
            after = _schedstat(pid)
            used = sorted(((after[t][0] - before[w].get(t, (0, 0, 0))[0], t) for t in after), reverse=True)
            self.hot[w] = [t for _, t in used[:self.k]]

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._before = {w: _schedstat(pid) for w, pid in self.pids.items()}
        self._steal0 = _steal()
        self._gpu = GpuUtil() if self.gpus else None
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.period):
            row = []
            for w, tids in self.hot.items():
                for t in tids:
                    stat = _read(f"/proc/{self.pids[w]}/task/{t}/stat")
                    if stat:
                        fields = stat.rsplit(")", 1)[1].split()
                        row.append((w, t, fields[0], int(fields[36])))  # state, last CPU
            self._samples.append(row)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        wall_ns = (time.perf_counter() - self._t0) * 1e9
        steal1, gpu = _steal(), (self._gpu.stop() if self._gpu else {})
        hz = os.sysconf("SC_CLK_TCK")
        steal = {c: (steal1[c] - self._steal0.get(c, 0)) / hz / (wall_ns / 1e9) for c in steal1}
        out = {}
        for w, pid in self.pids.items():
            after, before = _schedstat(pid), self._before[w]
            delta = {t: tuple(a - b for a, b in zip(after[t], before.get(t, (0, 0, 0)))) for t in after}
            hot = [delta.get(t, (0, 0, 0)) for t in self.hot.get(w, [])]
            cpus = {c for row in self._samples for (w2, _, st, c) in row if w2 == w and st == "R"}
            out[w] = {"process_cores": sum(d[0] for d in delta.values()) / wall_ns,
                      "threads_over_5pct": sum(d[0] > 0.05 * wall_ns for d in delta.values()),
                      "hot_run": [round(h[0] / wall_ns, 3) for h in hot],
                      "hot_wait": [round(h[1] / wall_ns, 3) for h in hot],
                      "hot_involuntary": [h[2] for h in hot],
                      "hot_cpus": sorted(cpus), "smt_shared": self._smt_shared(w), "wall_s": wall_ns / 1e9,
                      "hot_steal_max": max((steal.get(c, 0.0) for c in cpus), default=0.0),
                      "vm_steal": statistics.fmean(steal.values()) if steal else 0.0,
                      "gpu_util": gpu.get(self.gpus.get(w, -1))}
        return out

    def _smt_shared(self, worker: str) -> float:
        """Fraction of samples with this worker's hot thread running in which a running hot thread of
        another worker sat on the same physical core."""
        mine = shared = 0
        for row in self._samples:
            running = [(w, self.topo.get(c)) for w, _, st, c in row if st == "R"]
            for w, core in running:
                if w != worker:
                    continue
                mine += 1
                shared += any(w2 != worker and c2 == core for w2, c2 in running)
        return shared / mine if mine else 0.0


def _spin(args) -> float:
    """One process of the CPU check: optionally pinned, a fixed pure-Python loop; returns loops/s."""
    cores, barrier_at, seconds = args
    if cores:
        os.sched_setaffinity(0, cores)
    while time.time() < barrier_at:
        pass
    n, end, d = 0, barrier_at + seconds, {}
    while time.time() < end:
        for i in range(1000):
            d[i & 255] = i * i
        n += 1
    return n / seconds


def cpu_check(counts: list, seconds: float = 3.0) -> dict:
    """Pure-Python loop rate per process with k processes at once, pinned as workers are (an even split
    of the cores) and unpinned: any drop here is CPU contention that no GPU or socket is part of."""
    import multiprocessing as mp

    from orchestrator.fleet.placement import available_cores, split_cores

    out = {}
    ctx = mp.get_context("spawn")
    for pinned in (True, False):
        for k in counts:
            shares = split_cores(available_cores(), k) if pinned else [None] * k
            with ctx.Pool(k) as pool:
                start = time.time() + 1.0
                rates = pool.map(_spin, [(c, start, seconds) for c in shares])
            out[f"{'pinned' if pinned else 'unpinned'} x{k}"] = rates
            print(f"  cpu {'pinned' if pinned else 'unpinned'} x{k}: {[round(r) for r in rates]} loops/s", flush=True)
    return out


# ----------------------------------------------------------------------------------------- phases

class Diag:
    def __init__(self, args):
        self.args = args
        self.bench = Bench(args)  # same model, engine config and prompts as the benchmark
        self.results: dict = {"pools": [], "bench": []}

    def pool_config(self, devices: str) -> dict:
        a, b = self.args, self.bench
        return {"handler": "generate", "devices": devices, "capacity": a.concurrency, "max_restarts": 0,
                "config": {"model": b.model, "dtype": b.dtype, "cb": b.cb, "capacity": a.concurrency,
                           "max_new_tokens_cap": max(64, a.new_tokens)}}

    def waves_for(self, gpus: list, pool_of) -> list:
        """The benchmark's timed waves for these GPUs: wave k holds GPU g's k-th prompts, GPU by GPU."""
        return [[(pool_of(g), self.bench.timed[g][k]) for g in gpus] for k in range(self.args.waves)]

    def warm(self, client, gpus: list, pool_of) -> None:
        run_wave(client, [(pool_of(g), self.bench.warm[g]) for g in gpus], self.args.new_tokens, self.args.timeout)

    def pools(self, n: int) -> None:
        """Phase A: one pool per GPU in one server; each GPU alone, then all together, interleaved."""
        a = self.args
        name = lambda g: f"g{g}"  # noqa: E731
        cfg = write_pools_toml(os.path.join(self.bench.work, f"pools{n}.toml"),
                               {name(g): self.pool_config(self.bench.devices(1) if a.smoke else str(g))
                                for g in range(n)})
        combos = [[g] for g in range(n)] + ([[0, 1]] if n > 2 else []) + [list(range(n))]
        with Serve(["--config", cfg]).start(timeout=a.timeout) as serve:
            from orchestrator import Client
            with Client(serve.address) as c:
                self.warm(c, list(range(n)), name)
                for r in range(a.repeats):
                    for combo in combos:
                        waves = [run_wave(c, t, a.new_tokens, a.timeout) for t in self.waves_for(combo, name)]
                        s = summarize_waves(waves)
                        self.results["pools"].append({"repeat": r, "gpus": combo, **s, "raw": waves})
                        print(f"  pools r{r} gpus {combo}: {s['tok_s']:,.0f} tok/s, wave {s['wave_ms']:.0f} ms",
                              flush=True)

    def bench_mode(self, n: int, r: int, pin: bool = True) -> None:
        """Phase B: the benchmark's orchestrator mode (one pool over GPUs 0..n-1), one repeat; with
        `pin` False the workers are not pinned to their share of the cores (`cpu_affinity = false`)."""
        a = self.args
        cfg = write_pools_toml(os.path.join(self.bench.work, f"bench{n}.toml"),
                               {"gen": {**self.pool_config(self.bench.devices(n)), "cpu_affinity": pin}})
        with Serve(["--config", cfg]).start(timeout=a.timeout) as serve:
            from orchestrator import Client
            with Client(serve.address) as c:
                gpus = list(range(n))
                pids = {w["name"]: w["pids"][0] for w in c.status()["pools"]["gen"]["workers"]}
                sampler = ThreadSampler(pids, {f"gen/{g}": g for g in gpus} if not a.smoke else None)
                # One pool: the wave is every GPU's prompts in one list, spread by the coordinator.
                sampler.pick_hot(lambda: run_wave(c, [("gen", sum(self.bench.warm[:n], []))], a.new_tokens,
                                                  a.timeout))
                sampler.start()
                waves = [run_wave(c, [("gen", sum((p for _, p in t), []))], a.new_tokens, a.timeout)
                         for t in self.waves_for(gpus, lambda g: "gen")]
                threads = sampler.stop()
        s = summarize_waves(waves)
        self.results["bench"].append({"repeat": r, "n": n, "pinned": pin, "cold_start_s": serve.ready_s, **s,
                                      "threads": threads, "raw": waves})
        print(f"  bench r{r} N={n}{'' if pin else ' unpinned'}: {s['tok_s']:,.0f} tok/s, wave {s['wave_ms']:.0f} ms, "
              f"cold start {serve.ready_s:.1f} s", flush=True)
        for w, t in sorted(threads.items()):
            print(f"    {w}: {t}", flush=True)


# ----------------------------------------------------------------------------------------- report

def report(res: dict, gpus: list) -> str:
    lines = []
    pools = res["pools"]
    if pools:
        solo = {}  # GPU -> its own rate in each repeat, alone
        for e in pools:
            if len(e["gpus"]) == 1:
                g = e["gpus"][0]
                solo.setdefault(g, []).append(e["workers"][f"g{g}/0"]["tok_s"])
        together = [e for e in pools if len(e["gpus"]) == max(len(x["gpus"]) for x in pools)]
        rows = []
        for g, rates in sorted(solo.items()):
            mine = [e["workers"][f"g{g}/0"]["tok_s"] for e in together]
            rows.append([f"GPU {g}", _r(rates), _r(mine), f"{statistics.fmean(mine) / statistics.fmean(rates):.3f}"
                         if mine else ""])
        lines += ["A. one pool per GPU, one server: each GPU's own rate (its tokens / until its last job "
                  "finished), alone vs. all GPUs at once", fmt_table(
                      ["GPU", "alone tok/s (per repeat)", "together tok/s (per repeat)", "together / alone"], rows)]
        if together:
            tot = [e["tok_s"] for e in together]
            lines.append(f"together, total: {_r(tot)} tok/s; vs sum of each GPU alone "
                         f"{statistics.fmean(tot) / sum(statistics.fmean(v) for v in solo.values()):.3f}; "
                         f"vs N x GPU 0 alone {statistics.fmean(tot) / (len(solo) * statistics.fmean(solo[0])):.3f}")
        lines += ["", breakdown_table(pools, lambda e: f"r{e['repeat']} {'+'.join(map(str, e['gpus']))}")]
    bench = res["bench"]
    if bench:
        one = {e["repeat"]: e["tok_s"] for e in bench if e["n"] == 1}
        rows = []
        for n, pin in sorted({(e["n"], e.get("pinned", True)) for e in bench}, key=lambda k: (k[0], not k[1])):
            runs = [e for e in bench if e["n"] == n and e.get("pinned", True) == pin]
            effs = [e["tok_s"] / (n * one[e["repeat"]]) for e in runs if e["repeat"] in one]
            rows.append([n, "yes" if pin else "no", _r([e["tok_s"] for e in runs]), _r(effs, 3),
                         f"{statistics.median(effs):.3f}" if effs else "", _r([e["cold_start_s"] for e in runs], 1)])
        lines += ["", "B. the benchmark's mode (fresh server per run, N alternating): tok/s and efficiency "
                  "against the 1-worker run of the same repeat", fmt_table(
                      ["N", "pinned", "tok/s per repeat", "efficiency per repeat", "median eff.", "cold start s"],
                      rows),
                  "", breakdown_table(bench, _bench_label), "", threads_table(bench)]
    if res.get("cpu"):
        base = statistics.fmean(res["cpu"].get("pinned x1") or res["cpu"][next(iter(res["cpu"]))])
        rows = [[k, _r(v), f"{statistics.fmean(v) / base:.3f}"] for k, v in res["cpu"].items()]
        lines += ["", "C. CPU only: a pure-Python loop per process, k processes at once", fmt_table(
            ["processes", "loops/s per process", "mean vs pinned x1"], rows)]
    return "\n".join(lines)


def _bench_label(e: dict) -> str:
    return f"r{e['repeat']} N={e['n']}{'' if e.get('pinned', True) else ' unpinned'}"


def threads_table(entries: list) -> str:
    """Per worker: cores its process used, its two hottest threads' share of the wall time on a CPU and
    waiting for one, involuntary switches, vCPUs seen, and samples on a physical core shared with another
    worker's hot thread."""
    rows = []
    for e in entries:
        for w, t in sorted(e.get("threads", {}).items()):
            tokens = sum(j["tokens"] for wave in e["raw"] for j in wave["jobs"] if j["worker"] == w)
            cpu_ms = t["hot_run"][0] * t.get("wall_s", 0) * 1000 / tokens if tokens and t["hot_run"] else None
            gpu = t.get("gpu_util")
            rows.append([_bench_label(e), w, f"{t['process_cores']:.2f}", t["threads_over_5pct"],
                         " / ".join(f"{x:.2f}" for x in t["hot_run"]), " / ".join(f"{x:.3f}" for x in t["hot_wait"]),
                         " / ".join(map(str, t["hot_involuntary"])), len(t["hot_cpus"]), f"{t['smt_shared']:.3f}",
                         f"{t.get('hot_steal_max', 0):.3f}", "" if gpu is None else f"{gpu:.2f}",
                         "" if cpu_ms is None else f"{cpu_ms:.3f}",
                         f"{e['workers'][w]['tok_s']:,.0f}" if w in e["workers"] else ""])
    return fmt_table(["run", "worker", "process cores", "threads >5%", "hot on-CPU", "hot runqueue wait",
                      "hot invol. sw", "vCPUs", "SMT shared", "steal (max vCPU)", "GPU util", "hot CPU ms/token",
                      "own tok/s"], rows)


def breakdown_table(entries: list, label) -> str:
    rows = []
    for e in entries:
        for worker, b in sorted(e["workers"].items()):
            rows.append([label(e), worker, f"{e['wave_ms']:.0f}", f"{b['recv_first']:.1f}-{b['recv_last']:.1f}",
                         f"{b['cohorts']:.2f} (max {b['cohorts_max']})", f"{b['sched_last']:.1f}",
                         f"{b['engine']:.0f}", f"{b['done']:.0f}", f"{b['straggle']:.0f}", f"{b['tok_s']:,.0f}"])
    return fmt_table(["run", "worker", "wave ms", "received ms", "cohorts", "last sched ms", "engine ms",
                      "done ms", "straggle ms", "own tok/s"], rows)


def _r(values: list, digits: int = 0) -> str:
    return ", ".join(f"{v:,.{digits}f}" for v in values)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=lambda v: sorted({int(x) for x in v.split(",")}), default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--phases", default="pools,bench", help="comma-separated: pools,bench,unpinned,cpu")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight per GPU")
    p.add_argument("--waves", type=int, default=3, help="timed waves per measurement")
    p.add_argument("--timeout", type=float, default=150)
    p.add_argument("--budget", type=float, default=480, help="no step starts after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the plumbing (no GPU)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.smoke:
        args.new_tokens, args.prompt_len, args.concurrency, args.waves, args.repeats = 4, 8, 2, 1, 1
    args.gpus = sorted(set(args.gpus) | {1})
    if not args.smoke:
        require_gpus(max(args.gpus), "diag_scaling")
    diag, steps = Diag(args), Steps(args.budget)
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv), "args": vars(args),
           "engine": diag.bench.cb}
    res["model"] = steps.run("build model", diag.bench.build)
    top = max(args.gpus)
    if res["model"] and "pools" in args.phases and top > 1:
        steps.run(f"pools x{top}", diag.pools, top)
    if "cpu" in args.phases:
        res["cpu"] = steps.run("cpu check", cpu_check, sorted({1, *args.gpus}))
    if res["model"] and "bench" in args.phases:
        for r in range(args.repeats):
            for n in args.gpus:
                steps.run(f"bench N={n} r{r}", diag.bench_mode, n, r)
                if n > 1 and "unpinned" in args.phases:
                    steps.run(f"bench N={n} r{r} unpinned", diag.bench_mode, n, r, False)
    res.update(diag.results, errors=steps.errors)
    print()
    print(f"diag_scaling  {res['date']}  {'SMOKE (CPU)' if args.smoke else 'GPU'}  concurrency {args.concurrency}/GPU"
          f"  {args.new_tokens} new tokens  prompt {args.prompt_len}  {args.waves} waves per measurement")
    print(report(res, args.gpus))
    finish(res, steps.errors, args.out, "diag_scaling.json")
    return 0 if not steps.errors else 1


if __name__ == "__main__":
    sys.exit(main())
