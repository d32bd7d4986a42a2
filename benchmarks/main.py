"""Main job: a representative subset of the benchmark suite with a progress display, then its table.

    python benchmarks/main.py [--out DIR] [-- EXTRA PYTEST ARGS]

On a CUDA machine: CBAM and SE at the four ResNet-50 stage shapes, batch 64, fp16,
channels_last, forward and forward+backward, every provider (eager reference, torch.compile,
Triton, CUDA when built). Without one: the CPU providers (eager reference, ours on the torch
backend) on small shapes, all four ops, on one thread (steadier on small, shared machines), then
a line saying that GPU numbers need a GPU. Both: the host time per call of CBAM and SE on a tiny
input (``test_bench_host.py``), the launch table (``launch_table.py``; without a GPU the
Triton kernels run through Triton's interpreter to be counted) and the host time of the kernel
path with its launches stubbed (``host_stubbed.py``, on CPU tensors).
The JSON, results.md and the charts go to DIR (default .benchmarks/main).
"""

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, not installed

import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks import report  # noqa: E402

OP_FILES = ("cbam", "se", "channel_gate", "spatial_gate", "host")
GPU_SUBSET = [*(str(REPO / "benchmarks" / f"test_bench_{op}.py") for op in OP_FILES[:2]),
              str(REPO / "benchmarks" / "test_bench_host.py"),
              "--bench-formats=nhwc", "--bench-passes=forward,fwd+bwd"]
CPU_SUBSET = [*(str(REPO / "benchmarks" / f"test_bench_{op}.py") for op in OP_FILES),
              "--bench-device=cpu"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".benchmarks" / "main",
                        help="directory for results.json, results.md and the charts")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "results.json"
    code = pytest.main([*(GPU_SUBSET if gpu else CPU_SUBSET), "--benchmark-only",
                        f"--benchmark-json={json_path}", "--benchmark-quiet",
                        "-p", "no:cacheprovider", f"--rootdir={REPO}", *args.pytest_args])
    if code != pytest.ExitCode.OK:
        return int(code)
    results = report.load(json_path)
    print()
    print(report.header(results))
    print()
    print(report.op_tables(results.ops))
    if results.host:
        print("\n### host time per call\n")
        print(report.host_table(results.host))
    for title, script in (("launches per call", "launch_table.py"),
                          ("host time per call without the launches", "host_stubbed.py")):
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script)],
                              capture_output=True, text=True)
        print(f"\n### {title}\n")
        print(done.stdout if done.returncode == 0 else done.stderr[-2000:])
    print(f"\nfull report: {report.write_report([json_path], args.out)}")
    if not gpu:
        print("These are CPU numbers of the CPU providers; GPU numbers (Triton, CUDA, "
              "torch.compile on a GPU) need a GPU: run this command on a CUDA machine.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
