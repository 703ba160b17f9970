#!/usr/bin/env python
"""GPU scaling. Device tool: nvidia-h200-x4 (also runs on x2 with --gpus 1,2).

One model and one workload in every mode: a random-weight Llama of about 0.87B parameters in bf16
(16 layers x 2048, built here and saved with save_pretrained), greedy, `--new-tokens` per request,
prompts of `--prompt-len` random ids, `--concurrency` requests per GPU. Every mode runs the same
pattern: an untimed warm-up wave, then `--waves` timed waves, each a wave of `concurrency` distinct
prompts per GPU submitted at once and awaited in full. One generation engine everywhere: transformers
continuous batching (CB) with one explicit engine config (KV blocks, token budget, batch size), so
that no mode sizes its cache from free memory.

  orchestrator N  `orchestrator serve`, one generate worker per GPU on GPUs 0..N-1, capacity =
                  concurrency; the client submits N x concurrency jobs per wave. Inside each worker the
                  handler runs one CB manager, started once (`init_continuous_batching`).
  in-process      GPU 0, in a process of its own, two ways: "CB manager" (one manager started once and
                  fed request by request, exactly as the worker drives it: the strict baseline that the
                  ratios use) and `generate_batch(..., persistent_manager=True)`, one call per wave (the
                  public one-call API; each call also starts and stops the engine thread).
  threads N       N models on GPUs 0..N-1 in one process, one thread each running the same waves on its
                  own CB manager (the in-process method). If that fails (the seed-000 failure mode), the
                  error is reported and the threads run again with plain `model.generate` on a static
                  batch (same prompts and token counts); the table names the method used.

Output: tok/s per mode; scaling efficiency (N workers / (N x 1 worker)); ratio to in-process
(N workers / (N x in-process)); orchestrator N vs threads N; cold start (serve launch until all N
workers are READY) against one worker. Goals: efficiency >= 0.97 at N = 2 and 4; 1 worker >= 0.98 x
in-process; orchestrator N=4 >= 4x threads N=4; cold start N / cold start 1 <= 1.2.
With `--repeats R` each orchestrator mode runs R times (N alternating, a fresh server each time) and the
table gives medians, with efficiency paired by repeat: one worker's rate follows the speed of the single
CPU core its engine thread runs on, which differs from server to server (docs/benchmarks.md, "Where the
time goes").
Writes JSON to --out and $OUT/bench_gpu_scaling.json. `--smoke`: tiny CPU run of the plumbing.

  python3 -m scripts.bench_gpu_scaling --gpus 1,2,4 --repeats 3 --budget 480 \
      --out docs/bench_results/gpu_scaling.json

Engine comparison (`--levels 16,64,128`, one GPU): the generate handler's engine defaults against
the old ones, and against in-process with the same engine, at several concurrency levels. Each level has
its own engine sizing (engine_config: KV blocks, token budget), as in the scaling runs: with graphs and
sdpa the engine's speed falls with its cache's size (docs/benchmarks.md, "Why graphs with sdpa need a small
cache"), so one sizing for every
level would understate the low ones. Per repeat, one fresh server with one pool per level (all on GPU 0,
driven one at a time) or one process with one engine per level; per level an untimed wave, then `--waves`
timed waves:

  new         orchestrator, one worker, the handler's defaults (on CUDA: CUDA graphs, async batching,
              warm-up inside load());
  old         orchestrator, one worker, without graphs and warm-up (`use_cuda_graph` and
              `use_async_batching` false, no warm-up);
  inproc      the CB manager in a process of its own with the new defaults' switches (graphs, async
              batching, KV reads padded to 1,024), warmed with `manager.warmup()` and the untimed wave.

Ratios are paired by repeat (median over repeats). Goals: new >= 2.5 x old at 16 and >= 1.8 x at 64;
new >= 0.98 x in-process at every level. `--parity` first checks, on a small float32 Llama, that the
new defaults' greedy output equals plain `model.generate` token for token (prompts one at a time, then
all at once).

  python3 -m scripts.bench_gpu_scaling --gpus 1 --levels 16,64,128 --repeats 2 --parity \
      --out docs/bench_results/gpu_engines.json
"""
import argparse
import os
import sys
import tempfile
import time

