#!/usr/bin/env bash
# The sanitizer round of a GPU machine, in one command that ends within SANITIZE_SECONDS
# (default 570, under 10 minutes with the build):
#   bash benchmarks/gpu_sanitize.sh          log: ${OUT:-.benchmarks/gpu}/sanitize.log
# Without the sanitizer: CUDA-graph capture of a converted model and bitwise-equal gradients over
# repeated runs (benchmarks/gpu_checks.py graph determinism). Under compute-sanitizer memcheck:
# the > 2^31-element cases (the CUDA backend's one-sample test of test_extension.py, and every
# pass of both kernel backends on a batch of more than 2^31 elements: gpu_checks.py big). Then
# memcheck, racecheck, synccheck and initcheck of a subset of the pass-level tests
# (tests/test_passes.py) on both kernel backends. Builds the extension (sm_90) first if it does
# not import. Prints one line per step (its verdict, pytest's summary, the sanitizer's error
# count); exits 1 if any step failed, timed out or did not run.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.benchmarks/gpu}"
log="$out/sanitize.log"
mkdir -p "$out"
: > "$log"
deadline=$(( SECONDS + ${SANITIZE_SECONDS:-570} ))
failed=0
sanitizer="$(command -v compute-sanitizer ||
  echo "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer")"
# One PyTorch allocation per tensor, so that memcheck and initcheck see each tensor's bounds.
sanitize=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --error-exitcode 3
          --report-api-errors no --print-limit 20)
# Pass-level tests: float16; x in NCHW and channels_last, gy or the residual like an NCHW x or
# in the other layout; Triton with four ranges per reduction and the CUDA backend with its own
# splits; on an odd shape (2, 33, 9, 11), one whose reductions split over H*W (2, 8, 64, 64) and
# one over C (1, 4096, 2, 2). racecheck and synccheck (shared memory, barriers): the second only.
passes=(python -m pytest tests/test_passes.py -q -p no:cacheprovider -k)
common="dtype1 and not layouts1 and not layouts3 and not split1"
wide="(shape4 or shape6 or shape8) and $common"
narrow="shape6 and $common"

# step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS (fewer if the round's time runs
# out), append its output to the log, print its line.
step() {
  local name="$1" cap="$2"; shift 2
  local left=$(( deadline - SECONDS )) start=$SECONDS part="$out/.sanitize-step.log"
  (( cap < left )) || cap=$left
  if (( cap <= 0 )); then
    echo "$name: not run, out of time" | tee -a "$log"; failed=1; return
  fi
  timeout -k 10 "$cap" "$@" > "$part" 2>&1
  local rc=$? verdict=ok
  (( rc == 124 || rc == 137 )) && verdict="TIMEOUT (${cap}s)"
  [[ $verdict == ok && $rc != 0 ]] && verdict="FAILED (exit $rc)"
  [[ $verdict == ok ]] || failed=1
  { echo "===== $name: $*"; cat "$part"; } >> "$log"
  printf '%-34s %-16s %4ds  %s  %s\n' "$name" "$verdict" $(( SECONDS - start )) \
    "$(grep -E '(passed|failed|skipped|error)' "$part" | grep -E ' in [0-9.]+s' | tail -1)" \
    "$(grep -o 'ERROR SUMMARY: [0-9]* errors*' "$part" | tail -1)" | tee -a "$log"
  rm -f "$part"
}

if ! python -c "import cbam_kernels._C" 2> /dev/null; then
  step "build (sm_90)" 240 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    CBAM_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e .
fi
step "graph capture + determinism" 90 python benchmarks/gpu_checks.py graph determinism
if [[ ! -x "$sanitizer" ]]; then
  echo "compute-sanitizer not found (PATH, \$CUDA_HOME/compute-sanitizer): no sanitizer runs" \
    | tee -a "$log"
  exit 1
fi
step "memcheck >2^31, one sample" 60 "${sanitize[@]}" --tool memcheck \
  python -m pytest tests/test_extension.py -q -p no:cacheprovider -k more_than_2_pow_31
step "memcheck >2^31, batch" 60 "${sanitize[@]}" --tool memcheck \
  python benchmarks/gpu_checks.py big
step "memcheck passes" 150 "${sanitize[@]}" --tool memcheck "${passes[@]}" "$wide"
step "racecheck passes" 80 "${sanitize[@]}" --tool racecheck "${passes[@]}" "$narrow"
step "synccheck passes" 60 "${sanitize[@]}" --tool synccheck "${passes[@]}" "$narrow"
step "initcheck passes" 120 "${sanitize[@]}" --tool initcheck "${passes[@]}" "$wide"
exit $failed
