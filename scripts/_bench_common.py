"""Helpers shared by the benchmarks in scripts/ (not part of the package).

- `Serve`: one `orchestrator serve` subprocess on a free tcp port, its endpoint read from its output
  (the one place a bench parses the "endpoint:" line);
- `pct`, `fmt_table`: small statistics and a plain-text table;
- `write_json`: the results file, also copied under $OUT when the device tool set it;
- `require_gpus`: fail fast, with a clear message, where fewer GPUs are visible than a run needs.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.fleet.slots import GPU_SAFE_ENV

ROOT = Path(__file__).resolve().parents[1]

# Set on import, before a bench can start CUDA or NCCL in this process; every child inherits them.
for _name, _value in GPU_SAFE_ENV.items():
    os.environ.setdefault(_name, _value)


def pct(values: list, q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


def fmt_table(header: list, rows: list) -> str:
    """Left-aligned plain-text table; cells are str()-ed."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(data: dict, path: str | None, default_name: str) -> list[str]:
    """Write `data` to `path` (if given) and to $OUT/default_name (if $OUT is set). Returns the paths."""
    written = []
    targets = [path] if path else []
    if os.environ.get("OUT"):
        targets.append(os.path.join(os.environ["OUT"], default_name))
    for target in dict.fromkeys(targets):
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        with open(target, "w") as f:
            json.dump(data, f, indent=2, default=str)
        written.append(target)
    return written


def finish(data: dict, errors: dict, path: str | None, default_name: str) -> None:
    """The end of a script's run: print each step's error, then write the results (see write_json)."""
    for name, err in errors.items():
        print(f"ERROR in {name}: {err[-600:]}")
    for target in write_json(data, path, default_name):
        print(f"wrote {target}")


