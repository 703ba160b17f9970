#!/usr/bin/env python
"""GPU check of the generate handler (issue 3, section 6). Device tool: nvidia-h200-x2.

  parity      The seed-000 case. Two pools serve two different random-weight Llamas (built here, saved
              with save_pretrained, loaded through the pool config), one per GPU, both driven at once.
              Each pool's greedy output must be identical to a single-process, in-process run of that
              model alone on the same GPU (transformers continuous batching, one CB manager).
              PASS criterion: prompts one at a time per pool (both pools concurrently), identical token
              for token. Reported too: all prompts at once (batch composition may differ, so float
              rounding may differ; shown as a count).
  throughput  One worker at concurrency 1, 8 and 32 against in-process generation on the same GPU in
              the same run, same model, prompts, engine config and wave pattern (submit a wave of `c`
              prompts, wait for all of it, repeat). Two in-process baselines: "manager" (one CB
              manager started once and fed request by request, exactly as the worker drives it) and
              `generate_batch(..., persistent_manager=True)`, one call per wave. Goal: orchestrator
              >= 0.98 x in-process; the verdict uses the stricter "manager" baseline.

Prints a table; writes JSON to --out and to $OUT/gpu_check_models.json when $OUT is set. Each step
catches its own errors, so one failure still leaves the others' figures. `--smoke` runs the same
plumbing tiny on CPU (no GPU needed). Exit status: 0 when every check ran and passed, 1 otherwise.

  PYTHONPATH=$PWD python scripts/gpu_check_models.py --out docs/bench_results/gpu_check_models.json
"""
import os

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
               "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_k, _v)  # before anything can start CUDA; every child inherits them

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    Serve, Steps, finish, fmt_table, make_prompts, orch_waves, require_gpus, run_role, split_waves,
    write_json, write_pools_toml,
)

# Two clearly different models for the parity check (float32: exact comparisons, small and fast).
ARCH_A = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=512, vocab_size=1024, max_position_embeddings=1024)
ARCH_B = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=3,
              intermediate_size=1024, vocab_size=2048, max_position_embeddings=1024)
# Throughput: the issue-8 baseline shape (16 layers x 1024, bf16), about 0.27B parameters.
ARCH_M = dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
              intermediate_size=2816, vocab_size=32000, max_position_embeddings=2048)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1000, max_position_embeddings=512)
# One engine config for the handler and the in-process baseline alike (explicit, so that neither
# sizes its KV cache from free GPU memory and both batch the same way).
CB = {"num_blocks": 128, "max_batch_tokens": 2048, "max_requests_per_batch": 64}
METHODS = ("manager", "generate_batch")  # in-process baselines; the goal is against the stricter one
CB_SMOKE = {"num_blocks": 16, "max_batch_tokens": 256, "max_requests_per_batch": 64}


def settings(args) -> dict:
    if args.smoke:
        return dict(arch_a=TINY, arch_b={**TINY, "hidden_size": 96, "num_hidden_layers": 3},
                    arch_m=TINY, dtype_m="float32", cb=CB_SMOKE, dev=("cpu:1", "cpu:1"),
                    cuda=(None, None), levels=[1, 2, 4], new_tokens=6, prompt_len=8, waves=2,
                    parity_prompts=3, parity_tokens=6)
    return dict(arch_a=ARCH_A, arch_b=ARCH_B, arch_m=ARCH_M, dtype_m="bfloat16", cb=CB, dev=("0", "1"),
                cuda=("0", "1"), levels=args.levels, new_tokens=args.new_tokens,
                prompt_len=args.prompt_len, waves=args.waves, parity_prompts=args.parity_prompts,
                parity_tokens=args.parity_tokens)


