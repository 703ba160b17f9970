#!/usr/bin/env python
"""Break a GPU pool's cold start down per worker: process boot (interpreter + imports before the
handler loads), handler load (weights to GPU + engine start), and serve launch -> all READY.

Runs the same model as bench_gpu_scaling.py with N workers for each N in --gpus, and prints, per N, the
slowest worker's boot_s and load_s (reported by each worker in READY, see worker/runtime.py) and the wall
time until every worker is ready.

  PYTHONPATH=$PWD python3 scripts/diag_cold_start.py --gpus 1,4
"""
import os

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
               "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_common import Serve, build_llama, write_pools_toml  # noqa: E402
from bench_gpu_scaling import ARCH, engine_config  # noqa: E402

CB = engine_config(16, 64, 128, smoke=False)  # the scaling benchmark's engine config


def one(n: int, model: str, work: str) -> dict:
    from orchestrator import Client

    cfg = write_pools_toml(os.path.join(work, f"cold{n}.toml"), {"gen": {
        "handler": "generate", "devices": ",".join(str(i) for i in range(n)),
        "config": {"model": model, "dtype": "bfloat16", "cb": CB}}})
    t0 = time.perf_counter()
    with Serve(["--config", cfg]).start(timeout=300) as serve:
        wall = time.perf_counter() - t0
        with Client(serve.address) as c:
            workers = c.status()["pools"]["gen"]["workers"]
    infos = [w["info"] for w in workers]
    slowest = max(infos, key=lambda i: (i.get("boot_s") or 0) + (i.get("load_s") or 0))
    return {"n": n, "ready_wall_s": round(wall, 2),
            "boot_s": [i.get("boot_s") for i in infos], "load_s": [i.get("load_s") for i in infos],
            "slowest_phases": slowest.get("load_phases")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,4")
    ap.add_argument("--out", help="JSON results")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as work:
        model = os.path.join(work, "m")
        build_llama(model, ARCH, seed=0, dtype="bfloat16", device="cuda:0")
        for n in [int(x) for x in args.gpus.split(",")]:
            r = one(n, model, work)
            results.append(r)
            print(f"N={r['n']}: ready {r['ready_wall_s']} s; boot_s {r['boot_s']}; "
                  f"load_s {r['load_s']}; slowest worker's load phases {r['slowest_phases']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
