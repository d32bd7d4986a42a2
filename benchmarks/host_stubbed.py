"""Host time per call of the kernel pipeline, measured without a GPU.

    python benchmarks/host_stubbed.py

Runs CBAM and SE on the Triton backend on CPU tensors of ``suite.HOST_SHAPE`` with every Triton
launch replaced by a no-op (through the interpreter's entry point, which this script turns on
for itself): what remains is the host work of a call around its launches (module glue, the
autograd Function, launch plans, allocations), the part that a GPU does not hide. The driver's
and Triton's own cost per launch is not in it (count the launches with ``launch_table.py``).
For scale, the eager reference modules on the same CPU tensor, real kernels included. Median of
calls in alternating blocks, one thread; prints a Markdown table.
"""

import os
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before the Triton kernels are first imported
os.environ["CBAM_KERNELS_BACKEND"] = "triton"

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, not installed

import torch  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

from benchmarks.suite import HOST_SHAPE  # noqa: E402
from benchmarks.workloads import fused_module, reference_module  # noqa: E402

REPEATS, ROUNDS, WARMUP = 400, 4, 10


def _stub_launches() -> None:
    """Make every ``kernel[grid](...)`` a no-op."""
    KernelInterface.__getitem__ = lambda kernel, grid: (lambda *args, **kwargs: None)


def _calls(module: torch.nn.Module, x: torch.Tensor) -> dict:
    """The timed callables of ``module`` by pass, each with the mode it runs in: eval forward,
    training forward + backward."""
    params = list(module.parameters())
    xg, gy = x.clone().requires_grad_(), torch.randn_like(x)

    def forward():
        with torch.no_grad():
            module(x)

    def train():
        torch.autograd.grad(module(xg), [xg, *params], gy)
    return {"forward": (False, forward), "fwd+bwd": (True, train)}


def table() -> str:
    """The Markdown table: µs per call, ours (launches stubbed) and eager, and their ratio."""
    torch.set_num_threads(1)
    _stub_launches()
    torch.manual_seed(0)
    x = torch.randn(HOST_SHAPE)
    rows = []
    for op in ("cbam", "se"):
        reference = reference_module(op, HOST_SHAPE[1])
        ours = fused_module(op, HOST_SHAPE[1])
        ours.load_state_dict(reference.state_dict())
        modules = {"ours": ours, "eager": reference}
        calls = {who: _calls(module, x) for who, module in modules.items()}
        for pass_name in ("forward", "fwd+bwd"):
            times = {who: [] for who in calls}
            for who, module in modules.items():
                module.train(calls[who][pass_name][0])
            for _ in range(ROUNDS):  # alternating blocks of calls, each with a warm-up
                for who in calls:
                    for repeat in range(WARMUP + REPEATS // ROUNDS):
                        start = time.perf_counter()
                        calls[who][pass_name][1]()
                        if repeat >= WARMUP:
                            times[who].append(time.perf_counter() - start)
            ours_us, eager_us = (statistics.median(times[w]) * 1e6 for w in ("ours", "eager"))
            rows.append(f"| {op} | {pass_name} | {ours_us:.1f} | {eager_us:.1f} | "
                        f"{ours_us / eager_us:.2f}x |")
    shape = "x".join(map(str, HOST_SHAPE))
    return (f"Host time per call without the launches (Triton backend, {shape} float32 CPU "
            "tensors, every launch a no-op; eager: the reference modules with their CPU "
            "kernels):\n\n| op | pass | ours, µs | eager, µs | ours / eager |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    print(table())
