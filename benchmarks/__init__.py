"""Benchmark suite of cbam_kernels (pytest-benchmark); conftest.py says how to run and select it."""