def interleaved(a, b, n: int, block: int = 100) -> tuple[list, list]:
    """n round trips each of a and b, alternating in blocks, so that both see the same load."""
    xs, ys = [], []
    for _ in range(max(1, n // block)):
        xs += a(block)
        ys += b(block)
    return xs, ys


def run_latency(client, pool: str, payload, n: int, timeout: float | None = None) -> list:
    """Seconds per job for `n` jobs run one at a time (`client.run`)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.run(pool, payload, timeout=timeout)
        out.append(time.perf_counter() - t0)
    return out


def run_pipelined(client, payload, n: int, window: int, pool: str = "echo") -> float:
    """Echo jobs/s: a window of submit()s, then result()s oldest first, topping the window up as they
    finish; each output is checked against `payload`."""
    handles: collections.deque = collections.deque()
    t0, sent = time.perf_counter(), 0
    while sent < n or handles:
        while sent < n and len(handles) < window:
            handles.append(client.submit(pool, payload))
            sent += 1
        out = handles.popleft().result(60)
        if out != payload:
            raise AssertionError(f"echo returned {out!r}")
    return n / (time.perf_counter() - t0)


def require_gpus(n: int, what: str) -> int:
    """Number of visible GPUs (counted without torch or a CUDA context, so that this process holds no
    GPU memory); exits (status 1) with a clear message when fewer than `n`."""
    from orchestrator.fleet.placement import visible_gpus

    have = len(visible_gpus())
    if have < n:
        sys.exit(f"{what}: needs {n} GPU(s), found {have}. Run it on the GPU machine (device tool), "
                 f"or pass --smoke for a tiny CPU run of the plumbing.")
    return have


class Steps:
    """Run each mode of a script so that one failure is reported and the others still run. With a
    `budget` (seconds since construction), a step that would start after it is skipped, not run."""

    def __init__(self, budget: float | None = None):
        self.errors: dict = {}
        self.started, self.budget = time.monotonic(), budget

    def run(self, name: str, fn, *args, **kw):
        t0 = time.monotonic()
        if self.budget is not None and t0 - self.started > self.budget:
            self.errors[name] = f"skipped: the time budget of {self.budget:.0f} s is spent"
            print(f"[{time.strftime('%H:%M:%S')}] {name} SKIPPED (budget spent)", flush=True)
            return None
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        try:
            out = fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - reported, and the run goes on
            msg = f"{type(e).__name__}: {e}"
            self.errors[name] = msg[-2000:]
            print(f"[{time.strftime('%H:%M:%S')}] {name} FAILED after {time.monotonic() - t0:.0f} s: "
                  f"{msg[-1200:]}", flush=True)
            return None
        print(f"[{time.strftime('%H:%M:%S')}] {name} done in {time.monotonic() - t0:.0f} s", flush=True)
        return out


class Serve:
    """One `orchestrator serve` subprocess. `start()` returns once its endpoint is printed and, with
    `ready`, every pool is ready; `close()` stops it with SIGTERM, then SIGKILL after `grace` s."""

    def __init__(self, args: list, env: dict | None = None, log_dir: str | None = None):
        self.args = args
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **(env or {})}
        fd, self.log_path = tempfile.mkstemp(prefix="serve-", suffix=".log", dir=log_dir)
        os.close(fd)
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.started_at = 0.0

    def start(self, ready: bool = True, timeout: float = 120.0) -> "Serve":
        """Launch and wait; on any failure the process is stopped (it may hold GPUs) before raising."""
        try:
            return self._start(ready, timeout)
        except BaseException:
            self.close(grace=10)
            raise

    def _start(self, ready: bool, timeout: float) -> "Serve":
        self._log = open(self.log_path, "wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "serve", "--address", "tcp://127.0.0.1:0", *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=str(ROOT))
        deadline = time.monotonic() + timeout
        while self.address is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve printed no endpoint within {timeout} s:\n{self.log()[-3000:]}")
            self.address = self._endpoint()
            time.sleep(0.02)
        self.ready_s = None  # seconds from launch until every pool was ready (the cold start)
        if ready:
            self.ready_s = self.wait_ready(max(1.0, deadline - time.monotonic()))
        return self

    def wait_ready(self, timeout: float) -> float:
        """Block until every pool is ready; returns seconds since the process was started."""
        from orchestrator import Client

        deadline = time.monotonic() + timeout
        health = None
        with Client(self.address, timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"serve exited {self.proc.returncode} before its pools were "
                                       f"ready:\n{self.log()[-3000:]}")
                try:
                    health = client.health()
                    states = [p["status"] for p in health["pools"].values()]
                    if states and all(s == "ready" for s in states):
                        return time.monotonic() - self.started_at
                    failed = [w for p in health["pools"].values() for w, v in p["workers"].items()
                              if v["state"] == "failed"]
                    if failed:
                        raise RuntimeError(f"worker(s) {failed} failed to start:\n{self.log()[-3000:]}")
                except TimeoutError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pools not ready within {timeout:.0f} s: {health}\n"
                                       f"--- serve log tail ---\n{self.log()[-3000:]}")
                time.sleep(0.02)

    def _endpoint(self) -> str | None:
        for line in self.log().splitlines():
            if line.startswith("endpoint: "):
                return line.split()[1]
        return None

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def pid(self) -> int:
        return self.proc.pid

    def close(self, grace: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        try:
            os.unlink(self.log_path)
        except OSError:
            pass

    def __enter__(self) -> "Serve":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------- server config


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


# A model load can hold the GIL for seconds (CUDA init, weight loading) and a loaded machine can starve a
# worker's heartbeat thread; a benchmark must not lose a worker to that, so heartbeats get more slack.
# A failed run should stop fast, not drain for the default minute.
BENCH_SERVER = {"hb_timeout": 30.0, "drain_timeout": 10.0}


def write_pools_toml(path: str, pools: dict, server: dict | None = None) -> str:
    """A server config file: [server] keys (default BENCH_SERVER) and one [pools.NAME] table per entry
    of `pools` (name -> PoolConfig keys)."""
    server = BENCH_SERVER if server is None else server
    lines = ["[server]", *(f"{k} = {_toml_value(v)}" for k, v in server.items()), ""]
    for name, body in pools.items():
        lines.append(f"[pools.{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
        lines.append("")
    Path(path).write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- models and generation
# Everything below imports torch lazily: bench_dispatch.py uses this module without it.

def make_prompts(n: int, length: int, vocab: int, seed: int) -> list:
    """n prompts of `length` random token ids in [2, vocab) (0 and 1 are <unk> and <pad>)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(n)]


def save_tokenizer(path: str, vocab: int) -> None:
    """A word-level tokenizer "w2 w3 ..." that loads offline with AutoTokenizer (the GPU image has no
    downloadable tokenizer). It has no EOS token, so generation always runs to max_new_tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>").save_pretrained(path)


def build_llama(path: str, arch: dict, seed: int, dtype: str, device: str) -> dict:
    """A random-weight LlamaForCausalLM saved with save_pretrained (+ tokenizer). No EOS id: greedy
    generation runs to max_new_tokens in every mode, so token counts are equal by construction."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**arch, bos_token_id=None, eos_token_id=None, pad_token_id=1)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    save_tokenizer(path, arch["vocab_size"])
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"path": path, "params": params, "dtype": dtype, **arch}


