"""How long a burst of jobs takes to reach the engine: `add_many` (parse all, then hand over back to back)
against one `add` per job (parse and hand over, interleaved). CPU, tiny random Llama, in this process.

What counts is the spread between the first and the last `add_request` of a burst: the engine's thread
starts a step once it sees a request, and what arrives later waits for the next step (docs/benchmarks.md
§9.2). The engine's own `add_request` is timed by wrapping it (a measurement, not a stand-in).

  PYTHONPATH=$PWD python3 scripts/diag_add_burst.py --jobs 128 --rounds 5
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.model_fixtures import make_tiny_llama  # noqa: E402
from worker.handler import EventSink, Job, WorkerContext  # noqa: E402
from worker.handlers.generate import GenerateHandler  # noqa: E402


def spread_ms(handler, jobs, many: bool) -> float:
    stamps = []
    manager = handler._greedy.manager  # noqa: SLF001 (a diagnostic reads the engine it measures)
    real = manager.add_request

    def timed(*a, **kw):
        stamps.append(time.perf_counter())
        return real(*a, **kw)

    manager.add_request = timed
    try:
        if many:
            assert all(e is None for e in handler.add_many(jobs))
        else:
            for job in jobs:
                handler.add(job)
    finally:
        manager.add_request = real
    return (stamps[-1] - stamps[0]) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    done = threading.Event()
    sink = EventSink(notify=done.set)
    with tempfile.TemporaryDirectory() as d:
        model = make_tiny_llama(os.path.join(d, "llama"))
        ctx = WorkerContext(wid="d/0", pool="d", devices=["cpu"], device="cpu", sink=sink,
                            config={"model": model, "capacity": args.jobs, "default_max_new_tokens": 2})
        handler = GenerateHandler(ctx)
        handler.load()
        jids = itertools.count(1)
        results = {"add_many": [], "add": []}
        for _ in range(args.rounds):
            for mode in ("add_many", "add"):
                jobs = [Job(next(jids), {"prompt": f"burst prompt number {i} " * 4, "max_new_tokens": 2}, False,
                            set()) for i in range(args.jobs)]
                results[mode].append(spread_ms(handler, jobs, mode == "add_many"))
                while handler.busy():  # let the burst finish before the next one
                    done.wait(0.5)
                    done.clear()
                    sink.drain()
        handler.close()
    for mode, values in results.items():
        print(f"{mode:9s} {args.jobs} jobs: first to last add_request, ms: median {statistics.median(values):.2f} "
              f"(rounds: {', '.join(f'{v:.2f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
