"""GenerateHandler: text generation on transformers' own continuous batching (CB) engine.

Config: "model" (required: local path or hub id), "dtype" ("auto": float32 on CPU, the checkpoint's dtype
on GPU), "device_map", "attn_implementation" (on CUDA: flash_attention_3 or _2 when that package is
importable, else sdpa; on CPU: sdpa), "capacity" (32), "max_new_tokens_cap" (1024),
"default_max_new_tokens" (64), "admit_window_ms" (2: jobs arriving this close together join the
engine as one burst), "max_batch_tokens", "cb" (extra ContinuousBatchingConfig fields, e.g.
{"num_blocks": 512, "seed": 0}), "warmup" ("auto": warm the engine inside load() on CUDA; true: on CPU
too; false: never; or {"prompt_tokens": 64} to shape the warm-up requests).

Engine defaults on CUDA (tp = 1): CUDA graphs and async batching on (`use_cuda_graph`,
`use_async_batching`), unless "cb" sets them. transformers turns them on by itself only with flash
attention, and without them the engine ran at a third of its speed on an H200 (docs/benchmarks.md). Then
load() warms the engine before READY, so that the first wave pays no graph capture: the engine's own
warm-up (`manager.warmup()`: the largest varlen size, and the decode sizes when the fast decode path
exists) and then synthetic bursts of 1, 2, 4 ... capacity requests of `warmup.prompt_tokens` tokens and
2 new tokens each, which capture the prefill and decode graphs of bursts of those sizes. On CPU nothing
changes: no graphs, no async batching (it needs CUDA), no warm-up. The chosen engine (attention, graphs,
async, token budget, KV blocks, warm-up shapes and time) is in the READY info under "engine", so it shows
in `status`.

Input: exactly one of "prompt" (str), "input_ids" (list[int]) or "messages" (chat, rendered with the
tokenizer's chat template), plus optional "max_new_tokens", "temperature", "top_p", "top_k", "do_sample",
"seed", "stop" (str or list[str]) and "eos_token_id" (int or list[int]; [] never stops on EOS).
Output: {"text", "token_ids", "finish_reason": "stop"|"length", "usage": {"prompt_tokens",
"completion_tokens"}, "timing": {"received", "scheduled", "finished"}} (timing: CLOCK_MONOTONIC seconds);
stream chunks are {"text": delta, "token_ids": new ids} and add up to the output.

Two engines share the weights, because `do_sample` is a per-manager setting in CB: greedy requests go to a
greedy manager (token for token equal to `model.generate(do_sample=False)`); sampled ones go to a second
manager, started on the first sampled request, with per-request temperature/top_k/top_p
(`per_request_processors`). CB draws every sample of a batch from one generator, so a per-request "seed"
cannot make sampling reproducible: a sampled request with a seed is rejected rather than silently ignored.

With tp > 1 the handler runs on every rank of a TP group (worker/tp.py): the model loads with tp_plan="auto"
into the group's process group, rank 0 is CB's TP driver (it alone receives jobs; CB broadcasts new requests
to the other ranks inside its loop), every forward passes the collective guard (a forward pre-hook), the
engine runs without CUDA graphs (a replay would skip the hook: docs/benchmarks.md says what that costs and
why the guard is not moved yet), greedy only, and an engine failure restarts
the whole group instead of failing its jobs one by one. transformers needs `accelerate` to load with a TP plan.
"""
from __future__ import annotations

import threading
import time

from protocol.errors import CANCELLED, HANDLER_ERROR, ConfigError
from worker.guard import GroupError
from worker.handler import EngineHandler, Job, check
from worker.handlers.generate_io import Limits, Request, TextState, parse_request