def load_model(path: str, dtype: str, device: str):
    """Load the way the generate handler does (same dtype and attention implementation)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.to(device).eval()


def gen_configs(new_tokens: int, cb: dict):
    """The GenerationConfig and ContinuousBatchingConfig the generate handler builds for greedy jobs."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=1)
    return gen, ContinuousBatchingConfig(**cb, per_request_processors=False)


class Runner:
    """In-process generation of waves of prompts, by one of three methods:

    manager         transformers' ContinuousBatchingManager, started once and fed request by request,
                    exactly as the generate handler drives it inside a worker (the strict baseline);
    generate_batch  one `generate_batch(..., persistent_manager=True)` call per wave (the public
                    one-call API; each call also starts and stops the engine's thread);
    generate        plain `model.generate` on a static batch (prompts of one wave share a length).
    """

    def __init__(self, model, method: str, new_tokens: int, cb: dict, engine_warmup: bool = False):
        self.model, self.method, self.new_tokens = model, method, new_tokens
        self.gen, self.cbc = gen_configs(new_tokens, cb)
        self.mgr, self.count = None, 0
        if method == "manager":
            self.mgr = model.init_continuous_batching(generation_config=self.gen,
                                                      continuous_batching_config=self.cbc)
            if engine_warmup and hasattr(self.mgr, "warmup"):
                self.mgr.warmup()  # as the generate handler does on CUDA: graphs at the largest size first
            self.mgr.start()

    def waves(self, waves: list) -> dict:
        """Each wave to completion, one after another: seconds, tokens and outputs (in prompt order)."""
        import torch

        outputs = []
        t0 = time.perf_counter()
        for wave in waves:
            outputs.extend(getattr(self, "_" + self.method)(wave))
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return {"seconds": time.perf_counter() - t0, "tokens": sum(map(len, outputs)), "outputs": outputs}

    def _manager(self, wave: list) -> list:
        rids = []
        for p in wave:
            self.count += 1
            rid = self.mgr.add_request(input_ids=p, request_id=f"r{self.count}", max_new_tokens=self.new_tokens)
            if rid is None:
                raise RuntimeError("the continuous batching manager refused a request")
            rids.append(rid)
        done: dict = {}
        while len(done) < len(rids):
            out = self.mgr.get_result(timeout=1)
            if out is None:
                if not self.mgr.is_running():
                    raise RuntimeError("the continuous batching thread stopped")
            elif out.is_finished():
                if out.error is not None:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                done[out.request_id] = list(out.generated_tokens)
        return [done[r] for r in rids]

    def _generate_batch(self, wave: list) -> list:
        res = self.model.generate_batch(inputs=wave, generation_config=self.gen,
                                        continuous_batching_config=self.cbc, persistent_manager=True,
                                        progress_bar=False)
        if len(res) != len(wave) or any(r.error is not None for r in res.values()):
            raise RuntimeError(f"generate_batch returned {len(res)}/{len(wave)} good results")
        return [list(r.generated_tokens) for r in res.values()]

    def _generate(self, wave: list) -> list:
        import torch

        ids = torch.tensor(wave, device=self.model.device)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                      pad_token_id=1)
        return [row[len(wave[0]):].tolist() for row in out]

    def close(self) -> None:
        if self.mgr is not None:
            self.mgr.stop(block=True, timeout=30)
        if self.method == "generate_batch":
            self.model.destroy_cached_continuous_batching_manager()


def orch_waves(client, pool: str, waves: list, new_tokens: int, timeout: float = 600) -> dict:
    """The same waves through the orchestrator: submit a whole wave, wait for all of it, repeat."""
    outputs, tokens = [], 0
    t0 = time.perf_counter()
    for wave in waves:
        jobs = [client.submit(pool, {"input_ids": p, "max_new_tokens": new_tokens}) for p in wave]
        outs = [j.result(timeout)["token_ids"] for j in jobs]
        tokens += sum(len(o) for o in outs)
        outputs.extend(outs)
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "outputs": outputs}


def split_waves(prompts: list, size: int) -> list:
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]


# ------------------------------------------------------------------------- subprocess roles
# A baseline runs in a process of its own (and exits), so that no GPU memory or CUDA context of
# one mode is still held while the next runs.

