"""GPU checks of the GPU round (``benchmarks/gpu_round.py``), on each kernel backend:

* ``graph``: a CBAM ResNet-18 built from the reference modules and converted
  (``cbam_kernels.convert``), its training step (forward, backward, BatchNorm statistics)
  captured in a CUDA graph and replayed on new inputs, equals the same step run eagerly;
* ``determinism``: the converted model's output and gradients (input and every parameter) are
  bitwise equal over repeated training steps, under ``torch.use_deterministic_algorithms``;
* ``big``: every pass on a batch of more than 2**31 elements (each sample less: the Triton
  kernels address within a sample with int32 offsets), NCHW and channels_last, against values
  planted in the last sample.

    python benchmarks/gpu_checks.py [graph] [determinism] [big]    # all by default

Prints one line per check and backend, exits 1 if any fails. Without a GPU it says so and
exits 0; ``--device cpu`` runs the determinism check on the CPU (``torch`` backend), the others
say that they need a GPU.
"""

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (the fc layer)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, not installed

from cbam_kernels import convert, models
from cbam_kernels.ops import backend  # noqa: E402
from cbam_kernels.ops.torch.passes import combine_partials  # noqa: E402

IMAGE = (8, 3, 128, 128)    # ResNet-18 input (its stages split the reductions over C)
BIG = (3, 768, 1024, 1024)  # 2.4e9 elements, 8.1e8 per sample


def converted_resnet(device: str) -> torch.nn.Module:
    """A CBAM ResNet-18 of reference modules, converted to the fused ones, in training mode."""
    torch.manual_seed(0)
    model, summary = convert(models.resnet18("cbam", reference=True, num_classes=10))
    assert summary.replaced and not summary.skipped, str(summary)
    return model.to(device).train()


def _step(model: torch.nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """One training step's output and gradients (input, then every parameter)."""
    model.zero_grad(set_to_none=True)
    x.grad = None
    y = model(x)
    y.square().mean().backward()
    return [y, x.grad] + [p.grad for p in model.parameters()]


def check_graph(device: str) -> None:
    """Capture a training step of the converted model, replay it on new inputs, compare with
    eager steps of a copy that starts from the same state."""
    model = converted_resnet(device)
    eager = copy.deepcopy(model)
    x = torch.randn(IMAGE, device=device, requires_grad=True)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # eager and graph alike
        _capture_and_replay(model, eager, x)


def _capture_and_replay(model: torch.nn.Module, eager: torch.nn.Module, x: torch.Tensor) -> None:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up off the capture stream, as torch.cuda.graph asks
            _step(model, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    x.grad = None
    with torch.cuda.graph(graph):
        y = model(x)
        y.square().mean().backward()
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            x.copy_(torch.randn(IMAGE, device=x.device))
        eager.load_state_dict(model.state_dict())
        graph.replay()
        expected = _step(eager, x.detach().clone().requires_grad_())
        got = [y, x.grad] + [p.grad for p in model.parameters()]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for a, b in zip(model.buffers(), eager.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def check_determinism(device: str) -> None:
    """Three training steps of the converted model on one input: bitwise-equal results. (Only
    warnings for ops that PyTorch flags as nondeterministic, such as the average pool's
    backward; the fused modules must be exact.)"""
    model = converted_resnet(device)
    x = torch.randn(IMAGE, device=device, requires_grad=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first, *again = [[t.clone() for t in _step(model, x)] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for run in again:
        assert all(torch.equal(a, b) for a, b in zip(first, run)), "results differ between runs"


def _close(value: float, expected: float) -> bool:
    return abs(value - expected) <= 1e-6 * max(1.0, abs(expected))


def check_big(device: str) -> None:
    """Every pass of the chosen backend on a batch of BIG (> 2**31 elements), both layouts."""
    passes = backend.pipeline_for(torch.empty(0, device=device, dtype=torch.float16)).passes
    n, c, h, w = BIG
    hw = h * w
    x = torch.zeros(BIG, dtype=torch.float16, device=device)
    x[n - 1, c - 1, h - 1, w - 1] = 2  # the last element in both layouts
    x[n - 1, c - 1, 0, 0] = -1
    x[n - 1, 0, h - 1, w - 1] = -1
    for layout in (torch.contiguous_format, torch.channels_last):
        x = x.contiguous(memory_format=layout)
        avg, mx, arg = combine_partials(passes.pool_hw(x, True))
        assert _close(avg[n - 1, c - 1].item(), 1 / hw) and _close(avg[n - 1, 0].item(), -1 / hw)
        assert mx[n - 1, c - 1].item() == 2 and arg[n - 1, c - 1].item() == hw - 1
        assert avg[:n - 1].abs().max().item() == 0 and mx[:n - 1].abs().max().item() == 0
        mean, cmax, cstar = combine_partials(passes.channel_pool(x, None))
        assert cmax[n - 1, hw - 1].item() == 2 and cstar[n - 1, hw - 1].item() == c - 1
        assert _close(mean[n - 1, hw - 1].item(), 1 / c) and _close(mean[n - 1, 0].item(), -1 / c)
        gy = torch.ones_like(x)
        gsa = combine_partials(passes.grad_spatial(gy, x, None)[0])[0]
        assert gsa[n - 1, hw - 1].item() == 1 and gsa.abs().sum().item() == 2
        gca = combine_partials(passes.grad_channel(gy, x, None, None, None, True)[0])[0]
        assert gca[n - 1, c - 1].item() == 1 and gca.abs().sum().item() == 2
        del gy
        ca = torch.full((n, c), 0.5, device=device)
        for y in (passes.apply_gates(x, ca, None),
                  passes.grad_input(x, x, ca, None, None, None, True, None, None, None)):
            assert y.stride() == x.stride()
            assert y[n - 1, c - 1, h - 1, w - 1].item() == 1
            assert y[n - 1, c - 1, 0, 0].item() == -0.5
            assert y.sum(dtype=torch.float32).item() == 0
            del y


CHECKS: Dict[str, Callable[[str], None]] = {"graph": check_graph,
                                             "determinism": check_determinism, "big": check_big}


def run(names: List[str], device: str) -> bool:
    """Run the checks ``names`` on each backend that can run them on ``device`` (on the CPU:
    the ``torch`` backend, determinism only); print one line each; True when none fails."""
    backends = ["torch"] if device == "cpu" else \
        [b for b in ("triton", "cuda") if backend.available_backends()[b] == "available"]
    ok = True
    for name in names:
        for backend_name in backends:
            if device == "cpu" and name != "determinism":
                print(f"{name:12s} {backend_name:7s} skipped: needs a GPU")
                continue
            try:
                with backend.forced(backend_name):
                    CHECKS[name](device)
                print(f"{name:12s} {backend_name:7s} ok")
            except Exception as err:  # report every check, then fail
                ok = False
                print(f"{name:12s} {backend_name:7s} FAILED: {type(err).__name__}: {err}")
    return ok


def main(argv=None) -> int:
    """The command line (see the module docstring); the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checks", nargs="*", metavar="CHECK", help=", ".join(CHECKS))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    unknown = set(args.checks) - set(CHECKS)
    if unknown:
        parser.error(f"unknown checks {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_checks: skipped, no GPU (--device cpu runs the determinism check on the CPU)")
        return 0
    return 0 if run(args.checks or list(CHECKS), args.device) else 1


if __name__ == "__main__":
    sys.exit(main())
