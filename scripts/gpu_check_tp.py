#!/usr/bin/env python
"""GPU check of tensor-parallel groups (issue 5): real `orchestrator serve` processes, a random-weight Llama of
about 1B parameters built here (float32), TP=2 `generate` groups over NCCL.

  parity    a TP=2 generate pool gives the same greedy tokens as TP=1 on the same prompts
            (x2: a TP=1 serve on GPU 0 first, then the TP=2 serve on GPUs 0-1);
  mixed     --mixed (4 GPUs): a TP=2 pool on GPUs 0-1 and a TP=1 pool with two replicas on GPUs 2-3 in one
            serve, all serving at once; the TP=1 pool gives the parity reference;
  guard     the collective guard's cost per step against the step period, over a decode-heavy load
            (goal: < 1% of step time), plus tokens/s;
  mismatch  an injected asymmetric batch (rank 1 shows the guard a different fingerprint for a forward of
            SKEW tokens; tests.tp_handlers:SkewedGenerateHandler) -> `collective_mismatch` naming
            rank 1, within the budget, then a group restart and serving again;
  kill      SIGKILL of rank 1 mid-generation -> group restart, the job retried to the same greedy output.

Prints one table; exits 1 if any check fails (2 on bad usage; 0 with SKIP when there are too few GPUs).
`--json OUT` also writes the results.

The GPU image lacks pyzmq and accelerate (transformers loads a model with a TP plan only with accelerate):
  ../shared/scripts/device-wheels.sh accelerate==1.15.0
then carry .whl and start the device command with the line that script prints, e.g.
  <that line> python scripts/gpu_check_tp.py            (nvidia-h200-x2)
  <that line> python scripts/gpu_check_tp.py --mixed    (nvidia-h200-x4)
"""
import os

# NVLink multicast can take shared GPUs out of service: off here, and so in every process serve starts.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SKEW = 29  # prompt length whose forward rank 1 skews (no other prompt here has it)
NEW_TOKENS = 32
BUDGET_S = 10.0  # a mismatch must be reported within this (the guard timeout is 5 s)
START_S = 600.0


class Check:
    def __init__(self, name: str):
        self.name, self.status, self.numbers, self.notes = name, "FAIL", {}, []

    def ok(self, cond: bool, note: str) -> bool:
        if not cond:
            self.notes.append(note)
        return cond

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "numbers": self.numbers, "notes": self.notes}


# ----------------------------------------------------------------------------------- the model


def build_model(path: Path, layers: int, hidden: int, vocab: int) -> str:
    """A random-weight Llama (float32) plus a word-level tokenizer of the same vocabulary, saved to `path`."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<unk>")),
                                  unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>")
    heads = hidden // 64
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=min(8, heads),
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda:0" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)  # initialised on the GPU: seconds instead of a minute on the CPU
    model.save_pretrained(path)
    tok.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    return f"{params / 1e9:.2f}B"


def prompts(n: int, vocab: int, seed: int = 1) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = 5 + (i * 7) % 40
        length += length == SKEW  # never the skewed size
        out.append([1] + [rng.randrange(3, vocab) for _ in range(length - 1)])
    return out


# ----------------------------------------------------------------------------------- serve


class Serve:
    """One `orchestrator serve` subprocess on a TOML config; its log goes to a file."""

    def __init__(self, workdir: Path, name: str, toml: str):
        self.config = workdir / f"{name}.toml"
        self.config.write_text(textwrap.dedent(toml))
        self.log_path = workdir / f"{name}.log"
        self.proc = None
        self.client = None

    def __enter__(self):
        from orchestrator import Client, wait_ready

        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "serve", "--address",
                                      "tcp://127.0.0.1:0", "--config", str(self.config)],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 60
        while True:
            m = re.search(r"^endpoint: (\S+)", self.log(), re.M)
            if m:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        wait_ready(m.group(1), timeout=START_S)
        self.client = Client(m.group(1), timeout=60)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def group(self, pool: str, index: int = 0) -> dict:
        return self.client.status()["pools"][pool]["workers"][index]

    def wait_restart(self, pool: str, before: dict, timeout: float = START_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            g = self.group(pool)
            if g["state"] in ("ready", "busy") and g["restarts"] > before["restarts"] \
                    and len(g["pids"]) == len(before["pids"]) and not set(g["pids"]) & set(before["pids"]):
                return g
            time.sleep(0.1)
        raise TimeoutError(f"{pool}: no restart with new pids within {timeout:g} s")

    def __exit__(self, *exc):
        if self.client is not None:
            self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def pool_toml(name: str, handler: str, devices: str, tp: int, config: dict) -> str:
    body = ", ".join(f"{k} = {json.dumps(v) if not isinstance(v, dict) else _inline(v)}" for k, v in config.items())
    return f"""
        [pools.{name}]
        handler = "{handler}"
        devices = "{devices}"
        tp = {tp}
        retries = 2
        max_restarts = 20
        guard_timeout = 5.0
        config = {{ {body} }}
    """


def _inline(d: dict) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + " }"


def generate(serve: Serve, pool: str, batch: list, new_tokens: int = NEW_TOKENS, retries=None) -> list:
    handles = [serve.client.submit(pool, {"input_ids": p, "max_new_tokens": new_tokens, "eos_token_id": []},
                                   retries=retries) for p in batch]
    return [h.result(START_S)["token_ids"] for h in handles]


# ----------------------------------------------------------------------------------- checks


def check_parity(serve: Serve, pool: str, batch: list, reference: list) -> Check:
    c = Check("parity")
    out = generate(serve, pool, batch)
    diverged = [(i, next((k for k, (a, b) in enumerate(zip(o, r)) if a != b), None))
                for i, (o, r) in enumerate(zip(out, reference)) if o != r]
    c.numbers = {"prompts": len(batch), "tokens_each": NEW_TOKENS, "differing_prompts": len(diverged),
                 "first_divergence (prompt, token)": diverged[:4]}
    c.status = "PASS" if c.ok(not diverged, "TP=2 greedy tokens differ from TP=1") else "FAIL"
    return c


def check_mixed(serve: Serve, batch: list) -> Check:
    c = Check("mixed")
    start = time.monotonic()
    handles = [(pool, serve.client.submit(pool, {"input_ids": p, "max_new_tokens": 64, "eos_token_id": []}))
               for p in batch * 4 for pool in ("tp2", "tp1")]
    done = {"tp2": 0, "tp1": 0}
    for pool, h in handles:
        if len(h.result(START_S)["token_ids"]) == 64:
            done[pool] += 1
    workers = {p: [w["name"] for w in serve.client.status()["pools"][p]["workers"] if w["completed"]]
               for p in ("tp2", "tp1")}
    c.numbers = {"jobs": len(handles), "completed": done, "workers_used": workers,
                 "wall_s": round(time.monotonic() - start, 2)}
    ok = c.ok(sum(done.values()) == len(handles), "some jobs failed") and \
        c.ok(len(workers["tp1"]) == 2, "both TP=1 replicas should have served")
    c.status = "PASS" if ok else "FAIL"
    return c


def guard_totals(serve: Serve, pool: str) -> list:
    """Every rank's guard totals, once a fresh heartbeat carried them (stats ride every 4th beat)."""
    deadline, last = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        now = [r["guard"] for r in serve.group(pool)["ranks"]]
        if last is not None and now == last and all(now):
            return now
        last = now
        time.sleep(2.5)
    return last


