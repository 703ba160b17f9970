#!/usr/bin/env python
"""Embeddings through the orchestrator against the engine's best in-process figure.
Device tool: nvidia-h200 (one GPU); `--smoke` runs the plumbing tiny on CPU.

Encoders: a MiniLM-sized BERT (6 layers x 384) and a BERT-base-sized one (12 x 768), random weights, built
here with save_pretrained, with a WordPiece tokenizer over a made-up vocabulary (the GPU machine has no hub).
Texts: `--texts` random sentences of 8-48 words, each word one token. Both sides run float32, mean pooling,
L2 normalisation, max length 256 (no text reaches it).

  baseline      in a process of its own: one `SentenceTransformer.encode` over the whole text set, at each
                `--batch-sizes`; the best of them (median of `--repeats` per size) is the reference.
  orchestrator  `orchestrator serve` with one embed worker per encoder on the same GPU (the handler's own
                defaults: token budget, jobs per batch, capacity); the whole set split into jobs of
                `--job-sizes` texts, all submitted at once and awaited; median of `--repeats` rounds after
                an untimed warm-up round.

Also checked: the worker's vectors equal the baseline's (max |difference| printed). Goals: >= 0.9 of the
best for jobs of 32 texts or more; >= 0.5 for single-text jobs.

  python3 -m scripts.bench_embed --out docs/bench_results/embed.json
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts._bench_common import ROOT, Serve, Steps, finish, fmt_table, require_gpus, write_pools_toml

VOCAB_WORDS = 30000
MAX_LEN = 256
ENCODERS = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def build_encoder(path: str, arch: dict, seed: int) -> dict:
    """A random BertModel and its WordPiece tokenizer, saved with save_pretrained."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab_file = os.path.join(path, "vocab.txt")
    Path(vocab_file).write_text("\n".join(specials + [f"w{i}" for i in range(VOCAB_WORDS)]) + "\n")
    tok = BertTokenizerFast(vocab_file=vocab_file, do_lower_case=True, model_max_length=MAX_LEN)
    tok.save_pretrained(path)
    config = BertConfig(vocab_size=len(specials) + VOCAB_WORDS, max_position_embeddings=512, **arch)
    torch.manual_seed(seed)
    model = BertModel(config, add_pooling_layer=False)
    model.save_pretrained(path)
    return {"path": path, "params": sum(p.numel() for p in model.parameters()), **arch}


def make_texts(n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(VOCAB_WORDS)}" for _ in range(rng.randint(8, 48))) for _ in range(n)]


# ------------------------------------------------------------------------------------------ baseline role

def baseline_role(spec: dict) -> dict:
    """SentenceTransformer.encode over the whole set at each batch size; also the vectors of a sample."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    t = models.Transformer(spec["path"], max_seq_length=MAX_LEN)
    st = SentenceTransformer(modules=[t, models.Pooling(t.get_word_embedding_dimension(), "mean"),
                                      models.Normalize()], device=spec["device"])
    texts = spec["texts"]
    st.encode(texts[:256], batch_size=64, convert_to_numpy=True)  # warm-up: kernels, allocator
    per_bs = {}
    for bs in spec["batch_sizes"]:
        times = []
        for _ in range(spec["repeats"]):
            if spec["device"].startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            st.encode(texts, batch_size=bs, convert_to_numpy=True)
            times.append(time.perf_counter() - t0)
        per_bs[str(bs)] = len(texts) / statistics.median(times)
    best = max(per_bs, key=per_bs.get)
    sample = st.encode(texts[:spec["sample"]], batch_size=64, convert_to_numpy=True)
    return {"per_batch_size": per_bs, "best_batch_size": int(best), "best": per_bs[best],
            "sample": sample.tolist()}


def run_baseline(spec: dict, env: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        Path(spec_path).write_text(json.dumps({**spec, "out": out_path}))
        proc = subprocess.run([sys.executable, "-m", "scripts.bench_embed", "--role-baseline", spec_path], env={**os.environ, **env},
                              cwd=str(ROOT), timeout=timeout, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"baseline exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-2500:]}")
        return json.loads(Path(out_path).read_text())


# ------------------------------------------------------------------------------------------ orchestrator

def orch_round(client, pool: str, texts: list, size: int, timeout: float) -> tuple[float, list]:
    """All jobs of `size` texts submitted at once, all awaited: seconds, and the first job's vectors."""
    t0 = time.perf_counter()
    handles = [client.submit(pool, {"texts": texts[i:i + size]}) for i in range(0, len(texts), size)]
    outs = [h.result(timeout) for h in handles]
    seconds = time.perf_counter() - t0
    return seconds, outs