def run_role(role: str, spec: dict, env: dict | None = None, timeout: float = 300.0) -> dict:
    """Run `python -m scripts._bench_common ROLE SPEC` and return the JSON it wrote; raises with its log
    tail."""
    with tempfile.TemporaryDirectory(prefix=f"role-{role}-") as tmp:
        spec_path, out_path, log_path = (os.path.join(tmp, n) for n in ("spec.json", "out.json", "log"))
        Path(spec_path).write_text(json.dumps({**spec, "out": out_path}))
        with open(log_path, "wb") as log:
            proc = subprocess.run([sys.executable, "-m", "scripts._bench_common", role, spec_path], stdout=log,
                                  stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                  cwd=str(ROOT), timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out_path):
            tail = Path(log_path).read_text(errors="replace")[-2500:]
            raise RuntimeError(f"{role} exited {proc.returncode}:\n{tail}")
        return json.loads(Path(out_path).read_text())


def _role_build(spec: dict) -> dict:
    return {"models": [build_llama(m["path"], m["arch"], m["seed"], m["dtype"], spec["device"])
                       for m in spec["models"]]}


def _role_greedy(spec: dict) -> dict:
    """Plain `model.generate`, greedy, one prompt at a time: the reference for token-for-token parity."""
    model = load_model(spec["model"], spec["dtype"], spec["device"])
    return {"outputs": [Runner(model, "generate", spec["new_tokens"], {})._generate([p])[0]
                        for p in spec["prompts"]]}


def _role_inproc(spec: dict) -> dict:
    """One model on one device; per method: an untimed warm-up, then each run's waves. With spec["levels"]
    ({name: {"warmup": waves, "timed": waves}}), one engine serves every level in turn, each with its own
    untimed warm-up wave and its own engine (level["cb"]), as the per-level pools of bench_gpu_scaling's
    engine comparison."""
    t0 = time.perf_counter()
    model = load_model(spec["model"], spec["dtype"], spec["device"])
    out: dict = {"load_s": time.perf_counter() - t0}
    for method in spec.get("methods", ["manager"]):
        if "levels" in spec:  # one manager per level, each with that level's engine config
            out[method] = {}
            for name, level in spec["levels"].items():
                runner = Runner(model, method, spec["new_tokens"], level.get("cb", spec["cb"]),
                                spec.get("engine_warmup", False))
                try:
                    runner.waves(level["warmup"])
                    run = runner.waves(level["timed"])
                finally:
                    runner.close()
                out[method][name] = {k: run[k] for k in ("seconds", "tokens")}
            continue
        runner = Runner(model, method, spec["new_tokens"], spec["cb"], spec.get("engine_warmup", False))
        try:
            runner.waves(spec["warmup"])
            out[method] = {name: runner.waves(waves) for name, waves in spec["runs"].items()}
        finally:
            runner.close()
    return out


def _role_threads(spec: dict) -> dict:
    """N models on N devices, driven by N threads of this one process (the baseline users hit).
    spec["warmup"][i] and spec["timed"][i] are thread i's waves."""
    import threading

    import torch

    devices = spec["devices"]
    models = [load_model(spec["model"], spec["dtype"], d) for d in devices]
    runners: list = [None] * len(devices)
    result: dict = {"method": spec["method"], "errors": []}

    def drive(i: int, waves: list, out: list) -> None:
        try:
            if devices[i].startswith("cuda"):
                torch.cuda.set_device(devices[i])  # per thread: what a careful user would do
            if runners[i] is None:
                runners[i] = Runner(models[i], spec["method"], spec["new_tokens"], spec["cb"])
            out[i] = runners[i].waves(waves)
        except Exception as e:  # report it: this is the failure mode the orchestrator exists to avoid
            result["errors"].append(f"thread {i} ({devices[i]}): {type(e).__name__}: {e}")

    try:
        for phase in ("warmup", "timed"):
            out: list = [None] * len(devices)
            threads = [threading.Thread(target=drive, args=(i, spec[phase][i], out)) for i in range(len(devices))]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - t0
            if result["errors"]:
                break
    finally:
        for r in runners:
            if r is not None:
                r.close()
    result.update(seconds=seconds, tokens=sum(o["tokens"] for o in out if o))
    return result


ROLES = {"build": _role_build, "inproc": _role_inproc, "threads": _role_threads, "greedy": _role_greedy}

if __name__ == "__main__":
    _role, _spec_path = sys.argv[1], sys.argv[2]
    _spec = json.loads(Path(_spec_path).read_text())
    Path(_spec["out"]).write_text(json.dumps(ROLES[_role](_spec)))