CONFIG_KEYS = frozenset({
    "model", "dtype", "device_map", "attn_implementation", "capacity", "max_new_tokens_cap", "admit_window_ms",
    "default_max_new_tokens", "max_batch_tokens", "cb", "warmup",
})
POLL_S = 0.1  # how often an idle reader checks that its engine thread is still alive
CB_PAGE_TOKENS = 256  # tokens per KV-cache block: the default page_size (5.23) / block_size (5.17)
CPU_CACHE_TOKENS = 64 * 1024  # CPU KV cache cap, in tokens, unless cb.num_blocks says otherwise
CPU_MAX_BATCH_TOKENS = 512
PROMPT_ESTIMATE = 1024  # prompt tokens per request assumed when sizing a graphed sdpa engine's KV cache
GRAPHED_BATCH_TOKENS = 2048  # token budget of a graphed sdpa engine unless configured
GRAPHED_KV_PADDING = 1024  # KV-read padding of a graphed sdpa engine (transformers' default: 16,384)
WARMUP_PROMPT_TOKENS = 64  # prompt length of the synthetic warm-up requests (config "warmup.prompt_tokens")
WARMUP_NEW_TOKENS = 2  # one prefill and one decode step per warm-up request
WARMUP_TIMEOUT_S = 300.0


class _Gen:
    """One job inside an engine: what it asked for and what it has produced."""

    def __init__(self, job: Job, req: Request, engine: "_Engine", text: TextState, eos: set):
        self.jid = job.jid
        self.rid = str(job.jid)  # the CB request id
        self.stream = job.stream
        self.req = req
        self.engine = engine
        self.text = text
        self.eos = eos
        self.token_ids: list = []
        self.ids_sent = 0
        self.received = job.received
        self.lifespan = (-1.0, -1.0)  # CB's (scheduled, finished) perf_counter stamps, from its last output


# --------------------------------------------------------------------------------------------- engine


class _Engine:
    """One transformers ContinuousBatchingManager and the thread that reads its outputs."""

    def __init__(self, name: str, manager, on_output, on_exit):
        self.name = name
        self.manager = manager
        self.alive = True
        self._on_output = on_output
        self._on_exit = on_exit
        self._stopping = threading.Event()
        self._reader = threading.Thread(target=self._read, name=f"cb-{name}-reader", daemon=True)

    def start(self) -> None:
        self.manager.start()
        self._reader.start()

    def _read(self) -> None:
        # One reader with get_result(timeout) serves every request; request_id_iter would need a thread per
        # request and requeues the outputs of the others. Both exist in transformers 5.17 and 5.23.
        while not self._stopping.is_set():
            out = self.manager.get_result(timeout=POLL_S)
            if out is not None:
                self._on_output(out)
            elif not self.manager.is_running():
                break
        self.alive = False
        if not self._stopping.is_set():
            self._on_exit(self)

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        # hard_stop: close() already ended every job, so nothing is left worth finishing.
        self.manager.stop(block=True, timeout=timeout, hard_stop=True)
        self._reader.join(timeout)


# -------------------------------------------------------------------------------------------- handler


