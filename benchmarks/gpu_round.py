"""The GPU round: build, correctness, timings and the sanitizer in one offline command that ends
within a time budget (a borrowed GPU machine is lent for minutes, not hours).

    python benchmarks/gpu_round.py [--seconds 500] [--out DIR] [--only STEP,...]

Steps, in priority order; each has its own cap, cut to what is left of the round, so a later
step never starves an earlier one; each prints one line (verdict, seconds, pytest's summary or
the sanitizer's error count):

1. ``build``: ``cbam_kernels._C`` for ``TORCH_CUDA_ARCH_LIST`` (default 9.0) with
   ``pip install --no-build-isolation --no-deps -e .``, else ``setup.py build_ext --inplace``;
   then ``nvidia-smi`` and ``describe_backends()`` into ``gpu.txt``.
2. ``tests``: the GPU part of the test suite (every pass of both kernel backends, the kernel
   pipelines against the specification in fp32/fp16/bf16, NCHW and channels_last, odd shapes,
   N=0, the residual epilogue, opcheck, CUDA graphs, ``torch.compile``, determinism, > 2**31
   elements), on pytest-xdist workers where it is installed; beside it ``checks``
   (``gpu_checks.py``: a converted ResNet-18 captured in a CUDA graph, bitwise-equal gradients
   over repeated steps, every pass on a > 2**31-element batch) and ``sanitize-*``
   (compute-sanitizer memcheck, racecheck, synccheck, initcheck of pass-level tests).
3. ``ops-<op>-<format>``: CBAM and SE at the ResNet-50 stage shapes, batch 64, fp16, forward and
   forward+backward, providers eager, compile, triton, cuda; one pytest-benchmark process (and
   JSON) per op and format, so one crash or cut loses one file.
4. ``resnet``: ResNet-50 plain / + SE / + CBAM, reference modules and ours, eager, batch 128,
   AMP fp16, channels_last, inference and training step.
5. ``host`` and ``launches``: host time per call, launches per call.

From the start a ``warm-up`` runs every benchmarked configuration once in the background
(``--benchmark-disable``), so that the timed runs find torch.compile's and Triton's on-disk
caches warm; it is stopped before the first timed step. Logs and JSON files go to ``DIR/round``
(default ``$OUT`` or ``.benchmarks/gpu``; ``--work`` elsewhere), packed at the end into ``DIR/round.tar.gz`` with
``DIR/summary.txt`` (the step lines) beside it. Exit status 1 if a step failed or was cut.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
#: Test files with GPU cases, the pass-level suite last (the largest: what a cut would lose).
#: On a GPU the tiny shapes (shape0-3) of its tests over SHAPES are left out (GPU_SELECT): the
#: interpreter and the CUDA emulation run them on the CPU in every CI run, and the GPU's minutes
#: go to the larger shapes.
GPU_TESTS = ["tests/test_extension.py", "tests/test_gate_op.py", "tests/test_errors.py",
             "tests/test_launches.py", "tests/test_models.py", "tests/test_gpu_checks.py",
             "tests/test_cbam.py", "tests/test_se.py", "tests/test_channel_gate.py",
             "tests/test_spatial_gate.py", "tests/test_passes.py"]
#: Pass-level tests under the sanitizer: float16, x in NCHW and channels_last, gy or residual
#: like an NCHW x or in the other layout, Triton with four ranges per reduction and CUDA.
GPU_SELECT = ("not cpu-torch and not ((test_pool_hw or test_channel_pool or test_apply_gates "
              "or test_grad_spatial or test_grad_channel or test_grad_input) "
              "and (shape0 or shape1 or shape2 or shape3))")
SANITIZE_COMMON = "dtype1 and not layouts1 and not layouts3 and not split1 and not cpu"
SANITIZE = {"memcheck": "(shape4 or shape8)", "racecheck": "shape6", "synccheck": "shape8",
            "initcheck": "shape6"}
BENCH_COMMON = ["--bench-passes=forward,fwd+bwd", "-p", "no:cacheprovider", "-q"]
OP_RUNS = [(op, fmt) for fmt in ("nhwc", "nchw") for op in ("cbam", "se")]


class Step:
    """One command of the round, its log, its cap, and (once done) its line."""

    def __init__(self, rnd: "Round", name: str, cap: float, cmd: List[str],
                 env: Optional[Dict[str, str]] = None):
        self.name, self.cmd = name, cmd
        self.cap = max(0.0, min(cap, rnd.left()))
        self.log = rnd.dir / f"{name}.log"
        self.start = time.monotonic()
        self.rnd = rnd
        self.proc, self.error = None, "not run, out of time"
        if self.cap <= 0:
            return
        with open(self.log, "w") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            try:
                self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                  **(env or {})},
                                             start_new_session=True)
            except OSError as err:
                self.error = f"FAILED ({err.strerror}: {cmd[0]})"
                log.write(self.error + "\n")
        rnd.steps.append(self)

    def wait(self, stop: bool = False) -> int:
        """Wait for the step (or, with ``stop``, end it now), print its line, return its exit
        status (124 when cut at its cap, -1 when it never ran)."""
        if self.proc is None:
            return self.rnd.record(self, self.error, -1)
        try:
            if stop:
                raise subprocess.TimeoutExpired(self.cmd, 0)
            rc = self.proc.wait(timeout=max(0.0, self.cap - (time.monotonic() - self.start)))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return self.rnd.record(self, "stopped" if stop else f"TIMEOUT ({self.cap:.0f}s)",
                                   124)
        return self.rnd.record(self, "ok" if rc == 0 else f"FAILED (exit {rc})", rc)


class Round:
    """The round's deadline, its output folder and its step lines."""

    def __init__(self, out: Path, work: Path, seconds: float):
        self.dir = work
        self.dir.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.deadline = time.monotonic() + seconds
        self.lines: List[str] = []
        self.steps: List[Step] = []
        self.failed = False

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def start(self, name: str, cap: float, cmd: List[str], **kw) -> Step:
        return Step(self, name, cap, cmd, **kw)

    def run(self, name: str, cap: float, cmd: List[str], **kw) -> int:
        return self.start(name, cap, cmd, **kw).wait()

    def record(self, step: Step, verdict: str, rc: int) -> int:
        text = step.log.read_text(errors="replace") if step.log.exists() else ""
        summary = [ln for ln in text.splitlines() if re.search(r"(passed|failed|error).* in [0-9.]+s", ln)]
        errors = re.findall(r"(?:ERROR SUMMARY: \d+ errors?|RACECHECK SUMMARY: \d+ hazards)", text)
        line = (f"{step.name:22s} {verdict:18s} {time.monotonic() - step.start:5.0f}s  "
                f"{summary[-1].strip('= ') if summary else ''}  {errors[-1] if errors else ''}")
        print(line.rstrip(), flush=True)
        self.lines.append(line.rstrip())
        if step.name != "warm-up" and rc != 0:
            self.failed = True
        return rc

    def stop_all(self) -> None:
        """End whatever is still running (a round that stops early leaves nothing behind)."""
        for step in self.steps:
            if step.proc is not None and step.proc.poll() is None:
                os.killpg(step.proc.pid, signal.SIGKILL)

    def pack(self) -> None:
        (self.out / "summary.txt").write_text("\n".join(self.lines) + "\n")
        with tarfile.open(self.out / "round.tar.gz", "w:gz") as tar:
            tar.add(self.dir, arcname="round")