from scripts._bench_common import (
    Serve, Steps, finish, fmt_table, make_prompts, orch_waves, require_gpus, run_role, split_waves,
    write_json, write_pools_toml,
)

ARCH = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
            intermediate_size=5504, vocab_size=32000, max_position_embeddings=2048)  # ~0.87B
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1000, max_position_embeddings=512)


def engine_config(concurrency: int, prompt_len: int, new_tokens: int, smoke: bool) -> dict:
    """KV blocks for every in-flight request twice over, and a prefill budget for one whole wave."""
    per_request = -(-(prompt_len + new_tokens) // 256)
    return {"num_blocks": 2 * concurrency * per_request + 8,
            "max_batch_tokens": 256 if smoke else max(512, min(8192, concurrency * prompt_len)),
            "max_requests_per_batch": max(64, concurrency)}


class Bench:
    def __init__(self, args):
        self.args, self.smoke = args, args.smoke
        self.dtype = "float32" if args.smoke else "bfloat16"
        self.arch = TINY if args.smoke else ARCH
        self.cb = engine_config(args.concurrency, args.prompt_len, args.new_tokens, args.smoke)
        self.work = tempfile.mkdtemp(prefix="bench-gpu-scaling-")
        n_max, c, w = max(args.gpus), args.concurrency, args.waves
        # Per GPU index: its own warm-up wave and timed waves; GPU g sees the same prompts in every mode.
        prompts = make_prompts(n_max * c * (w + 1), args.prompt_len, self.arch["vocab_size"], seed=11)
        per_gpu = [prompts[g * c * (w + 1):(g + 1) * c * (w + 1)] for g in range(n_max)]
        self.warm = [p[:c] for p in per_gpu]
        self.timed = [split_waves(p[c:], c) for p in per_gpu]
        self.model = None

    # -------------------------------------------------------------------------------- environment

    def devices(self, n: int) -> str:
        return f"cpu:{n}" if self.smoke else ",".join(str(g) for g in range(n))

    def role_env(self, n: int) -> tuple[dict, list]:
        if self.smoke:
            return {"CUDA_VISIBLE_DEVICES": ""}, ["cpu"] * n
        return ({"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(n)), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
                [f"cuda:{g}" for g in range(n)])

    # -------------------------------------------------------------------------------------- modes

    def build(self) -> dict:
        env, devices = self.role_env(1)
        spec = {"device": devices[0], "models": [{"path": os.path.join(self.work, "llama"), "arch": self.arch,
                                                  "seed": 0, "dtype": self.dtype}]}
        info = run_role("build", spec, env, self.args.timeout)["models"][0]
        self.model = info.pop("path")
        return info

    def orchestrator(self, n: int) -> dict:
        """n workers, one per GPU; the wave for each step holds `concurrency` prompts per GPU."""
        from orchestrator import Client

        a = self.args
        cfg = write_pools_toml(os.path.join(self.work, f"orch{n}.toml"), {"gen": {
            "handler": "generate", "devices": self.devices(n), "capacity": a.concurrency, "max_restarts": 0,
            "config": {"model": self.model, "dtype": self.dtype, "cb": self.cb, "capacity": a.concurrency,
                       "max_new_tokens_cap": max(64, a.new_tokens)}}})
        waves = [sum((self.timed[g][k] for g in range(n)), []) for k in range(a.waves)]
        with Serve(["--config", cfg]).start(timeout=a.timeout) as serve, Client(serve.address) as c:
            orch_waves(c, "gen", [sum(self.warm[:n], [])], a.new_tokens, a.timeout)
            run = orch_waves(c, "gen", waves, a.new_tokens, a.timeout)
            workers = c.status()["pools"]["gen"]["workers"]
        served = {w["name"]: w["completed"] for w in workers}
        # Where each worker's start went (its READY info): boot, load and the load's phases.
        starts = {w["name"]: {k: w["info"].get(k) for k in ("boot_s", "load_s", "load_phases")} for w in workers}
        return {"n": n, "cold_start_s": serve.ready_s, "seconds": run["seconds"], "tokens": run["tokens"],
                "tok_s": run["tokens"] / run["seconds"], "served": served, "starts": starts}

    def inproc(self, methods: tuple = ("manager", "generate_batch")) -> dict:
        env, devices = self.role_env(1)
        spec = {"model": self.model, "dtype": self.dtype, "device": devices[0], "new_tokens": self.args.new_tokens,
                "cb": self.cb, "warmup": [self.warm[0]], "runs": {"timed": self.timed[0]}, "methods": list(methods)}
        out = run_role("inproc", spec, env, self.args.timeout)
        res = {"n": 1, "load_s": out["load_s"]}
        for method in methods:
            run = out[method]["timed"]
            res[method] = {"seconds": run["seconds"], "tokens": run["tokens"], "tok_s": run["tokens"] / run["seconds"]}
        res["tok_s"] = res["manager"]["tok_s"]  # the stricter baseline: the engine a worker runs
        return res

    def threads(self, n: int) -> dict:
        env, devices = self.role_env(n)
        # Per thread (= per GPU): its warm-up waves and its timed waves, as in the other modes.
        spec = {"model": self.model, "dtype": self.dtype, "devices": devices, "new_tokens": self.args.new_tokens,
                "cb": self.cb, "warmup": [[w] for w in self.warm[:n]], "timed": self.timed[:n]}
        tried = []
        for method in ("manager", "generate"):
            try:
                out = run_role("threads", {**spec, "method": method}, env, self.args.timeout)
            except Exception as e:  # a hang or a crash of the whole process: try the next method
                out = {"errors": [f"{type(e).__name__}: {str(e)[-800:]}"]}
            tried.append({"method": method, "errors": out["errors"]})
            if not out["errors"]:
                return {"n": n, "method": method, "seconds": out["seconds"], "tokens": out["tokens"],
                        "tok_s": out["tokens"] / out["seconds"], "tried": tried}
            print(f"  threads x{n} with {method} failed: {out['errors'][:2]}", flush=True)
        raise RuntimeError(f"threads x{n}: every method failed: {tried}")


# ------------------------------------------------------------------------------------ engine comparison

OLD_SWITCHES = {"use_cuda_graph": False, "use_async_batching": False}
NEW_SWITCHES = {"use_cuda_graph": True, "use_async_batching": True}
NEW_KV_PADDING = 1024  # the generate handler's default with graphs and sdpa (GRAPHED_KV_PADDING)
PARITY_ARCH = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=512, vocab_size=1024, max_position_embeddings=1024)


class Engines:
    """The engine comparison: see the module docstring."""

    def __init__(self, bench: Bench, args):
        self.bench, self.args = bench, args
        self.cb = {}
        self.levels = {}
        for i, c in enumerate(args.levels):
            prompts = make_prompts(c * (args.waves + 1), args.prompt_len, bench.arch["vocab_size"], seed=100 + i)
            self.cb[str(c)] = engine_config(c, args.prompt_len, args.new_tokens, args.smoke)
            self.levels[str(c)] = {"warmup": [prompts[:c]], "timed": split_waves(prompts[c:], c),
                                   "cb": self.cb[str(c)]}

    def orchestrator(self, engine: str) -> dict:
        from orchestrator import Client

        a, b = self.args, self.bench
        pools = {}
        for name, level in self.levels.items():  # one pool per level, each with that level's engine sizing
            config = {"model": b.model, "dtype": b.dtype, "capacity": int(name),
                      "max_new_tokens_cap": max(64, a.new_tokens), "cb": dict(level["cb"])}
            if engine == "old":
                config["cb"].update(OLD_SWITCHES)
                config["warmup"] = False
            pools[f"gen{name}"] = {"handler": "generate", "devices": b.devices(1), "capacity": int(name),
                                   "max_restarts": 0, "config": config}
        cfg = write_pools_toml(os.path.join(b.work, f"engine_{engine}.toml"), pools)
        out, starts = {}, {}
        with Serve(["--config", cfg]).start(timeout=a.timeout) as serve, Client(serve.address) as c:
            for name, level in self.levels.items():
                orch_waves(c, f"gen{name}", level["warmup"], a.new_tokens, a.timeout)
                run = orch_waves(c, f"gen{name}", level["timed"], a.new_tokens, a.timeout)
                out[name] = {"seconds": run["seconds"], "tokens": run["tokens"],
                             "tok_s": run["tokens"] / run["seconds"]}
            status = c.status()["pools"]
        for name in self.levels:
            info = status[f"gen{name}"]["workers"][0]["info"]
            starts[name] = {k: info.get(k) for k in ("boot_s", "load_s", "load_phases", "engine", "transformers")}
        return {"levels": out, "cold_start_s": serve.ready_s, "start": starts}

    def inproc(self) -> dict:
        a, b = self.args, self.bench
        env, devices = b.role_env(1)
        switches = {} if a.smoke else {**NEW_SWITCHES, "kv_padding_interval_size": NEW_KV_PADDING}
        levels = {k: {**v, "cb": {**v["cb"], **switches}} for k, v in self.levels.items()}
        spec = {"model": b.model, "dtype": b.dtype, "device": devices[0], "new_tokens": a.new_tokens, "cb": {},
                "levels": levels, "methods": ["manager"], "engine_warmup": not a.smoke}
        out = run_role("inproc", spec, env, a.timeout + 60 * len(self.levels))["manager"]
        return {"levels": {k: {**v, "tok_s": v["tokens"] / v["seconds"]} for k, v in out.items()}}

    def parity(self) -> dict:
        """The new defaults' greedy output against `model.generate`, on a small float32 model."""
        from orchestrator import Client

        a, b = self.args, self.bench
        env, devices = b.role_env(1)
        path = os.path.join(b.work, "parity")
        run_role("build", {"device": devices[0], "models": [{"path": path, "arch": TINY if a.smoke else PARITY_ARCH,
                                                            "seed": 3, "dtype": "float32"}]}, env, a.timeout)
        vocab = (TINY if a.smoke else PARITY_ARCH)["vocab_size"]
        import random

        rng = random.Random(7)
        prompts = [[rng.randrange(2, vocab) for _ in range(rng.randint(4, 80))] for _ in range(24)]
        n_new = 8 if a.smoke else 48
        want = run_role("greedy", {"model": path, "dtype": "float32", "device": devices[0], "new_tokens": n_new,
                                   "prompts": prompts}, env, a.timeout)["outputs"]
        cfg = write_pools_toml(os.path.join(b.work, "parity.toml"), {"gen": {
            "handler": "generate", "devices": b.devices(1), "max_restarts": 0,
            "config": {"model": path, "dtype": "float32", "capacity": 32, "cb": {"num_blocks": 64,
                                                                                "max_batch_tokens": 2048}}}})
        with Serve(["--config", cfg]).start(timeout=a.timeout) as serve, Client(serve.address) as c:
            one = [c.run("gen", {"input_ids": p, "max_new_tokens": n_new}, timeout=a.timeout)["token_ids"]
                   for p in prompts]
            handles = [c.submit("gen", {"input_ids": p, "max_new_tokens": n_new}) for p in prompts]
            together = [h.result(a.timeout)["token_ids"] for h in handles]
            engine = c.status()["pools"]["gen"]["workers"][0]["info"].get("engine")
        return {"prompts": len(prompts), "new_tokens": n_new, "engine": engine,
                "identical_one_at_a_time": sum(x == y for x, y in zip(one, want)),
                "identical_all_at_once": sum(x == y for x, y in zip(together, want))}


def arrival(eng: Engines, level: str, admit_ms: float) -> dict:
    """One pool of `level` with the new defaults and admit_window_ms; per timed wave: tok/s, and how far
    apart the jobs reached the worker (received) and entered the engine (first scheduled), from each
    result's timing (one CLOCK_MONOTONIC for every process of the host)."""
    from orchestrator import Client

    a, b, lv = eng.args, eng.bench, eng.levels[level]
    config = {"model": b.model, "dtype": b.dtype, "capacity": int(level), "max_new_tokens_cap": max(64, a.new_tokens),
              "cb": dict(lv["cb"]), "admit_window_ms": admit_ms}
    cfg = write_pools_toml(os.path.join(b.work, f"arrival_{admit_ms}.toml"), {"gen": {
        "handler": "generate", "devices": b.devices(1), "capacity": int(level), "max_restarts": 0, "config": config}})
    waves = []
    with Serve(["--config", cfg]).start(timeout=a.timeout) as serve, Client(serve.address) as c:
        orch_waves(c, "gen", lv["warmup"], a.new_tokens, a.timeout)
        for wave in lv["timed"]:
            t0 = time.perf_counter()
            handles = [c.submit("gen", {"input_ids": p, "max_new_tokens": a.new_tokens}) for p in wave]
            outs = [h.result(a.timeout) for h in handles]
            secs = time.perf_counter() - t0
            rec = [o["timing"]["received"] for o in outs]
            sch = [o["timing"]["scheduled"] for o in outs if o["timing"]["scheduled"]]
            waves.append({"tok_s": sum(len(o["token_ids"]) for o in outs) / secs,
                          "received_spread_ms": (max(rec) - min(rec)) * 1000,
                          "scheduled_spread_ms": (max(sch) - min(sch)) * 1000 if sch else None,
                          "submit_to_first_received_ms": (min(rec) - t0) * 1000})
    del serve
    return {"level": level, "admit_window_ms": admit_ms, "waves": waves}


def engine_plan(eng: Engines, args) -> list:
    """(kind, name, fn) in run order: per repeat new, old, in-process (alternating which comes first, so that
    neither always runs on a cooler or warmer machine)."""
    plan = [("parity", "parity (new defaults vs model.generate)", eng.parity)] if args.parity else []
    for admit in args.arrival:
        plan.append(("arrival", f"arrival at {max(args.levels)}, admit window {admit} ms",
                     lambda w=admit: arrival(eng, str(max(args.levels)), w)))
    for r in range(args.repeats):
        order = ["new", "old", "inproc"] if r % 2 == 0 else ["inproc", "old", "new"]
        for kind in order:
            name = f"{kind} (repeat {r + 1}/{args.repeats})"
            fn = eng.inproc if kind == "inproc" else (lambda k=kind: eng.orchestrator(k))
            plan.append((kind, name, fn))
    return plan


def summarize_engines(res: dict, levels: list) -> tuple[str, dict]:
    import statistics

    runs = res["engines"]
    rows, goals = [], {}
    for c in levels:
        key = str(c)
        tok = {k: [r["levels"][key]["tok_s"] for r in runs.get(k, [])] for k in ("new", "old", "inproc")}
        new_old = [x / y for x, y in zip(tok["new"], tok["old"])]
        new_in = [x / y for x, y in zip(tok["new"], tok["inproc"])]
        med = lambda v: statistics.median(v) if v else None  # noqa: E731
        rows.append([c, *(f"{med(tok[k]):,.0f}" if tok[k] else "" for k in ("new", "old", "inproc")),
                     _f(med(new_old)), ", ".join(f"{v:.2f}" for v in new_old),
                     _f(med(new_in)), ", ".join(f"{v:.3f}" for v in new_in),
                     " / ".join(", ".join(f"{v:,.0f}" for v in tok[k]) for k in ("new", "old", "inproc"))])
        target = {16: 2.5, 64: 1.8}.get(c)
        if target and new_old:
            goals[f"new_vs_old_{c}"] = {"value": med(new_old), "target": f">= {target}",
                                        "passed": med(new_old) >= target}
        if new_in:
            goals[f"new_vs_inproc_{c}"] = {"value": med(new_in), "target": ">= 0.98", "passed": med(new_in) >= 0.98}
    table = fmt_table(["concurrency", "new tok/s", "old tok/s", "in-proc tok/s", "new/old", "per repeat",
                       "new/in-proc", "per repeat", "tok/s per repeat (new / old / in-proc)"], rows)
    lines = [table, ""]
    for kind in ("new", "old"):
        for r in runs.get(kind, []):
            for level, st in r["start"].items():
                lines.append(f"start {kind} (pool of level {level}, server ready in {r['cold_start_s']:.1f} s): "
                             f"boot {st['boot_s']} s, load {st['load_s']} s: {st['load_phases']}")
    for level, st in (runs.get("new") or [{}])[0].get("start", {}).items():
        lines.append(f"new engine, level {level} (READY info): {st.get('engine')}")
    if res.get("parity"):
        pr = res["parity"]
        lines.append(f"parity: {pr['identical_one_at_a_time']}/{pr['prompts']} identical one at a time, "
                     f"{pr['identical_all_at_once']}/{pr['prompts']} all at once ({pr['new_tokens']} new tokens)")
        goals["parity_one_at_a_time"] = {"value": pr["identical_one_at_a_time"] / pr["prompts"], "target": "== 1",
                                         "passed": pr["identical_one_at_a_time"] == pr["prompts"]}
    lines += [f"goal {k}: {g['value']:.3f} (target {g['target']}) {'PASS' if g['passed'] else 'MISS'}"
              for k, g in goals.items()]
    return "\n".join(lines), goals


def run_engines(args, bench: Bench, res: dict, steps: Steps) -> None:
    eng = Engines(bench, args)
    res.update(engine=eng.cb, engines={})
    for kind, name, fn in engine_plan(eng, args):
        r = steps.run(name, fn)
        if r is None:
            continue
        if kind == "parity":
            res["parity"] = r
        elif kind == "arrival":
            res.setdefault("arrival", []).append(r)
            for w in r["waves"]:
                print(f"  -> admit {r['admit_window_ms']} ms: {w['tok_s']:,.0f} tok/s, received spread "
                      f"{w['received_spread_ms']:.1f} ms, scheduled spread {w['scheduled_spread_ms']} ms", flush=True)
        else:
            res["engines"].setdefault(kind, []).append(r)
            print("  -> " + ", ".join(f"{c}: {v['tok_s']:,.0f} tok/s" for c, v in r["levels"].items()), flush=True)
        write_json({**res, "errors": steps.errors, "partial": True}, args.out, "bench_gpu_scaling.json")


def plan_steps(bench: Bench, args) -> list:
    """(kind, key, name, fn, args) in run order. The figures the goals need come first (1 and the largest
    N, in-process, threads at the largest N), the middle N last: if the time budget runs out, it is what
    gets skipped. With --repeats R the orchestrator modes run R times, alternating N (1, top, middle, 1,
    ...), each with a fresh server: a worker's rate follows the speed of the one CPU core its engine
    thread runs on, which differs between servers (docs/benchmarks.md, GPU scaling)."""
    top = max(args.gpus)
    middle = [n for n in args.gpus if 1 < n < top]
    order = [("orchestrator", 1, 0), ("orchestrator", top, 0), ("inproc", 1, 0), ("threads", top, 0)]
    for r in range(args.repeats):
        order += [("orchestrator", n, r) for n in [1, top, *middle]] + [("inproc", 1, r)]
    order += [(k, n, 0) for n in middle for k in ("orchestrator", "threads")]
    plan = []
    for kind, n, r in dict.fromkeys(order):
        if kind in args.skip or (kind == "threads" and n == 1):
            continue
        if kind == "inproc" and r == 0:
            plan.append(("inproc", None, "in-process (CB manager, generate_batch)", bench.inproc, ()))
        elif kind == "inproc":  # repeats: the strict baseline only, paired with the 1-worker run
            plan.append(("inproc", None, f"in-process (CB manager, repeat {r + 1}/{args.repeats})", bench.inproc,
                         (("manager",),)))
        else:
            suffix = f" (repeat {r + 1}/{args.repeats})" if kind == "orchestrator" and args.repeats > 1 else ""
            plan.append((kind, str(n), f"{kind} x{n}{suffix}", getattr(bench, kind), (n,)))
    return plan


def combine(runs: list) -> dict:
    """One mode over its repeats: the median tok/s (and cold start), and every run."""
    import statistics

    out = {"n": runs[0]["n"], "tok_s": statistics.median(r["tok_s"] for r in runs), "runs": runs}
    if "cold_start_s" in runs[0]:
        out["cold_start_s"] = statistics.median(r["cold_start_s"] for r in runs)
    return out


def paired_ratio(a_runs: list, b_runs: list, scale: int = 1) -> tuple[float | None, list]:
    """Median over repeats of b / (scale x a), pairing run k of each, and the per-repeat values."""
    import statistics

    vals = [b["tok_s"] / (scale * a["tok_s"]) for a, b in zip(a_runs, b_runs)]
    return (statistics.median(vals) if vals else None), vals


def summarize(res: dict, gpus: list) -> tuple[str, dict]:
    orch, thr, inp = res["orchestrator"], res["threads"], res.get("inproc")
    one = orch.get("1")
    rows, goals = [], {}
    if inp:
        rows.append(["in-process, CB manager", 1, f"{inp['tok_s']:,.0f}", "", "1.000", "", "", "",
                     ", ".join(f"{r['tok_s']:,.0f}" for r in inp.get("runs", []))])
        gb = inp["generate_batch"]["tok_s"]
        rows.append(["in-process, generate_batch", 1, f"{gb:,.0f}", "", _f(gb / inp["tok_s"]), "", "", ""])
    for n in gpus:
        o = orch.get(str(n))
        if o:
            # Each repeat's N workers against that repeat's 1 worker: runs minutes apart are never compared.
            eff, per_repeat = paired_ratio(one["runs"], o["runs"], n) if one else (None, [])
            vs_in = o["tok_s"] / (n * inp["tok_s"]) if inp else None
            if n == 1 and inp and inp.get("runs") and o.get("runs"):
                # 1 worker vs in-process, paired by repeat: both are one engine thread on one CPU core
                vs_in, per_repeat = paired_ratio(inp["runs"], o["runs"])
            cold = o["cold_start_s"] / one["cold_start_s"] if one else None
            rows.append([f"orchestrator, {n} worker(s)", n, f"{o['tok_s']:,.0f}", _f(eff), _f(vs_in), "",
                         f"{o['cold_start_s']:.1f}", _f(cold),
                         ", ".join(f"{r['tok_s']:,.0f}" for r in o.get("runs", [])),
                         ("" if n > 1 else "vs in-proc: ") + ", ".join(f"{e:.3f}" for e in per_repeat)])
            if n > 1 and eff is not None:
                goals[f"efficiency_{n}"] = (eff, ">= 0.97", eff >= 0.97)
                goals[f"cold_start_{n}_vs_1"] = (cold, "<= 1.2", cold <= 1.2)
            if n == 1 and vs_in is not None:
                goals["orch_1_vs_inproc"] = (vs_in, ">= 0.98", vs_in >= 0.98)
        t = thr.get(str(n))
        if t:
            vs_thr = o["tok_s"] / t["tok_s"] if o else None
            rows.append([f"threads ({t['method']}), {n}", n, f"{t['tok_s']:,.0f}", "",
                         _f(t["tok_s"] / (n * inp["tok_s"]) if inp else None), _f(vs_thr), "", ""])
            if n == max(gpus) and vs_thr is not None:
                goals[f"orch_{n}_vs_threads_{n}"] = (vs_thr, ">= 4", vs_thr >= 4)
    rows = [r + [""] * (10 - len(r)) for r in rows]
    table = fmt_table(["mode", "GPUs", "tok/s", "efficiency", "vs N x in-proc", "orch / threads",
                       "cold start s", "cold vs 1", "tok/s per repeat", "efficiency per repeat"], rows)
    lines = [table, "", cold_start_table(orch, gpus), ""]
    lines += [f"goal {k}: {v[0]:.3f} (target {v[1]}) {'PASS' if v[2] else 'MISS'}" for k, v in goals.items()]
    return "\n".join(lines), {k: {"value": v[0], "target": v[1], "passed": v[2]} for k, v in goals.items()}


def cold_start_table(orch: dict, gpus: list) -> str:
    """Per N, medians over repeats: serve launch -> all READY; the slowest worker's boot (interpreter and
    imports) and load, with the load's phases (READY info); and what is left (spawning, the coordinator,
    READY delivery)."""
    import statistics

    rows = []
    for n in gpus:
        runs = [r for r in orch.get(str(n), {}).get("runs", []) if r.get("starts")]
        if not runs:
            continue
        slowest = [max(r["starts"].values(), key=lambda w: (w["boot_s"] or 0) + (w["load_s"] or 0)) for r in runs]
        med = lambda xs: statistics.median(xs)  # noqa: E731
        total = [(w["boot_s"] or 0) + (w["load_s"] or 0) for w in slowest]
        phases = sorted({k for w in slowest for k in (w.get("load_phases") or {})})
        rows.append([n, f"{med([r['cold_start_s'] for r in runs]):.2f}", f"{med([w['boot_s'] for w in slowest]):.2f}",
                     f"{med([w['load_s'] for w in slowest]):.2f}",
                     "  ".join(f"{k.removesuffix('_s')} {med([(w.get('load_phases') or {}).get(k, 0) for w in slowest]):.2f}"
                               for k in phases),
                     f"{med([r['cold_start_s'] - t for r, t in zip(runs, total)]):.2f}"])
    return fmt_table(["N", "cold start s", "slowest worker boot s", "its load s", "its load phases s",
                      "rest s"], rows)


def _f(v) -> str:
    return "" if v is None else f"{v:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=lambda v: sorted({int(x) for x in v.split(",")}), default=[1, 2, 4],
                   help="worker counts to run, e.g. 1,2,4 (1 is always added: it is the reference)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight per GPU")
    p.add_argument("--waves", type=int, default=3, help="timed waves per mode")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each orchestrator mode, N alternating, each with a fresh server; tok/s, "
                        "cold start and efficiency are then medians (efficiency paired by repeat)")
    p.add_argument("--skip", default="", help="comma-separated: orchestrator,inproc,threads")
    p.add_argument("--timeout", type=float, default=150, help="seconds per server start or baseline")
    p.add_argument("--budget", type=float, default=330,
                   help="seconds after which no further mode is started (default 330: with --timeout, "
                        "the run ends within about 8 minutes whatever happens)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the plumbing (no GPU)")
    p.add_argument("--levels", type=lambda v: [int(x) for x in v.split(",")],
                   help="engine comparison at these concurrency levels (one GPU): see the module docstring")
    p.add_argument("--parity", action="store_true", help="with --levels: greedy parity check first")
    p.add_argument("--arrival", type=lambda v: [float(x) for x in v.split(",")], default=[],
                   help="with --levels: admit windows (ms) to diagnose at the top level: arrival spread per wave")
    p.add_argument("--out", help="JSON results file (also $OUT/bench_gpu_scaling.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.new_tokens, args.prompt_len, args.concurrency, args.waves = 4, 8, 2, 1
        args.levels = args.levels and [2, 4]
    args.gpus = sorted(set(args.gpus) | {1})
    if not args.smoke:
        require_gpus(max(args.gpus), "bench_gpu_scaling")
    started = time.time()
    bench, steps = Bench(args), Steps(args.budget)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv), "args": vars(args),
                 "engine": bench.cb, "orchestrator": {}, "threads": {}}
    res["model"] = steps.run("build model", bench.build)
    if args.levels and res["model"]:
        run_engines(args, bench, res, steps)
        table, goals = summarize_engines(res, args.levels)
        res.update(goals=goals, errors=steps.errors, seconds=round(time.time() - started, 1))
        print(f"\nbench_gpu_scaling engines  {res['date']}  {'SMOKE (CPU)' if args.smoke else 'GPU'}  "
              f"{res['seconds']:.0f} s  {args.new_tokens} new tokens  prompt {args.prompt_len}  {args.waves} waves  "
              f"engine {res['engine']}")
        print(table)
        finish(res, steps.errors, args.out, "bench_gpu_scaling.json")
        return 0 if not steps.errors else 1
    runs: dict = {}  # orchestrator N -> one result per repeat
    for kind, key, name, fn, fargs in plan_steps(bench, args) if res["model"] else []:
        r = steps.run(name, fn, *fargs)
        if r is None:
            continue
        print(f"  -> {name}: {r['tok_s']:,.0f} tok/s" + (f", cold start {r['cold_start_s']:.1f} s"
                                                          if "cold_start_s" in r else ""), flush=True)
        if kind == "orchestrator":
            runs.setdefault(key, []).append(r)
            res[kind][key] = combine(runs[key])
        elif kind == "inproc":
            runs.setdefault("inproc", []).append(r)
            res[kind] = {**runs["inproc"][0], **combine(runs["inproc"])}
        elif key is None:
            res[kind] = r
        else:
            res[kind][key] = r
        write_json({**res, "errors": steps.errors, "partial": True}, args.out, "bench_gpu_scaling.json")
    table, goals = summarize(res, args.gpus)
    res.update(goals=goals, errors=steps.errors, seconds=round(time.time() - started, 1))
    m = res.get("model") or {}
    print()
    print(f"bench_gpu_scaling  {res['date']}  {'SMOKE (CPU)' if args.smoke else 'GPU'}  {res['seconds']:.0f} s  "
          f"model {m.get('params', 0) / 1e9:.2f}B {m.get('dtype', '')}  concurrency {args.concurrency}/GPU  "
          f"{args.new_tokens} new tokens  prompt {args.prompt_len}  {args.waves} waves")
    print(table)
    finish(res, steps.errors, args.out, "bench_gpu_scaling.json")
    return 0 if not steps.errors else 1


if __name__ == "__main__":
    sys.exit(main())
