#!/usr/bin/env bash
# Everything a GPU machine should run, in one call (works offline, torch already installed):
#   bash benchmarks/gpu_run.sh [tests|bench|sanitize|all]   results under ${OUT:-.benchmarks/gpu}
# tests: build the extension, print the backends, run the whole test suite on the GPU.
# bench: the launch table, the default benchmark suite (host time per call included), then the
#        report (results.md + charts, README section).
# sanitize: benchmarks/gpu_sanitize.sh (compute-sanitizer, > 2^31 elements, CUDA graphs,
#        determinism; under 10 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
stage="${1:-all}"
out="${OUT:-.benchmarks/gpu}"
mkdir -p "$out"
if [[ "$stage" == tests || "$stage" == all ]]; then
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" CBAM_KERNELS_BUILD_CUDA=1 \
    pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || tail -20 "$out/build.log"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$out/gpu.txt"
  python -c "import cbam_kernels; print(cbam_kernels.describe_backends())" | tee -a "$out/gpu.txt"
  python -m pytest tests -q -p no:cacheprovider -x > "$out/tests.log" 2>&1
  tail -5 "$out/tests.log"
fi
if [[ "$stage" == bench || "$stage" == all ]]; then
  python benchmarks/launch_table.py | tee "$out/launches.md"
  python -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$out/results.json" > "$out/bench.log" 2>&1
  tail -5 "$out/bench.log"
  python benchmarks/report.py "$out/results.json" --out "$out" --readme README.md
  cat "$out/results.md"
fi
if [[ "$stage" == sanitize || "$stage" == all ]]; then
  bash benchmarks/gpu_sanitize.sh
fi