def pytest_cmd(*args: str) -> List[str]:
    return [PY, "-m", "pytest", *args]


def build(rnd: Round) -> None:
    """The extension, editable install first, in-place build if pip cannot (old setuptools)."""
    env = {"TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
           "CBAM_KERNELS_BUILD_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4)}
    if rnd.run("build", 200, [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                              "-e", "."], env=env) != 0:
        rnd.run("build-inplace", 200, [PY, "setup.py", "build_ext", "--inplace"], env=env)
    rnd.run("gpu", 60, ["bash", "-c", "nvidia-smi --query-gpu=name,driver_version,"
                        "clocks.max.sm,memory.total --format=csv; "
                        f"{PY} -m cbam_kernels; {PY} -c 'import torch, triton; "
                        "print(torch.__version__, triton.__version__)'"])


def warm_up(rnd: Round) -> Step:
    """Every benchmarked configuration once, four processes side by side."""
    runs = [f"{PY} -m pytest benchmarks/test_bench_{op}.py --benchmark-disable "
            f"--bench-formats={fmt} {' '.join(BENCH_COMMON)}" for op, fmt in OP_RUNS]
    runs.append(f"{PY} -m pytest benchmarks/test_bench_resnet.py --benchmark-disable "
                f"--bench-providers=eager -k ours {' '.join(BENCH_COMMON)}")
    return rnd.start("warm-up", rnd.left(), ["bash", "-c", " & ".join(runs) + " & wait"])


def correctness(rnd: Round, cap: float, only: set, tests: List[str], select: str) -> None:
    """The tests (``tests`` or GPU_TESTS, ``-k select`` if given) and beside them gpu_checks and
    the sanitizer, as far as ``only`` names them; then wait for all."""
    side = []
    if "sanitize" in only:
        side.append(rnd.start("checks", cap, [PY, "benchmarks/gpu_checks.py"]))
        sanitizer = shutil.which("compute-sanitizer") or \
            f"{os.environ.get('CUDA_HOME', '/usr/local/cuda')}/compute-sanitizer/compute-sanitizer"
        for tool, shapes in SANITIZE.items():
            side.append(rnd.start(
                f"sanitize-{tool}", cap,
                [sanitizer, "--tool", tool, "--error-exitcode", "3", "--report-api-errors", "no",
                 "--print-limit", "20", *pytest_cmd("tests/test_passes.py", "-q", "-p",
                                                    "no:cacheprovider", "-k",
                                                    f"{shapes} and {SANITIZE_COMMON}")],
                env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}))
    if "tests" in only:
        rnd.run("tests", cap, pytest_cmd(
            *(tests or GPU_TESTS), *plugin_args(), "-v", "-p", "no:cacheprovider",
            "-p", "benchmarks.failure_log", "-rfE", "--maxfail=200",
            "-k", f"{GPU_SELECT} and ({select})" if select else GPU_SELECT),
            env={"FAILURE_LOG": str(rnd.dir / "failures.log")})
    for step in side:
        step.wait()


