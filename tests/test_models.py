"""Model jobs through a real coordinator and real worker processes.

One coordinator serves a 2-worker `generate` pool on a tiny random Llama (saved with save_pretrained) and
a 1-worker `embed` pool on the real MiniLM; tests compare against the same models run in-process.
"""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from orchestrator import RequestError
from tests.conftest import REPO, Server, poll_until
from tests.model_fixtures import make_tiny_llama, minilm_path

PROMPTS = ["Hello there", "The quick brown fox jumps", "A", "Once upon a time in a land far away",
           "GPUs", "one two three four five six", "The orchestrator", "zeta"]
LENGTHS = [5, 12, 20, 8, 16, 3, 10, 24]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_dir):
    tmp = tmp_path_factory.mktemp("serve")
    config = tmp / "pools.toml"
    config.write_text(f"""
[pools.gen]
handler = "generate"
devices = "cpu:2"
config = {{ model = "{llama_dir}", max_new_tokens_cap = 64 }}

[pools.embed]
handler = "embed"
devices = "cpu:1"
""")
    s = Server(tmp, ["--config", str(config)]).start(timeout=180)
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(llama_dir):
    """In-process greedy `generate` of the same model: the parity oracle."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()

    def generate(prompt: str, n: int) -> list[int]:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return out[0, ids.shape[1]:].tolist()

    return generate


@pytest.mark.slow
def test_generation_parity_8_concurrent_jobs_on_2_workers(server, reference):
    c = server.client()
    jobs = [c.submit("gen", {"prompt": p, "max_new_tokens": n}) for p, n in zip(PROMPTS, LENGTHS)]
    outs = [j.result(timeout=120) for j in jobs]
    for p, n, out in zip(PROMPTS, LENGTHS, outs):
        assert out["token_ids"] == reference(p, n), p
        assert out["usage"]["completion_tokens"] == len(out["token_ids"])
    workers = {w["name"]: w["completed"] for w in server.workers("gen")}
    assert len(workers) == 2


def test_ready_info_breaks_the_cold_start_down(server):
    """Each worker reports where its start went (boot, load, and the load's phases) and status shows it."""
    for w in server.workers("gen"):
        info = w["info"]
        phases = info["load_phases"]
        # config_s: reading config.json imports the model family's modules (seconds on the GPU image); on CPU
        # there is no warm-up phase (warmup "auto" warms only on CUDA).
        assert set(phases) == {"imports_s", "config_s", "tokenizer_s", "weights_s", "cuda_context_s",
                               "to_device_s", "engine_s"}, phases
        assert info["engine"]["attention"] == "sdpa" and info["engine"]["async_batching"] is False, info
        assert all(v >= 0 for v in phases.values()), phases
        assert info["boot_s"] > 0 and 0 < sum(phases.values()) <= info["load_s"] + 0.01, info


@pytest.mark.slow
def test_stream_chunks_concatenate_to_final_text(server):
    job = server.client().submit("gen", {"prompt": "Stream me", "max_new_tokens": 20}, stream=True)
    chunks = list(job)
    out = job.result(timeout=60)
    assert len(chunks) >= 2
    assert "".join(c["text"] for c in chunks) == out["text"]
    assert [t for c in chunks for t in c["token_ids"]] == out["token_ids"]


@pytest.mark.slow
def test_cancel_one_streaming_job_others_finish(server, reference):
    c = server.client()
    others = [c.submit("gen", {"prompt": p, "max_new_tokens": 24}) for p in PROMPTS[:3]]
    victim = c.submit("gen", {"prompt": "cancel me", "max_new_tokens": 64, "eos_token_id": []},
                      stream=True)
    first = next(iter(victim))  # it is running: a chunk arrived
    assert "text" in first
    victim.cancel()
    with pytest.raises(RequestError) as e:
        victim.result(timeout=30)
    assert e.value.code == "cancelled"
    for p, j in zip(PROMPTS[:3], others):
        assert j.result(timeout=60)["token_ids"] == reference(p, 24)


@pytest.mark.slow
@pytest.mark.parametrize("bad", [
    {"prompt": "x " * 400},  # longer than the model's context (256)
    {"prompt": 42},
    {"prompt": "hi", "max_new_tokens": 0},
    {"prompt": "hi", "max_new_tokens": 65},  # over the pool's cap
    {"prompt": "hi", "frobnicate": True},
])
def test_generate_bad_input_gets_code_and_worker_keeps_serving(server, bad):
    c = server.client()
    with pytest.raises(RequestError) as e:
        c.run("gen", bad, timeout=60)
    assert e.value.code == "invalid_input", e.value.message
    assert c.run("gen", {"prompt": "still alive", "max_new_tokens": 2}, timeout=60)["token_ids"]


def _in_process_minilm(texts: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.mark.slow
def test_embeddings_match_in_process(server):
    texts = ["a cat sits on the mat", "GPUs multiply matrices", "hello", "x" * 50]
    c = server.client()
    jobs = [c.submit("embed", {"texts": [t]}) for t in texts]  # concurrent: batched in the worker
    got = np.concatenate([j.result(timeout=60)["embeddings"].to_numpy() for j in jobs])
    want = _in_process_minilm(texts)
    assert got.dtype == np.float32 and got.shape == (4, 384)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.9999, cos


@pytest.mark.slow
def test_embed_empty_texts_is_invalid_then_serves(server):
    c = server.client()
    with pytest.raises(RequestError) as e:
        c.run("embed", {"texts": []}, timeout=60)
    assert e.value.code == "invalid_input"
    assert c.run("embed", {"texts": ["ok"]}, timeout=60)["dim"] == 384


@pytest.mark.slow
def test_serve_without_model_arguments_answers_embed(serve):
    s = serve([], timeout=180)  # no --handler/--model/--config: the bundled MiniLM embed pool
    out = s.client().run("embed", {"texts": ["default pool works"]}, timeout=60)
    assert out["embeddings"].shape == (1, 384)
    assert s.status()["pools"]["embed"]["handler"] == "embed"


@pytest.mark.slow
def test_demo_runs_to_completion_on_cpu():
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "demo", "--sentences", "100"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "embedded 100 sentences" in proc.stdout
    assert "tok/s" in proc.stdout and "coordinator exited with code 0" in proc.stdout


@pytest.mark.slow
def test_concurrent_streams_from_threads(server):
    """Several client threads stream at once; each stream adds up to its own final text."""
    c = server.client()
    errors: list = []

    def one(i: int) -> None:
        job = c.submit("gen", {"prompt": f"thread {i}", "max_new_tokens": 8}, stream=True)
        text = "".join(ch["text"] for ch in job)
        if text != job.result(timeout=60)["text"]:
            errors.append(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    poll_until(lambda: server.status()["pools"]["gen"]["inflight"] == 0, 30, what="no gen in flight")