def role_env(cuda: str | None) -> tuple[dict, str]:
    """Environment and torch device for a baseline process on physical GPU `cuda` (None: CPU)."""
    if cuda is None:
        return {"CUDA_VISIBLE_DEVICES": ""}, "cpu"
    return {"CUDA_VISIBLE_DEVICES": cuda, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, "cuda:0"


def pool(model: str, dtype: str, devices: str, cb: dict, capacity: int, cap: int) -> dict:
    return {"handler": "generate", "devices": devices, "capacity": capacity, "max_restarts": 0,
            "config": {"model": model, "dtype": dtype, "cb": cb, "capacity": capacity,
                       "max_new_tokens_cap": max(cap, 64)}}


# ------------------------------------------------------------------------------------------ parity


def parity(s: dict, work: str, models: dict, timeout: float) -> dict:
    names = ("a", "b")
    prompts = {n: make_prompts(s["parity_prompts"], s["prompt_len"], s[f"arch_{n}"]["vocab_size"], seed=i)
               for i, n in enumerate(names)}
    T = s["parity_tokens"]
    cfg = write_pools_toml(os.path.join(work, "parity.toml"), {
        f"gen_{n}": pool(models[n], "float32", s["dev"][i], s["cb"], 8, T) for i, n in enumerate(names)})
    with Serve(["--config", cfg]).start(timeout=timeout) as serve:
        def drive(n: str) -> dict:
            from orchestrator import Client

            with Client(serve.address) as c:
                seq = orch_waves(c, f"gen_{n}", [[p] for p in prompts[n]], T, timeout)["outputs"]
                batch = orch_waves(c, f"gen_{n}", [prompts[n]], T, timeout)["outputs"]
            return {"seq": seq, "batch": batch}

        with ThreadPoolExecutor(2) as ex:  # both pools at once: the seed-000 situation
            orch = dict(zip(names, ex.map(drive, names)))
    refs = {}

    def reference(i: int, n: str) -> dict:
        env, device = role_env(s["cuda"][i])
        spec = {"model": models[n], "dtype": "float32", "device": device, "new_tokens": T, "cb": s["cb"],
                "warmup": [[prompts[n][0]]], "runs": {"seq": [[p] for p in prompts[n]],
                                                      "batch": [prompts[n]]}, "methods": ["manager"]}
        return run_role("inproc", spec, env, timeout)["manager"]

    with ThreadPoolExecutor(2) as ex:  # each alone on its own GPU, in its own process
        refs = dict(zip(names, ex.map(reference, range(2), names)))
    out = {}
    for n in names:
        ref_seq, ref_batch = refs[n]["seq"]["outputs"], refs[n]["batch"]["outputs"]
        out[n] = {"prompts": len(prompts[n]), "new_tokens": T, "devices": s["dev"][names.index(n)],
                  "seq_identical": sum(a == b for a, b in zip(orch[n]["seq"], ref_seq)),
                  "batch_identical": sum(a == b for a, b in zip(orch[n]["batch"], ref_batch)),
                  "first_diff": _first_diff(orch[n]["seq"], ref_seq)}
        out[n]["passed"] = out[n]["seq_identical"] == len(prompts[n])
    # The two models must really differ, or the check could not see cross-talk between them.
    out["models_differ"] = orch["a"]["seq"] != orch["b"]["seq"]
    out["passed"] = all(out[n]["passed"] for n in names) and out["models_differ"]
    return out


def _first_diff(got: list, want: list):
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            k = next((j for j, (x, y) in enumerate(zip(g, w)) if x != y), min(len(g), len(w)))
            return {"prompt": i, "token": k, "got": g[k:k + 5], "want": w[k:k + 5]}
    return None


# -------------------------------------------------------------------------------------- throughput


def throughput(s: dict, work: str, model: str, timeout: float) -> dict:
    levels, T = s["levels"], s["new_tokens"]
    prompts = make_prompts(sum(c * s["waves"] for c in levels) + max(levels), s["prompt_len"],
                           s["arch_m"]["vocab_size"], seed=7)
    warm, rest = prompts[:max(levels)], prompts[max(levels):]
    runs = {}
    for c in levels:
        runs[str(c)], rest = split_waves(rest[:c * s["waves"]], c), rest[c * s["waves"]:]
    res: dict = {"levels": levels, "new_tokens": T, "prompt_len": s["prompt_len"], "waves": s["waves"]}
    steps = Steps()
    res["orchestrator"] = steps.run("throughput: orchestrator, 1 worker", _orch_levels, s, work, model,
                                    warm, runs, timeout)
    env, device = role_env(s["cuda"][0])
    spec = {"model": model, "dtype": s["dtype_m"], "device": device, "new_tokens": T, "cb": s["cb"],
            "warmup": [warm], "runs": runs, "methods": list(METHODS)}
    res["inproc"] = steps.run("throughput: in-process (CB manager, generate_batch)", run_role, "inproc", spec,
                              env, timeout)
    res["errors"] = steps.errors
    if res["orchestrator"] and res["inproc"]:
        res["rows"] = _rows(res, levels)
        res["passed"] = all(r["ratio_manager"] >= 0.98 for r in res["rows"])
    return res


def _orch_levels(s: dict, work: str, model: str, warm: list, runs: dict, timeout: float) -> dict:
    from orchestrator import Client

    cfg = write_pools_toml(os.path.join(work, "tput.toml"), {
        "gen": pool(model, s["dtype_m"], s["dev"][0], s["cb"], max(s["levels"]), s["new_tokens"])})
    with Serve(["--config", cfg]).start(timeout=timeout) as serve, Client(serve.address) as c:
        orch_waves(c, "gen", [warm], s["new_tokens"], timeout)
        return {"ready_s": serve.ready_s,
                "runs": {k: orch_waves(c, "gen", waves, s["new_tokens"], timeout) for k, waves in runs.items()}}


def _rows(res: dict, levels: list) -> list:
    rows = []
    for c in levels:
        o = res["orchestrator"]["runs"][str(c)]
        row = {"concurrency": c, "tokens": o["tokens"], "orch_tok_s": o["tokens"] / o["seconds"]}
        for method in METHODS:
            i = res["inproc"][method][str(c)]
            row[f"{method}_tok_s"] = i["tokens"] / i["seconds"]
            row[f"ratio_{method}"] = row["orch_tok_s"] / row[f"{method}_tok_s"]
        same = sum(a == b for a, b in zip(o["outputs"], res["inproc"]["manager"][str(c)]["outputs"]))
        row["identical_outputs"] = f"{same}/{len(o['outputs'])}"
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------- main


def report(res: dict) -> str:
    lines = []
    par = res.get("parity")
    if par:
        rows = [[f"gen_{n} (devices {par[n].get('devices', i)})", f"{par[n]['seq_identical']}/{par[n]['prompts']}",
                 f"{par[n]['batch_identical']}/{par[n]['prompts']}", "PASS" if par[n]["passed"] else "FAIL"]
                for i, n in enumerate(("a", "b"))]
        lines += ["parity (seed-000): two pools, two models, one per GPU, concurrently; greedy, "
                  f"{par['a']['new_tokens']} new tokens",
                  fmt_table(["pool", "identical, one at a time", "identical, all at once", "verdict"], rows),
                  f"models differ: {par['models_differ']}   overall: {'PASS' if par['passed'] else 'FAIL'}"]
    tp = res.get("throughput") or {}
    if tp.get("rows"):
        rows = [[r["concurrency"], f"{r['orch_tok_s']:,.0f}", f"{r['manager_tok_s']:,.0f}",
                 f"{r['ratio_manager']:.3f}", f"{r['generate_batch_tok_s']:,.0f}", f"{r['ratio_generate_batch']:.3f}",
                 r["identical_outputs"], "PASS" if r["ratio_manager"] >= 0.98 else "MISS"] for r in tp["rows"]]
        lines += ["", f"throughput: one worker vs in-process on the same GPU; {tp['new_tokens']} new tokens, "
                      f"prompt {tp['prompt_len']}, {tp['waves']} waves per level (manager = CB engine started "
                      f"once, as in the worker; generate_batch = one call per wave)",
                  fmt_table(["conc", "orch tok/s", "in-proc manager", "ratio", "generate_batch", "ratio",
                             "same tokens", ">= 0.98 (vs manager)"], rows),
                  f"worker cold start (serve launch -> ready): {tp['orchestrator']['ready_s']:.1f} s; "
                  f"in-process model load: {tp['inproc']['load_s']:.1f} s"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the plumbing (no GPU)")
    p.add_argument("--levels", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8, 32])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--waves", type=int, default=3, help="timed waves per concurrency level")
    p.add_argument("--parity-prompts", type=int, default=8)
    p.add_argument("--parity-tokens", type=int, default=32)
    p.add_argument("--skip", default="", help="comma-separated steps to skip: parity,throughput")
    p.add_argument("--timeout", type=float, default=180, help="seconds per server start or baseline")
    p.add_argument("--out", help="JSON results file (also $OUT/gpu_check_models.json)")
    args = p.parse_args(argv)
    if not args.smoke:
        require_gpus(2, "gpu_check_models")
    s = settings(args)
    started = time.time()
    work = tempfile.mkdtemp(prefix="gpu-check-models-")
    steps = Steps()
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": args.smoke, "args": vars(args),
                 "command": " ".join(sys.argv)}
    specs = [{"path": os.path.join(work, n), "arch": s[f"arch_{n}"], "seed": i + 1,
              "dtype": "float32" if n != "m" else s["dtype_m"]} for i, n in enumerate("abm")]
    env, device = role_env(s["cuda"][0])
    built = steps.run("build models", run_role, "build", {"device": device, "models": specs}, env, args.timeout)
    if built:
        res["models"] = {n: {k: v for k, v in m.items() if k != "path"} for n, m in zip("abm", built["models"])}
        paths = {n: m["path"] for n, m in zip("abm", built["models"])}
        if "parity" not in args.skip:
            res["parity"] = steps.run("parity (seed-000)", parity, s, work, paths, args.timeout)
            par = res["parity"]
            if par:
                print(f"  -> parity: a {par['a']['seq_identical']}/{par['a']['prompts']}, b "
                      f"{par['b']['seq_identical']}/{par['b']['prompts']} identical; "
                      f"{'PASS' if par['passed'] else 'FAIL'}", flush=True)
            write_json({**res, "errors": steps.errors, "partial": True}, args.out, "gpu_check_models.json")
        if "throughput" not in args.skip:
            res["throughput"] = steps.run("throughput", throughput, s, work, paths["m"], args.timeout)
    errors = {**steps.errors, **((res.get("throughput") or {}).get("errors") or {})}
    res["errors"], res["seconds"] = errors, round(time.time() - started, 1)
    print()
    print(f"gpu_check_models  {res['date']}  {'SMOKE (CPU)' if args.smoke else 'GPU'}  {res['seconds']:.0f} s")
    print(report(res))
    finish(_strip_outputs(res), errors, args.out, "gpu_check_models.json")
    ok = not errors and (res.get("parity") or {}).get("passed") and (res.get("throughput") or {}).get("passed")
    return 0 if ok else 1


def _strip_outputs(res: dict) -> dict:
    """Token lists are for comparisons only; keep the JSON small."""
    tp = res.get("throughput") or {}
    runs = list(((tp.get("orchestrator") or {}).get("runs") or {}).values())
    runs += [r for m in METHODS for r in ((tp.get("inproc") or {}).get(m) or {}).values()]
    for run in runs:
        run.pop("outputs", None)
    return res


if __name__ == "__main__":
    sys.exit(main())