def check_guard(serve: Serve, pool: str, batch: list) -> Check:
    c = Check("guard")
    before = guard_totals(serve, pool)
    start = time.monotonic()
    out = generate(serve, pool, batch * 4, new_tokens=128)
    wall = time.monotonic() - start
    after = guard_totals(serve, pool)
    rows = []
    for b, a in zip(before, after):
        steps = a["steps"] - b["steps"]
        periods = a["periods"] - b["periods"]
        mean = (a["total_us"] - b["total_us"]) / max(steps, 1)
        period = (a["period_total_us"] - b["period_total_us"]) / max(periods, 1)
        rows.append({"steps": steps, "guard_us": round(mean, 1), "step_us": round(period, 1),
                     "fraction": round(mean / period, 5) if period else None, "max_us": a["max_us"]})
    c.numbers = {"ranks": rows, "tokens_per_s": round(sum(map(len, out)) / wall, 1), "requests": len(out)}
    worst = max((r["fraction"] or 1.0) for r in rows)
    if not c.ok(all(r["steps"] > 0 for r in rows) and rows[0]["steps"] == rows[1]["steps"],
                "both ranks must guard the same steps"):
        c.status = "FAIL"
    else:
        c.status = "PASS" if worst < 0.01 else "WARN"
        if worst >= 0.01:
            c.notes.append(f"guard cost {worst:.2%} of step time: above the 1% goal")
    return c


def check_mismatch(serve: Serve, pool: str, prompt: list, reference: list) -> Check:
    from orchestrator.client.sync import RequestError

    c = Check("mismatch")
    before = serve.group(pool)
    start = time.monotonic()
    try:
        generate(serve, pool, [[1] + prompt[1:2] * (SKEW - 1)], retries=0)
        c.notes.append("the skewed request succeeded: no mismatch was detected")
        return c
    except RequestError as e:
        detect = time.monotonic() - start
        code, message = e.code, e.message
    after = serve.wait_restart(pool, before)
    restart = time.monotonic() - start
    again = generate(serve, pool, [prompt])[0]
    c.numbers = {"code": code, "detected_s": round(detect, 3), "restarted_s": round(restart, 2),
                 "message": message[-200:]}
    ok = c.ok(code == "collective_mismatch", f"code {code}") and \
        c.ok("rank(s) [1] differ" in message, "the error must name rank 1") and \
        c.ok(detect < BUDGET_S, f"detected after {detect:.1f} s (budget {BUDGET_S:g} s)") and \
        c.ok(not set(after["pids"]) & set(before["pids"]), "both ranks must be new processes") and \
        c.ok(again == reference, "after the restart the group must serve the same greedy output")
    c.status = "PASS" if ok else "FAIL"
    return c


