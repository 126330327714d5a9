"""Reproductions of the paper's experiments, runnable as ``python -m benchmarks.<name>``."""
