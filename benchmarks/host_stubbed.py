"""Host time per call of the kernel pipeline, measured without a GPU.

    python benchmarks/host_stubbed.py

Runs CBAM and SE on the Triton backend on CPU tensors of ``suite.HOST_SHAPE`` with every Triton
launch replaced by a no-op (through the interpreter's entry point, which this script turns on
for itself): what remains is the host work of a call around its launches (module glue, the
autograd Function, launch plans, allocations), the part that a GPU does not hide. A second
column keeps the Python part of Triton's own launch: each launch runs Triton's argument binder
for an NVIDIA target (the specialisation of every argument, tuple elements included) and builds
the kernel-cache key, as ``JITFunction.run`` does before the driver call; the driver's cost is
in neither (count the launches with ``launch_table.py``). For scale, the eager reference modules
on the same CPU tensor, real kernels included. Median of calls in alternating blocks, one
thread; prints a Markdown table.
"""

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ["TRITON_INTERPRET"] = "1"  # before the Triton kernels are first imported
os.environ["CBAM_KERNELS_BACKEND"] = "triton"

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, not installed

import torch  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

from benchmarks.kernel_specs import nvidia_binders  # noqa: E402
from benchmarks.suite import HOST_SHAPE  # noqa: E402
from benchmarks.workloads import fused_module, reference_module  # noqa: E402

REPEATS, ROUNDS, WARMUP = 400, 4, 10


def _no_launch(kernel, grid):
    """``kernel[grid]`` as a no-op."""
    return lambda *args, **kwargs: None


def _binding_only() -> Callable:
    """``kernel[grid]`` as the Python part of a GPU launch: bind and specialise the arguments,
    build the kernel-cache key (``JITFunction.run``'s steps before the driver call)."""
    _, binder_of = nvidia_binders()

    def getitem(kernel, grid):
        def launch(*args, **kwargs):
            _, specialization, options = binder_of(kernel.fn)[1](*args, **kwargs)
            hash((tuple(specialization), str(options)))
        return launch
    return getitem


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
    """The Markdown table: µs per call, ours (launches stubbed; Triton's binding kept) and eager,
    and their ratios."""
    torch.set_num_threads(1)
    launchers = {"ours": _no_launch, "ours+binding": _binding_only(), "eager": _no_launch}
    torch.manual_seed(0)
    x = torch.randn(HOST_SHAPE)
    rows = []
    for op in ("cbam", "se"):
        reference = reference_module(op, HOST_SHAPE[1])
        ours = fused_module(op, HOST_SHAPE[1])
        ours.load_state_dict(reference.state_dict())
        modules = {"ours": ours, "ours+binding": ours, "eager": reference}
        calls = {who: _calls(module, x) for who, module in modules.items()}
        for pass_name in ("forward", "fwd+bwd"):
            times = {who: [] for who in calls}
            for _ in range(ROUNDS):  # alternating blocks of calls, each with a warm-up
                for who in calls:
                    modules[who].train(calls[who][pass_name][0])
                    KernelInterface.__getitem__ = launchers[who]
                    for repeat in range(WARMUP + REPEATS // ROUNDS):
                        start = time.perf_counter()
                        calls[who][pass_name][1]()
                        if repeat >= WARMUP:
                            times[who].append(time.perf_counter() - start)
            us = {who: statistics.median(t) * 1e6 for who, t in times.items()}
            rows.append(f"| {op} | {pass_name} | {us['ours']:.1f} | {us['ours+binding']:.1f} | "
                        f"{us['eager']:.1f} | {us['ours'] / us['eager']:.2f}x | "
                        f"{us['ours+binding'] / us['eager']:.2f}x |")
    shape = "x".join(map(str, HOST_SHAPE))
    return (f"Host time per call without the launches (Triton backend, {shape} float32 CPU "
            "tensors, every launch a no-op, or only Triton's argument binding and cache key; "
            "eager: the reference modules with their CPU kernels):\n\n"
            "| op | pass | ours, µs | ours + binding, µs | eager, µs | ours / eager | "
            "ours + binding / eager |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    print(table())
