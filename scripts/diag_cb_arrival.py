#!/usr/bin/env python
"""Diagnose the 1-worker throughput gap of gpu_check_models.py at high concurrency (issue 3 / 8).

In-process only, one GPU, the same model shape (16 layers x 1024, bf16) and the same explicit continuous
batching config as gpu_check_models' throughput check. Only the way a wave of requests reaches the CB
manager changes:
  burst       all `c` requests added back to back (what the in-process baseline does);
  gap G ms    one request every G ms (what a worker sees when jobs arrive one by one over sockets);
so a slowdown that shows here without any orchestrator involved is the engine's, caused by arrival
pattern, not by our processes or sockets.

  PYTHONPATH=$PWD python scripts/diag_cb_arrival.py --concurrency 32 --gaps 0.2,1,5
"""
import os

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
               "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_common import build_llama, gen_configs, load_model, make_prompts  # noqa: E402
from gpu_check_models import ARCH_M, CB  # noqa: E402


def run_wave(mgr, prompts: list, new_tokens: int, gap_s: float, tag: str) -> tuple[float, int, list]:
    t0 = time.perf_counter()
    rids = []
    for i, p in enumerate(prompts):
        rids.append(mgr.add_request(input_ids=p, request_id=f"{tag}-{i}", max_new_tokens=new_tokens))
        if gap_s:
            time.sleep(gap_s)  # the arrival pattern under test, not a synchronisation
    done: dict = {}
    while len(done) < len(rids):
        out = mgr.get_result(timeout=5)
        if out is not None and out.is_finished():
            done[out.request_id] = len(out.generated_tokens)
    return time.perf_counter() - t0, sum(done.values()), [done[r] for r in rids]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--gaps", default="0.2,1,5", help="ms between request arrivals, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--waves", type=int, default=3)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("diag_cb_arrival: needs a GPU")
        return 0
    with tempfile.TemporaryDirectory() as work:
        build_llama(os.path.join(work, "m"), ARCH_M, seed=0, dtype="bfloat16", device="cuda:0")
        model = load_model(os.path.join(work, "m"), "bfloat16", "cuda:0")
        gen, cbc = gen_configs(args.new_tokens, CB)
        mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cbc)
        mgr.start()
        c = args.concurrency
        prompts = make_prompts(c * (args.waves + 1), 64, ARCH_M["vocab_size"], seed=7)
        run_wave(mgr, prompts[:c], args.new_tokens, 0, "warm")
        modes = [("burst", 0.0)] + [(f"gap {g} ms", float(g) / 1000) for g in args.gaps.split(",")]
        print(f"{'mode':<14} {'tok/s':>8} {'s/wave':>8}")
        for name, gap in modes:
            total_s, total_tok = 0.0, 0
            for w in range(args.waves):
                wave = prompts[c * (w + 1):c * (w + 2)]
                s, tok, _ = run_wave(mgr, wave, args.new_tokens, gap, f"{name}-{w}")
                total_s, total_tok = total_s + s, total_tok + tok
            print(f"{name:<14} {total_tok / total_s:>8.0f} {total_s / args.waves:>8.2f}", flush=True)
        mgr.stop(block=True, timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
