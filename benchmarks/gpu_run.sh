#!/usr/bin/env bash
# The GPU round (benchmarks/gpu_round.py: build, GPU tests, gpu_checks, sanitizer, timings) in
# one offline command on a machine with a GPU and torch installed; arguments go to gpu_round.py:
#   bash benchmarks/gpu_run.sh [--seconds 480] [--only build,tests,sanitize,bench]
cd "$(dirname "$0")/.." && exec python3 benchmarks/gpu_round.py "$@"
