"""Where a module's time goes on a GPU: the device time of its kernels beside the call's time.

    python benchmarks/kernel_profile.py [--ops cbam,se] [--providers eager,triton,cuda]
                                        [--formats nhwc] [--batch 64] [--iters 20] [--json PATH]

For each op, ResNet-50 stage shape (batch 64, fp16), format, provider and pass (``forward``:
eval under no_grad; ``fwd+bwd``: training, the gradients of x and every parameter), as the op
benchmarks build them (``workloads.py``): the median time of one call between CUDA events
(``call ms``), the device time of the kernels it launched (``kernels ms``, from
``torch.profiler``), the kernels per call, and the kernels that take most of that time. Where the
kernels take far less than the call, the call is bound by host work (Python, dispatch, launch
latency), not by the GPU; where they take most of it, the named kernels are what to speed up.
Needs a GPU.
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, not installed

from benchmarks.suite import SHAPE_SETS, OpCase  # noqa: E402
from benchmarks.timing import device_clock, median_seconds  # noqa: E402
from benchmarks.workloads import build_module, forced_backend, make_workload  # noqa: E402

TOP = 3


def profile_case(case: OpCase, iters: int) -> dict:
    """The row of one case: call and kernel times per call, kernels per call, top kernels."""
    with forced_backend(case.provider):
        module = build_module(case)
        workload = make_workload(case, module, module)
        device = torch.device(case.device)
        call_ms = 1e3 * median_seconds(workload, device_clock(device), iters, 3)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(iters):
                workload.call()
            torch.cuda.synchronize(device)
    per_kernel = defaultdict(float)
    launches = 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.time_range.elapsed_us() / 1e3 / iters
            launches += 1
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:TOP]
    return dict(op=case.op, shape=case.shape_name, format=case.fmt, provider=case.provider,
                pass_name=case.pass_name, call_ms=call_ms, kernels_ms=sum(per_kernel.values()),
                launches=launches / iters, top=[(name[:60], ms) for name, ms in top])


def table(rows) -> str:
    head = "| op | shape | format | pass | provider | call ms | kernels ms | kernels/call | " \
           "top kernels (ms per call) |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        top = "; ".join(f"{name} {ms:.3f}" for name, ms in r["top"])
        lines.append(f"| {r['op']} | {r['shape']} | {r['format']} | {r['pass_name']} | "
                     f"{r['provider']} | {r['call_ms']:.3f} | {r['kernels_ms']:.3f} | "
                     f"{r['launches']:.0f} | {top} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="cbam,se")
    parser.add_argument("--providers", default="eager,triton,cuda")
    parser.add_argument("--formats", default="nhwc")
    parser.add_argument("--passes", default="forward,fwd+bwd")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_profile: skipped, no GPU")
        return 0
    from cbam_kernels import available_backends
    rows = []
    for op in args.ops.split(","):
        for fmt in args.formats.split(","):
            for shape in SHAPE_SETS["resnet50"]:
                for pass_name in args.passes.split(","):
                    for provider in args.providers.split(","):
                        if provider not in ("eager", "compile") and \
                                available_backends().get(provider) != "available":
                            continue
                        case = OpCase(op, provider, pass_name, args.batch, shape, "fp16", fmt,
                                      "cuda")
                        rows.append(profile_case(case, args.iters))
                        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