def plugin_args() -> List[str]:
    """pytest-xdist workers and pytest-timeout's cap per test, where they are installed (the
    GPU machine has both; neither is needed elsewhere)."""
    args = []
    for module, option in (("xdist", ["-n", "14"]), ("pytest_timeout", ["--timeout=150"])):
        try:
            __import__(module)
            args += option
        except ImportError:
            pass
    return args


def benchmarks(rnd: Round, ops_cap: float, rounds: int) -> None:
    """The timed steps, one process at a time."""
    for i, (op, fmt) in enumerate(OP_RUNS):
        cap = min(ops_cap / len(OP_RUNS) * 1.5, (ops_cap * (len(OP_RUNS) - i)) / len(OP_RUNS))
        rnd.run(f"ops-{op}-{fmt}", cap, pytest_cmd(
            f"benchmarks/test_bench_{op}.py", f"--bench-formats={fmt}",
            f"--bench-rounds={rounds}", *BENCH_COMMON,
            f"--benchmark-json={rnd.dir / f'ops-{op}-{fmt}.json'}"))
    rnd.run("resnet", 55, pytest_cmd(
        "benchmarks/test_bench_resnet.py", "--bench-providers=eager", "--bench-rounds=30",
        *BENCH_COMMON, f"--benchmark-json={rnd.dir / 'resnet.json'}"))
    rnd.run("host", 45, pytest_cmd(
        "benchmarks/test_bench_host.py", "--bench-providers=eager,triton,cuda",
        "--bench-rounds=10", *BENCH_COMMON,
        f"--benchmark-json={rnd.dir / 'host.json'}"))
    rnd.run("launches", 20, [PY, "benchmarks/launch_table.py"])


def print_medians(folder: Path) -> None:
    """One line per timed case: median ms, and times the two-pass floor."""
    import json
    for path in sorted(folder.glob("*.json")):
        try:
            results = json.loads(path.read_text())["benchmarks"]
        except (ValueError, KeyError):
            continue
        for b in results:
            info = b.get("extra_info", {})
            print(f"{path.stem:14s} {b['name'][:72]:72s} {info.get('median_ms', 0):8.3f} ms "
                  f"x{info.get('floor_ratio') or 0:6.1f} floor  "
                  f"{info.get('images_per_s') or '':>8}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=500, help="the round's time budget")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT", REPO / ".benchmarks" / "gpu")))
    parser.add_argument("--work", type=Path, help="folder of the logs and JSON files "
                        "(default OUT/round; packed into OUT/round.tar.gz either way)")
    parser.add_argument("--only", default="build,tests,sanitize,bench",
                        help="comma list of build, tests, sanitize (gpu_checks.py and the "
                        "sanitizer, beside the tests), bench")
    parser.add_argument("--tests", nargs="*", default=[], help="test files (default: GPU_TESTS)")
    parser.add_argument("-k", dest="select", default="", help="pytest -k of the tests step")
    parser.add_argument("--tests-seconds", type=float, default=160)
    parser.add_argument("--ops-seconds", type=float, default=170)
    parser.add_argument("--rounds", type=int, default=60, help="timed rounds per op case")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    rnd = Round(args.out, args.work or args.out / "round", args.seconds)
    try:
        warm = warm_up(rnd) if "bench" in only else None
        if "build" in only:
            build(rnd)
        correctness(rnd, args.tests_seconds, only, args.tests, args.select)
        if warm is not None:
            warm.wait(stop=warm.proc is not None and warm.proc.poll() is None)
            benchmarks(rnd, args.ops_seconds, args.rounds)
    finally:
        rnd.stop_all()
        rnd.pack()
    print_medians(rnd.dir)
    tests_log = rnd.dir / "tests.log"
    if tests_log.exists():
        failures = [ln for ln in tests_log.read_text(errors="replace").splitlines()
                    if ln.startswith(("FAILED", "ERROR"))]
        print("\n".join(failures[:40]))
    return 1 if rnd.failed else 0


if __name__ == "__main__":
    sys.exit(main())
