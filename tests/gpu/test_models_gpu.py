"""The generate handler on GPUs: two pools serve two different random Llamas at once, one per GPU, and
each gives the same greedy tokens as its model run alone in this process (the seed-000 case: threads of one
process sharing CUDA state gave wrong tokens). Throughput against in-process generation is a benchmark
(scripts/bench_gpu_scaling.py), not a test."""
from __future__ import annotations

import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.gpu.llama import build_llama, greedy_in_process, prompts

pytestmark = [pytest.mark.gpu(gpus=2), pytest.mark.slow]

VOCAB = 1024
NEW_TOKENS = 32
START_S = 300.0


def _pool(name: str, model: str, devices: str) -> str:
    return textwrap.dedent(f"""
        [pools.{name}]
        handler = "generate"
        devices = "{devices}"
        capacity = 8
        max_restarts = 0
        config = {{ model = "{model}", dtype = "float32", capacity = 8, max_new_tokens_cap = 64 }}
    """)


def _generate(client, pool: str, batch: list) -> list:
    """Greedy tokens for each prompt, one job at a time: a batch of several may round differently."""
    job = {"max_new_tokens": NEW_TOKENS, "eos_token_id": []}
    return [client.run(pool, {**job, "input_ids": p}, timeout=START_S)["token_ids"] for p in batch]


def test_two_models_on_two_gpus_give_in_process_greedy_tokens(serve, tmp_path, on_gpu):
    shapes = {"a": (4, 256), "b": (6, 384)} if on_gpu else {"a": (2, 64), "b": (3, 128)}
    models = {n: build_llama(tmp_path / n, layers, hidden, VOCAB, seed=i) for i, (n, (layers, hidden))
              in enumerate(shapes.items())}
    devices = {"a": "0", "b": "1"} if on_gpu else {"a": "cpu:1", "b": "cpu:1"}
    batch = {n: prompts(8 if on_gpu else 3, VOCAB, seed=i) for i, n in enumerate(models)}
    config = tmp_path / "models.toml"
    config.write_text("".join(_pool(f"gen_{n}", models[n], devices[n]) for n in models))
    server = serve(["--config", str(config)], timeout=START_S)

    def drive(n: str) -> list:
        return _generate(server.client(timeout=START_S), f"gen_{n}", batch[n])

    with ThreadPoolExecutor(2) as ex:  # both pools at once: the seed-000 situation
        served = dict(zip(models, ex.map(drive, models)))
    server.close()  # the GPUs are the reference's now

    for i, n in enumerate(models):
        want = greedy_in_process(models[n], batch[n], NEW_TOKENS, f"cuda:{i}" if on_gpu else "cpu")
        assert served[n] == want, f"gen_{n}: served greedy tokens differ from in-process"
    # Different models must give different tokens, or the test could not see one pool answer for the other.
    assert served["a"] != served["b"]
