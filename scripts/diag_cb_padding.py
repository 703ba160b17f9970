#!/usr/bin/env python
"""Why CUDA graphs with sdpa run slower with a larger KV cache (issue 13): in-process CB tok/s of the
bench_gpu_scaling Llama under several engine configs, all with CUDA graphs and async batching on.

transformers pads a graphed varlen batch's KV reads to a multiple of `kv_padding_interval_size` (default
16384 tokens), capped at the cache's size (num_blocks x page_size); sdpa then attends over the padded
length with a mask. This sweeps the cache size and the interval at a few concurrency levels, one model
load, one manager per config (warmed with `manager.warmup()` and one untimed wave), `--waves` timed waves.

  PYTHONPATH=$PWD python scripts/diag_cb_padding.py --levels 16,64 --out docs/bench_results/cb_padding.json
"""
import os

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
               "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import Runner, build_llama, finish, fmt_table, load_model, make_prompts, split_waves  # noqa: E402
from bench_gpu_scaling import ARCH, TINY, engine_config  # noqa: E402

SWITCHES = {"use_cuda_graph": True, "use_async_batching": True}


def configs(c: int, args) -> dict:
    top = engine_config(max(args.levels), args.prompt_len, args.new_tokens, args.smoke)
    own = engine_config(c, args.prompt_len, args.new_tokens, args.smoke)
    out = {"top sizing": top, "own sizing": own}
    for kv in args.kv_intervals:
        out[f"top sizing, kv pad {kv}"] = {**top, "kv_padding_interval_size": kv}
    out[f"big cache (num_blocks {args.big_blocks}), kv pad {min(args.kv_intervals)}"] = {
        **top, "num_blocks": args.big_blocks, "kv_padding_interval_size": min(args.kv_intervals)}
    out[f"big cache (num_blocks {args.big_blocks})"] = {**top, "num_blocks": args.big_blocks}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=lambda v: [int(x) for x in v.split(",")], default=[16, 64])
    p.add_argument("--kv-intervals", type=lambda v: [int(x) for x in v.split(",")], default=[1024, 256])
    p.add_argument("--big-blocks", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--waves", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.smoke:
        args.levels, args.new_tokens, args.prompt_len, args.waves, args.big_blocks = [2], 4, 8, 1, 32
        args.kv_intervals = [256]
    device, dtype = ("cpu", "float32") if args.smoke else ("cuda:0", "bfloat16")
    arch = TINY if args.smoke else ARCH
    path = os.path.join(tempfile.mkdtemp(prefix="diag-cb-padding-"), "llama")
    build_llama(path, arch, 0, dtype, device)
    model = load_model(path, dtype, device)
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv), "runs": []}
    errors: dict = {}
    for i, c in enumerate(args.levels):
        prompts = make_prompts(c * (args.waves + 1), args.prompt_len, arch["vocab_size"], seed=100 + i)
        for name, cb in configs(c, args).items():
            cb = {**cb, **({} if args.smoke else SWITCHES)}
            try:
                runner = Runner(model, "manager", args.new_tokens, cb, engine_warmup=not args.smoke)
                try:
                    runner.waves([prompts[:c]])
                    run = runner.waves(split_waves(prompts[c:], c))
                finally:
                    runner.close()
                res["runs"].append({"concurrency": c, "config": name, "cb": cb,
                                    "tok_s": run["tokens"] / run["seconds"]})
                print(f"  {c:4d}  {name}: {run['tokens'] / run['seconds']:,.0f} tok/s", flush=True)
            except Exception as e:  # noqa: BLE001 - reported; the other configs still run
                errors[f"{c} {name}"] = f"{type(e).__name__}: {e}"[-1500:]
                print(f"  {c:4d}  {name}: FAILED {errors[f'{c} {name}'][-300:]}", flush=True)
    print(fmt_table(["concurrency", "config", "tok/s", "cb"],
                    [[r["concurrency"], r["config"], f"{r['tok_s']:,.0f}", r["cb"]] for r in res["runs"]]))
    res["errors"] = errors
    finish(res, errors, args.out, "cb_padding.json")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