def check_kill(serve: Serve, pool: str, prompt: list, reference: list) -> Check:
    c = Check("kill")
    before = serve.group(pool)
    handle = serve.client.submit(pool, {"input_ids": prompt, "max_new_tokens": 1024, "eos_token_id": []})
    deadline = time.monotonic() + 120
    while serve.group(pool)["step_age"] is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # well inside the generation (1024 tokens), not at its first step
    victim = before["ranks"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    out = handle.result(START_S)
    after = serve.wait_restart(pool, before)
    c.numbers = {"killed_pid": victim, "job_done_after_kill_s": round(time.monotonic() - killed, 2),
                 "tokens": len(out["token_ids"]), "restarts": after["restarts"]}
    ok = c.ok(len(out["token_ids"]) == 1024, "the retried job must finish") and \
        c.ok(out["token_ids"][:NEW_TOKENS] == reference, "the retried job must give the same greedy tokens") and \
        c.ok(not set(after["pids"]) & set(before["pids"]), "both ranks must be new processes")
    c.status = "PASS" if ok else "FAIL"
    return c


# ----------------------------------------------------------------------------------- main


def table(checks: list) -> str:
    lines = [f"{'check':<10} {'status':<6} numbers / notes", "-" * 100]
    for c in checks:
        lines.append(f"{c.name:<10} {c.status:<6} {json.dumps(c.numbers)}")
        lines += [f"{'':<17} note: {n}" for n in c.notes]
    return "\n".join(lines)


def run(args) -> list:
    vocab = 32000
    work = Path(tempfile.mkdtemp(prefix="gpu-check-tp-"))
    model = work / "llama"
    size = build_model(model, args.layers, args.hidden, vocab)
    print(f"model: random Llama {size} parameters, float32, at {model}", flush=True)
    batch = prompts(8, vocab)
    gen_cfg = {"model": str(model), "dtype": "float32", "cb": {"num_blocks": 64 if args.cpu else 512}}
    dev = {"tp2": "cpu:2", "tp1": "cpu:1", "tp1x2": "cpu:2"} if args.cpu else \
        {"tp2": "0,1", "tp1": "0", "tp1x2": "2,3"}
    checks = []
    tp2 = pool_toml("tp2", "tests.tp_handlers:SkewedGenerateHandler", dev["tp2"], 2,
                    {**gen_cfg, "skew_tokens": SKEW})
    if args.mixed:
        toml = tp2 + pool_toml("tp1", "generate", dev["tp1x2"], 1, gen_cfg)
        with Serve(work, "mixed", toml) as s:
            reference = generate(s, "tp1", batch)
            checks.append(check_parity(s, "tp2", batch, reference))
            checks.append(check_mixed(s, batch))
            run_failures(s, batch, reference, checks)
        return checks
    with Serve(work, "tp1", pool_toml("tp1", "generate", dev["tp1"], 1, gen_cfg)) as s:
        reference = generate(s, "tp1", batch)
    with Serve(work, "tp2", tp2) as s:
        checks.append(check_parity(s, "tp2", batch, reference))
        run_failures(s, batch, reference, checks)
    return checks


def run_failures(s: Serve, batch: list, reference: list, checks: list) -> None:
    for name, fn in (("guard", lambda: check_guard(s, "tp2", batch)),
                     ("mismatch", lambda: check_mismatch(s, "tp2", batch[0], reference[0])),
                     ("kill", lambda: check_kill(s, "tp2", batch[1], reference[1]))):
        try:
            checks.append(fn())
        except Exception as e:  # one broken check must not hide the others' results
            c = Check(name)
            c.notes.append(f"{type(e).__name__}: {e}")
            traceback.print_exc()
            checks.append(c)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixed", action="store_true", help="4 GPUs: TP=2 on 0-1 and TP=1 x2 on 2-3 at once")
    parser.add_argument("--layers", type=int, default=16, help="model layers (default 16: ~0.85B with 2048)")
    parser.add_argument("--hidden", type=int, default=2048, help="model hidden size (a multiple of 64)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--cpu", action="store_true",
                        help="dry run of this script on CPU workers (gloo; use with a small --layers/--hidden)")
    args = parser.parse_args(argv)
    needed = 4 if args.mixed else 2
    try:
        import torch
    except ImportError:
        print("SKIP: torch is not installed")
        return 0
    if torch.cuda.device_count() < needed and not args.cpu:
        print(f"SKIP: needs {needed} GPUs, found {torch.cuda.device_count()}")
        return 0
    missing = [m for m in ("zmq", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"FAIL: missing {missing}: run ../shared/scripts/device-wheels.sh accelerate==1.15.0 and carry .whl")
        return 1
    checks = run(args)
    print(table(checks))
    if args.json:
        Path(args.json).write_text(json.dumps([c.as_dict() for c in checks], indent=2))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
