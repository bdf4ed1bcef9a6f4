"""Benchmarks of accel: pytest-benchmark suites (``pytest bench/``) and microbenchmark commands
(``python -m bench.<name>``) that print speedup tables and save JSON under ``bench/results/``."""