class GenerateHandler(EngineHandler):
    """Causal LM generation through transformers' continuous batching; see the module docstring."""

    # A stream that already sent chunks must not be replayed elsewhere: the client would see them twice.
    replay_safe = False

    def __init__(self, ctx):
        super().__init__(ctx)
        unknown = sorted(set(self.config) - CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"generate handler: unknown config keys {unknown}; allowed: {sorted(CONFIG_KEYS)}")
        if "model" not in self.config:
            raise ConfigError("generate handler: config needs 'model' (a local path or a hub id)")
        self.capacity = int(self.config.get("capacity", 32))
        # Jobs arriving within 2 ms of each other join the engine as one burst: CB ran half as fast when a
        # wave's requests trickled in 0.2 ms apart (docs/benchmarks.md, "Models on GPU").
        self.admit_window_s = float(self.config.get("admit_window_ms", 2.0)) / 1000
        self.model = None
        self.tokenizer = None
        self.limits: Limits | None = None
        self._eos: list = []  # the model's EOS ids, used when a request gives none
        self._greedy: _Engine | None = None
        self._sampler: _Engine | None = None  # started on the first sampled request
        self._lock = threading.Lock()  # guards _jobs; held while reporting so each job ends exactly once
        self._jobs: dict[str, _Gen] = {}
        self.load_phases: dict = {}
        self.engine_info: dict = {}  # what the greedy engine was started with (READY info "engine")
        self._warming: set = set()  # request ids of the warm-up bursts still running (guarded by _lock)
        self._warm_done = threading.Event()

    # ------------------------------------------------------------------------------------ lifecycle

    def load(self) -> None:
        # Where the load time goes, reported in READY info (status shows it): the cold start of N workers
        # against one is judged on these phases (docs/benchmarks.md, GPU scaling).
        t = time.perf_counter()
        phases = self.load_phases = {}

        def lap(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            phases[name] = round(now - t, 3)
            t = now

        from worker.models import check_model_location

        check_model_location(self.config["model"])  # before transformers: a bad path fails in milliseconds
        # Import what the later phases use here, so that each phase measures its own work: transformers loads
        # lazily, and without this the first from_pretrained pays for importing torch and the tokenizer stack.
        import torch  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, ContinuousBatchingConfig  # noqa: F401

        lap("imports_s")
        # Reading config.json imports the model family's modules, and with them transformers' model-loading
        # stack (core_model_loading, torch.distributed.tensor, accelerate): seconds on the GPU image. That
        # cost used to land in tokenizer_s, because AutoTokenizer reads the config first.
        model_config = AutoConfig.from_pretrained(self.config["model"])
        lap("config_s")
        self.tokenizer = AutoTokenizer.from_pretrained(self.config["model"], config=model_config)
        lap("tokenizer_s")
        self.model = self._load_model(lap, model_config)
        if self.ctx.world_size > 1:
            from worker.guard import install_guard

            # Every forward of every rank, those inside the CB engine included, is cross-checked first.
            install_guard(self.model, self.ctx.group.guard, on_fail=self.ctx.group.fail)
        self.limits = self._limits()
        self._eos = self._model_eos()
        self._greedy = self._start_engine("greedy", sample=False)
        lap("engine_s")
        if self._warmup_wanted():
            self._warm(self._greedy)
            lap("warmup_s")

    def _load_model(self, lap, model_config):
        from transformers import AutoModelForCausalLM

        kwargs = {"config": model_config, "dtype": self._dtype(), "attn_implementation": self._attention()}
        if self.config.get("device_map") is not None:
            kwargs["device_map"] = self.config["device_map"]
        if self.ctx.world_size > 1:
            # The group's process group exists (worker.tp rendezvoused before load): shard the model over it.
            # Each rank then drives cuda:<rank> (LOCAL_RANK) or the CPU; transformers needs `accelerate` here.
            kwargs.update(tp_plan="auto", tp_size=self.ctx.world_size)
        model = AutoModelForCausalLM.from_pretrained(self.config["model"], **kwargs)
        lap("weights_s")
        if "device_map" not in kwargs and self.ctx.world_size == 1:
            if str(self.ctx.device).startswith("cuda"):
                import torch

                torch.empty(1, device=self.ctx.device)  # the process's first CUDA call: context creation
            lap("cuda_context_s")
            model = model.to(self.ctx.device)
            lap("to_device_s")
        return model.eval()

    def _dtype(self):
        from worker.models import torch_dtype

        return torch_dtype(self.config.get("dtype", "auto"), self.ctx.device, "generate")

    def _attention(self) -> str:
        """The configured attention, else flash (3, then 2) when importable on CUDA, else sdpa."""
        if self.config.get("attn_implementation"):
            return self.config["attn_implementation"]
        if str(self.ctx.device).startswith("cuda"):
            import importlib.util

            for module, impl in (("flash_attn_interface", "flash_attention_3"), ("flash_attn", "flash_attention_2")):
                if importlib.util.find_spec(module) is not None:
                    return impl
        return "sdpa"

    def _limits(self) -> Limits:
        text_cfg = self.model.config.get_text_config()
        context = getattr(text_cfg, "max_position_embeddings", None) or self.tokenizer.model_max_length
        return Limits(
            context=int(context),
            vocab=self.model.get_input_embeddings().num_embeddings,
            cap=int(self.config.get("max_new_tokens_cap", 1024)),
            default_new=int(self.config.get("default_max_new_tokens", 64)),
        )

    def _model_eos(self) -> list:
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def _start_engine(self, name: str, sample: bool) -> _Engine:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        gen = GenerationConfig(do_sample=sample, max_new_tokens=self.limits.default_new,
                               eos_token_id=self._eos or -1, pad_token_id=self.tokenizer.pad_token_id)
        if sample:
            # Values other than the neutral ones make CB create the processors; each request overrides them.
            gen.update(temperature=0.7, top_k=50, top_p=0.9)
        cb = self._cb_config(sample)
        manager = self.model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(**cb))
        engine = _Engine(name, manager, self._on_output, self._on_engine_exit)
        warm_s = None
        if not sample and self._warmup_wanted() and hasattr(manager, "warmup"):
            # The sampling engine starts on the compute thread at the first sampled request, so it is not
            # warmed: that would stall every job. The greedy engine's own warm-up runs before its thread
            # starts (the thread then reuses this batch processor with its graphs): the largest varlen size
            # first, so that later captures fit in its memory pool.
            t0 = time.perf_counter()
            manager.warmup()
            warm_s = round(time.perf_counter() - t0, 3)
        if not sample:
            self.engine_info = self._describe_engine(cb, manager)
            self.engine_info["warmup"] = {"engine_s": warm_s}
        engine.start()
        return engine

    def _describe_engine(self, cb: dict, manager) -> dict:
        """What the engine runs with, for READY info: the config resolved by transformers where it exposes it."""
        resolved = getattr(manager, "continuous_batching_config", None)  # absent in older transformers

        def value(key: str):
            v = getattr(resolved, key, None) if resolved is not None else None
            v = cb.get(key) if v is None else v
            return list(v) if isinstance(v, tuple) else v

        return {"attention": self.model.config._attn_implementation, "cuda_graph": value("use_cuda_graph"),
                "async_batching": value("use_async_batching"), "max_batch_tokens": value("max_batch_tokens"),
                "num_blocks": value("num_blocks"), "max_requests_per_batch": value("max_requests_per_batch"),
                "kv_padding_interval_size": value("kv_padding_interval_size"), "capacity": self.capacity}

    # ------------------------------------------------------------------------------------ warm-up

    def _warmup_wanted(self) -> bool:
        """"auto" (the default): on CUDA only, where graphs are captured; true: also on CPU (tests use it)."""
        wanted = self.config.get("warmup", "auto")
        if self.ctx.world_size > 1 or not wanted:
            return False
        return wanted != "auto" or self.model.device.type == "cuda"

    def _warm(self, engine: _Engine) -> None:
        """Synthetic bursts of 1, 2, 4 ... capacity requests through the running engine, before READY: they
        capture the prefill and decode graphs of bursts of those sizes. Their request ids are not jobs, so
        the reader only crosses them off `_warming` when they finish; this thread waits until none is left."""
        t0 = time.perf_counter()
        opts = self.config["warmup"] if isinstance(self.config.get("warmup"), dict) else {}
        plen = int(opts.get("prompt_tokens", WARMUP_PROMPT_TOKENS))
        plen = max(1, min(plen, self.limits.context - WARMUP_NEW_TOKENS))
        sizes = sorted({min(2 ** k, self.capacity) for k in range(self.capacity.bit_length() + 1)})
        vocab = max(3, min(self.limits.vocab, 1000))
        for size in sizes:
            rids = [f"__gpuorch_warm_{size}_{i}__" for i in range(size)]  # not transformers' own warm-up ids
            with self._lock:
                self._warming.update(rids)
            for i, rid in enumerate(rids):
                ids = [(7 + 31 * i + 17 * k) % (vocab - 2) + 2 for k in range(plen)]
                engine.manager.add_request(input_ids=ids, request_id=rid, max_new_tokens=WARMUP_NEW_TOKENS)
            self._wait_warm(engine, size)
        self.engine_info["warmup"].update(bursts=sizes, prompt_tokens=plen,
                                          bursts_s=round(time.perf_counter() - t0, 3))

    def _wait_warm(self, engine: _Engine, size: int) -> None:
        deadline = time.monotonic() + WARMUP_TIMEOUT_S
        while True:
            with self._lock:
                if not self._warming:
                    return
            if not engine.alive:
                raise RuntimeError("the generation engine stopped during its warm-up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine's warm-up burst of {size} did not finish within "
                                   f"{WARMUP_TIMEOUT_S:g} s")
            self._warm_done.wait(0.05)
            self._warm_done.clear()

    def _cb_config(self, sample: bool) -> dict:
        from transformers import ContinuousBatchingConfig

        cb = dict(self.config.get("cb") or {})
        if "max_batch_tokens" in self.config:
            cb["max_batch_tokens"] = int(self.config["max_batch_tokens"])
        if self.model.device.type == "cpu":
            # transformers sizes the KV cache from free GPU memory; on CPU it takes most of the RAM (9 GB for a
            # 2-layer toy model, 20 s to allocate on 2 cores), and a large token budget slows every step.
            tokens = min(self.capacity * self.limits.context, CPU_CACHE_TOKENS)
            cb.setdefault("num_blocks", -(-tokens // CB_PAGE_TOKENS))
            cb.setdefault("max_batch_tokens", CPU_MAX_BATCH_TOKENS)
        cb["per_request_processors"] = sample
        if self.ctx.world_size > 1 and _accepts(ContinuousBatchingConfig, "use_cuda_graph"):
            cb.setdefault("use_cuda_graph", False)  # graph replays run no Python: they would skip the guard
        elif self.model.device.type == "cuda":
            # transformers turns these on by itself only with flash attention; with sdpa they were worth 2.9x
            # at concurrency 16 on an H200 (docs/benchmarks.md). Async batching needs CUDA: CPU stays as is.
            for key in ("use_cuda_graph", "use_async_batching"):
                if _accepts(ContinuousBatchingConfig, key):
                    cb.setdefault(key, True)
            if cb.get("use_cuda_graph") and "flash" not in self.model.config._attn_implementation:
                self._size_graphed_mask_engine(cb)
        return cb

    def _size_graphed_mask_engine(self, cb: dict) -> None:
        """Graphs with an attention mask (sdpa): the engine keeps a mask buffer of max_batch_tokens x (KV cache
        tokens + max_batch_tokens) and moves it every step, so its speed falls with the cache's size (on an
        H200, concurrency 16: 2,590 tok/s with 136 KV blocks, 203 with 2,048; docs/benchmarks.md, "Why graphs
        with sdpa need a small cache").
        A cache sized from free GPU memory (transformers' default) would be far larger still. So unless "cb"
        says otherwise: KV blocks for `capacity` requests of up to max_new_tokens_cap + PROMPT_ESTIMATE tokens,
        a token budget of GRAPHED_BATCH_TOKENS, and KV reads padded to 1,024 tokens instead of 16,384
        (+40% to +100% measured at concurrency 16 and 64)."""
        per_request = min(self.limits.context, self.limits.cap + PROMPT_ESTIMATE)
        cb.setdefault("num_blocks", self.capacity * -(-per_request // CB_PAGE_TOKENS) + 8)
        cb.setdefault("max_batch_tokens", GRAPHED_BATCH_TOKENS)
        cb.setdefault("kv_padding_interval_size", GRAPHED_KV_PADDING)

    def info(self) -> dict:
        import transformers

        return {"model": self.config["model"], "dtype": str(self.model.dtype).removeprefix("torch."),
                "device": str(self.model.device), "context": self.limits.context,
                "transformers": transformers.__version__, "load_phases": self.load_phases,
                "engine": self.engine_info}

    def close(self) -> None:
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
            for gen in jobs:
                self.ctx.sink.error(gen.jid, HANDLER_ERROR, "the worker closed before the job finished")
        for engine in (self._greedy, self._sampler):
            if engine is not None:
                engine.stop(timeout=30)

    # ----------------------------------------------------------------------------------------- jobs

    def add(self, job: Job) -> None:
        """Validate and queue a job; raises JobError("invalid_input") for bad input."""
        exc = self.add_many([job])[0]
        if exc is not None:
            raise exc

    def add_many(self, jobs: list[Job]) -> list[BaseException | None]:
        """Parse every job of the burst first, then hand them to the engine back to back. Parsing costs
        20-100 us a job against about 5 us for `add_request`; interleaved, a wave of 128 jobs took long
        enough to add that the engine started a step with part of it and the rest joined 100-190 ms later
        (docs/benchmarks.md §9.2)."""
        refused: list[BaseException | None] = [None] * len(jobs)
        parsed = []
        for i, job in enumerate(jobs):
            try:
                parsed.append((i, self._prepare(job)))
            except Exception as e:
                refused[i] = e
        for i, gen in parsed:
            try:
                self._register(gen)
            except Exception as e:
                refused[i] = e
        return refused

    def _prepare(self, job: Job) -> _Gen:
        req = parse_request(job.input, self.tokenizer, self.limits)
        engine = self._engine_for(req)
        eos = set(self._eos if req.eos_token_id is None else req.eos_token_id)
        return _Gen(job, req, engine, TextState(self.tokenizer, req.input_ids, req.stop), eos)

    def _register(self, gen: _Gen) -> None:
        with self._lock:
            if gen.rid in self._jobs:
                raise RuntimeError(f"job {gen.jid} is already running")
            self._jobs[gen.rid] = gen  # before add_request: the reader may see an output at once
        try:
            self._submit(gen)
        except BaseException:
            with self._lock:
                self._jobs.pop(gen.rid, None)
            raise

    def _engine_for(self, req: Request) -> _Engine:
        # With TP every engine step is a collective of all ranks, and rank 0 alone would start the sampling
        # engine (on its first sampled request): its ranks would never meet.
        check(req.sampling is None or self.ctx.world_size == 1,
              f"sampling is not supported with tp={self.ctx.world_size} (greedy only): send do_sample false")
        if req.sampling is not None and self._sampler is None:
            self._sampler = self._start_engine("sample", sample=True)
        engine = self._greedy if req.sampling is None else self._sampler
        if not engine.alive:
            raise RuntimeError(f"the {engine.name} generation engine has stopped")
        return engine

    def _submit(self, gen: _Gen) -> None:
        req = gen.req
        rid = gen.engine.manager.add_request(
            input_ids=req.input_ids, request_id=gen.rid, max_new_tokens=req.max_new_tokens,
            # Stop strings need every token as it comes, so that generation can end early.
            streaming=gen.stream or bool(req.stop), eos_token_id=req.eos_token_id, **(req.sampling or {}))
        if rid is None:
            raise RuntimeError(f"the {gen.engine.name} generation engine refused the request (stopping)")

    def cancel(self, jid: int) -> None:
        with self._lock:
            gen = self._jobs.pop(str(jid), None)
            if gen is None:
                return  # already ended: its result or error was sent
            self.ctx.sink.error(jid, CANCELLED, "cancelled by the client")
        gen.engine.manager.cancel_request(gen.rid)

    def busy(self) -> bool:
        with self._lock:
            return bool(self._jobs)

    # ------------------------------------------------------------------------ engine outputs (reader)

    def _on_output(self, out) -> None:
        with self._lock:
            gen = self._jobs.get(out.request_id)
            if gen is None and out.request_id in self._warming and out.is_finished():
                self._warming.discard(out.request_id)
                self._warm_done.set()
        if gen is None:
            return  # a warm-up request, or cancelled or ended: late outputs of that request are dropped
        try:
            self._advance(gen, out)
        except Exception as e:  # one bad output must not kill the reader that serves every job
            self._fail(gen, f"{type(e).__name__}: {e}")

    def _advance(self, gen: _Gen, out) -> None:
        if out.error is not None and self.ctx.group is not None:  # TP: the group restarts, the job is retried
            self.ctx.group.fail(GroupError(f"rank {self.ctx.rank}: generation failed: {out.error}"))
            return
        if out.error is not None:
            self._fail(gen, f"generation failed: {out.error}")
            return
        new = list(out.generated_tokens[len(gen.token_ids):])
        gen.token_ids.extend(new)
        gen.lifespan = getattr(out, "lifespan", gen.lifespan)
        gen.text.add(new, final=out.is_finished())
        if gen.text.stopped:
            if not out.is_finished():
                gen.engine.manager.cancel_request(gen.rid)  # frees its cache now; more tokens would be dropped
            self._end(gen, "stop")
        elif out.is_finished():
            self._end(gen, "stop" if gen.token_ids and gen.token_ids[-1] in gen.eos else "length")
        elif gen.stream and new:
            with self._lock:
                if self._jobs.get(gen.rid) is gen:
                    self._send_chunk(gen, final=False)

    def _send_chunk(self, gen: _Gen, final: bool) -> None:
        text, ids = gen.text.take(final), gen.token_ids[gen.ids_sent:]
        gen.ids_sent = len(gen.token_ids)
        if text or ids:
            self.ctx.sink.chunk(gen.jid, {"text": text, "token_ids": ids})

    def _end(self, gen: _Gen, finish_reason: str) -> None:
        with self._lock:
            if self._jobs.pop(gen.rid, None) is not gen:
                return
            if gen.stream:
                self._send_chunk(gen, final=True)
            self.ctx.sink.result(gen.jid, {
                "text": gen.text.text,
                "token_ids": gen.token_ids,
                "finish_reason": finish_reason,
                "usage": {"prompt_tokens": len(gen.req.input_ids), "completion_tokens": len(gen.token_ids)},
                "timing": _timing(gen),
            })

    def _fail(self, gen: _Gen, message: str) -> None:
        with self._lock:
            if self._jobs.pop(gen.rid, None) is gen:
                self.ctx.sink.error(gen.jid, HANDLER_ERROR, message)

    def _on_engine_exit(self, engine: _Engine) -> None:
        """The engine thread died (a fatal error inside transformers): fail the jobs it held (with TP: the
        whole group restarts and its jobs are retried)."""
        if self.ctx.group is not None:
            self.ctx.group.fail(GroupError(f"rank {self.ctx.rank}: the {engine.name} engine stopped unexpectedly"))
            return
        with self._lock:
            lost = [g for g in self._jobs.values() if g.engine is engine]
        for gen in lost:
            self._fail(gen, f"the {engine.name} generation engine stopped unexpectedly")


def _timing(gen: _Gen) -> dict:
    """When the worker received the job, when the engine first scheduled it, and when it finished: seconds
    on CLOCK_MONOTONIC (time.perf_counter on Linux), one clock for every process of the host. They show
    where a job's time went (queued in the worker, waiting for a batch slot, generating); a field the
    engine did not stamp (a stop string ended the job first) is null."""
    scheduled, finished = gen.lifespan
    return {"received": gen.received, "scheduled": scheduled if scheduled > 0 else None,
            "finished": finished if finished > 0 else None}


def _accepts(cls, name: str) -> bool:
    """Whether a config class takes keyword `name` (transformers' CB config gains fields between releases)."""
    import inspect

    return name in inspect.signature(cls).parameters
