"""Benchmarks: each measures against a baseline taken in the same run (docs/benchmarks.md holds the
figures). Run one from the repository root as a module, so that it imports this checkout:

    python3 -m scripts.bench_dispatch --help
"""
