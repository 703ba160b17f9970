"""`orchestrator demo`: the end-to-end main job, on every visible GPU or else 2 CPU workers.

It starts a real coordinator (`orchestrator serve` in a subprocess) with two pools, shows the workers
loading, then runs a real workload through the client: MiniLM embeddings for a few hundred sentences,
and streamed generation from a tiny Llama built locally (random weights, saved with save_pretrained and
loaded through the same path real models use). It prints results and throughput, then stops cleanly.
This module never imports torch: the model is built by `python -m worker.models` in a subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from orchestrator.client.sync import Client
from orchestrator.fleet.placement import parse_devices

SUBJECTS = ["The GPU", "A worker process", "The coordinator", "My cat", "The tokenizer", "A small model",
            "The scheduler", "An old laptop", "The data centre", "A tensor"]
VERBS = ["loads", "streams", "embeds", "waits for", "restarts", "measures", "batches", "ignores"]
OBJECTS = ["the weights", "a long prompt", "every request", "its neighbour", "the results", "a heartbeat",
           "fresh coffee", "the queue"]
PROMPTS = ["The quick brown fox", "Once upon a time", "GPUs are fast because", "The orchestrator says",
           "In a distant galaxy", "The best way to batch", "Hello world", "A process per GPU"]


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def sentences(n: int) -> list[str]:
    """n distinct, deterministic sentences (no data download needed)."""
    out = []
    for i in range(n):
        s, v, o = SUBJECTS[i % 10], VERBS[(i // 10) % 8], OBJECTS[(i // 80) % 8]
        out.append(f"{s} {v} {o} (#{i}).")
    return out


def write_config(path: str, devices: str, llama_dir: str) -> tuple[str, str]:
    """Two pools. On CPU, one worker each (2 CPU workers in all); on GPUs, each pool on every GPU."""
    ds = parse_devices(devices)
    if ds.kind == "cpu":
        embed_dev = gen_dev = "cpu:1" if len(ds) <= 2 else f"cpu:{len(ds) // 2}"
    else:
        embed_dev = gen_dev = ",".join(ds.ids)
    with open(path, "w") as f:
        f.write(f"""[pools.embed]
handler = "embed"
devices = "{embed_dev}"

[pools.generate]
handler = "generate"
devices = "{gen_dev}"
config = {{ model = "{llama_dir}", max_new_tokens_cap = 256 }}
""")
    return embed_dev, gen_dev


def start_server(config: str, workdir: str) -> tuple[subprocess.Popen, str, str]:
    log_path = os.path.join(workdir, "serve.log")
    log = open(log_path, "wb")
    # Both of the demo's models are on this machine (the bundled MiniLM, a tiny Llama built here): the hub
    # is never needed, and on a machine without network nothing should try it.
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "serve", "--config", config,
                             "--address", "tcp://127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited {proc.returncode}:\n{open(log_path).read()}")
        for line in open(log_path, errors="replace"):
            if line.startswith("endpoint: "):
                return proc, line.split()[1], log_path
        time.sleep(0.1)
    raise RuntimeError("serve did not print its endpoint within 60 s")


def watch_loading(client: Client, timeout: float = 600) -> None:
    """Print each worker's state as it changes, until every pool is ready."""
    seen: dict = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.status()
        for pool in st["pools"].values():
            for w in pool["workers"]:
                if seen.get(w["name"]) != w["state"]:
                    seen[w["name"]] = w["state"]
                    say(f"  worker {w['name']:<12} {w['state']:<9} devices={','.join(w['devices'])} "
                        f"pids={w['pids']}")
        if all(p["health"] == "ready" for p in st["pools"].values()):
            return
        time.sleep(0.2)
    raise TimeoutError("workers did not become ready")


def run_embeddings(client: Client, n: int) -> None:
    import numpy as np

    texts = sentences(n)
    batches = [texts[i:i + 16] for i in range(0, n, 16)]
    t0 = time.perf_counter()
    jobs = [client.submit("embed", {"texts": b}) for b in batches]
    vectors = np.concatenate([j.result(timeout=300)["embeddings"].to_numpy() for j in jobs])
    dt = time.perf_counter() - t0
    say(f"embedded {len(texts)} sentences in {len(jobs)} jobs: {dt:.2f} s, {len(texts) / dt:.0f} "
        f"sentences/s, vectors {vectors.shape} {vectors.dtype}, norms ~{np.linalg.norm(vectors[0]):.3f}")
    query = client.run("embed", {"texts": ["A GPU loads the weights"]})["embeddings"].to_numpy()[0]
    best = np.argsort(-(vectors @ query))[:3]
    for i in best:
        say(f"  nearest to 'A GPU loads the weights': {texts[i]!r} (cosine {vectors[i] @ query:.3f})")


def run_generation(client: Client, n: int) -> None:
    prompts = (PROMPTS * (n // len(PROMPTS) + 1))[:n]
    t0 = time.perf_counter()
    jobs = [client.submit("generate", {"prompt": p, "max_new_tokens": 32}, stream=True) for p in prompts]
    say(f"streaming job 0 (prompt {prompts[0]!r}; random weights, so the words are noise):")
    print("        ", end="", flush=True)
    for chunk in jobs[0]:
        print(chunk["text"], end="", flush=True)
    print(flush=True)
    outputs = [j.result(timeout=300) for j in jobs]
    dt = time.perf_counter() - t0
    tokens = sum(o["usage"]["completion_tokens"] for o in outputs)
    say(f"generated {tokens} tokens for {len(jobs)} concurrent streamed jobs in {dt:.2f} s: "
        f"{tokens / dt:.0f} tok/s (finish reasons: {sorted({o['finish_reason'] for o in outputs})})")


def run_demo(args) -> int:
    t_start = time.perf_counter()
    devices = args.devices
    ds = parse_devices(devices)
    say(f"devices: {ds.kind} {','.join(ds.ids)}")
    with tempfile.TemporaryDirectory(prefix="orchestrator-demo-") as work:
        llama = os.path.join(work, "tiny-llama")
        say("building a tiny random-weight Llama with save_pretrained ...")
        subprocess.run([sys.executable, "-m", "worker.models", "tiny-llama", llama], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        config = os.path.join(work, "pools.toml")
        embed_dev, gen_dev = write_config(config, devices, llama)
        say(f"starting coordinator: pool embed (MiniLM) on {embed_dev}, pool generate (tiny Llama) on "
            f"{gen_dev}")
        proc, address, log_path = start_server(config, work)
        try:
            with Client(address, timeout=30) as client:
                say(f"coordinator at {address}; waiting for workers to load")
                watch_loading(client)
                run_embeddings(client, args.sentences)
                run_generation(client, args.prompts)
                st = client.status()
                done = {k: (p["completed"], p["failed"]) for k, p in st["pools"].items()}
                say(f"jobs (completed, failed) per pool: {done}")
                client.stop(reason="demo finished")
            code = proc.wait(60)
        except BaseException:
            proc.terminate()
            proc.wait(30)
            print(open(log_path, errors="replace").read()[-3000:], file=sys.stderr)
            raise
    say(f"coordinator exited with code {code}; total {time.perf_counter() - t_start:.1f} s")
    return 0 if code == 0 else 1