def orchestrator(args, models: dict, texts: list, work: str) -> dict:
    import numpy as np

    from orchestrator import Client

    pools = {f"emb_{name}": {"handler": "embed", "devices": "cpu:1" if args.smoke else "0", "max_restarts": 0,
                             "config": {"model": m["path"]}} for name, m in models.items()}
    cfg = write_pools_toml(os.path.join(work, "embed.toml"), pools)
    res: dict = {}
    with Serve(["--config", cfg]).start(timeout=args.timeout) as serve, Client(serve.address) as c:
        workers = {p: c.status()["pools"][p]["workers"][0]["info"] for p in pools}
        for name in models:
            pool = f"emb_{name}"
            orch_round(c, pool, texts, 32, args.timeout)  # warm-up round
            per_size = {}
            for size in args.job_sizes:
                secs = []
                for _ in range(args.repeats):
                    s, outs = orch_round(c, pool, texts, size, args.timeout)
                    secs.append(s)
                first = np.concatenate([o["embeddings"].to_numpy() for o in outs])[:args.sample]
                per_size[str(size)] = {"sentences_s": len(texts) / statistics.median(secs),
                                       "runs": [len(texts) / s for s in secs], "jobs": -(-len(texts) // size)}
            res[name] = {"per_job_size": per_size, "info": workers[pool], "sample": first.tolist()}
    return res


def summarize(res: dict, job_sizes: list) -> tuple[str, dict]:
    import numpy as np

    rows, goals = [], {}
    for name in res["models"]:
        base, orch = res["baseline"].get(name), res["orchestrator"].get(name)
        if not base:
            continue
        rows.append([name, "in-process encode (best)", f"bs {base['best_batch_size']}", f"{base['best']:,.0f}", "1.000",
                     "  ".join(f"{k}:{v:,.0f}" for k, v in base["per_batch_size"].items())])
        if not orch:
            continue
        diff = float(np.abs(np.array(orch["sample"]) - np.array(base["sample"])).max())
        res["max_abs_diff"][name] = diff
        for size in job_sizes:
            r = orch["per_job_size"][str(size)]
            ratio = r["sentences_s"] / base["best"]
            rows.append([name, f"orchestrator, jobs of {size}", f"{r['jobs']} jobs", f"{r['sentences_s']:,.0f}",
                         f"{ratio:.3f}", ", ".join(f"{v:,.0f}" for v in r["runs"])])
            target = 0.5 if size == 1 else 0.9 if size >= 32 else None
            if target is not None:
                goals[f"{name}_jobs_of_{size}"] = {"value": ratio, "target": f">= {target}", "passed": ratio >= target}
    table = fmt_table(["encoder", "mode", "shape", "sentences/s", "share of best", "detail"], rows)
    lines = [table, ""] + [f"goal {k}: {g['value']:.3f} (target {g['target']}) {'PASS' if g['passed'] else 'MISS'}"
                           for k, g in goals.items()]
    lines += [f"max |orchestrator - in-process| over the first vectors, {k}: {v:.2e}"
              for k, v in res["max_abs_diff"].items()]
    return "\n".join(lines), goals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=2048)
    p.add_argument("--models", default="minilm,base")
    p.add_argument("--job-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 32, 512])
    p.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")],
                   default=[32, 64, 128, 256, 512, 1024])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sample", type=int, default=64, help="vectors compared between the two sides")
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.smoke:
        args.texts, args.batch_sizes, args.repeats, args.job_sizes = 64, [16, 64], 1, [1, 8, 32]
    else:
        require_gpus(1, "bench_embed")
    started = time.time()
    work = tempfile.mkdtemp(prefix="bench-embed-")
    texts = make_texts(args.texts, seed=5)
    names = args.models.split(",")
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv), "args": vars(args),
                 "models": {}, "baseline": {}, "orchestrator": {}, "max_abs_diff": {}}
    steps = Steps()
    for i, name in enumerate(names):
        arch = TINY if args.smoke else ENCODERS[name]
        res["models"][name] = steps.run(f"build {name}", build_encoder, os.path.join(work, name), arch, i)
    models = {n: m for n, m in res["models"].items() if m}
    env = {"CUDA_VISIBLE_DEVICES": "" if args.smoke else "0"}
    for name, m in models.items():
        spec = {"path": m["path"], "device": "cpu" if args.smoke else "cuda:0", "texts": texts,
                "batch_sizes": args.batch_sizes, "repeats": args.repeats, "sample": args.sample}
        out = steps.run(f"baseline {name}", run_baseline, spec, env, args.timeout)
        if out:
            res["baseline"][name] = out
    orch = steps.run("orchestrator", orchestrator, args, models, texts, work)
    res["orchestrator"] = orch or {}
    table, goals = summarize(res, args.job_sizes)
    for part in ("baseline", "orchestrator"):  # vectors were for the comparison only
        for v in res[part].values():
            v.pop("sample", None)
    res.update(goals=goals, errors=steps.errors, seconds=round(time.time() - started, 1))
    print(f"\nbench_embed  {res['date']}  {'SMOKE (CPU)' if args.smoke else 'GPU'}  {len(texts)} texts of 8-48 words  "
          f"{res['seconds']:.0f} s")
    print(table)
    finish(res, steps.errors, args.out, "bench_embed.json")
    return 0 if not steps.errors else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--role-baseline":
        _spec = json.loads(Path(sys.argv[2]).read_text())
        Path(_spec["out"]).write_text(json.dumps(baseline_role(_spec)))
        sys.exit(0)
    sys.exit(main())
