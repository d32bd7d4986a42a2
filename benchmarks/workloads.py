"""Modules, inputs and timed callables of one op benchmark case.

Every provider gets the same parameters (ours load the reference's state_dict) and the same
random inputs (never zeros). Passes:

* ``forward``: inference -- eval mode under ``torch.no_grad()``;
* ``fwd+bwd``: training mode, forward then ``torch.autograd.grad`` of x and every parameter;
* ``backward``: the same gradients, the forward run in the untimed setup of each round.

On CUDA each round takes the next of several input sets, enough that together they exceed the
L2 cache several times, so no round reads its inputs from cache.
"""

import itertools
import math
from contextlib import contextmanager
from typing import Callable, Hashable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from cbam_kernels import CBAM, SE, ChannelGate, SpatialGate, reference
from cbam_kernels.ops.backend import forced

from .suite import BASELINES, OpCase, backend_of
from .timing import Workload

REDUCTION = 16
KERNEL_SIZE = 7
#: Input sets together span this many times the L2 cache (at most MAX_INPUT_SETS sets).
L2_SPAN = 4
MAX_INPUT_SETS = 16


def reference_module(op: str, channels: int) -> nn.Module:
    """The eager reference of ``op`` (the official CBAM, its gates, timm-style SE)."""
    if op == "se":
        return reference.SEModule(channels, REDUCTION)
    cbam = reference.OfficialCBAM(channels, REDUCTION, kernel_size=KERNEL_SIZE)
    return {"cbam": cbam, "channel_gate": cbam.ChannelGate, "spatial_gate": cbam.SpatialGate}[op]


def fused_module(op: str, channels: int) -> nn.Module:
    """Our fused module of ``op``, with the reference's parameter names."""
    if op == "se":
        return SE(channels, REDUCTION)
    if op == "channel_gate":
        return ChannelGate(channels, REDUCTION)
    if op == "spatial_gate":
        return SpatialGate(KERNEL_SIZE)
    return CBAM(channels, REDUCTION, KERNEL_SIZE)


def build_module(case: OpCase) -> nn.Module:
    """The module a provider runs, on the case's device and dtype, with seeded parameters."""
    torch.manual_seed(0)
    module = reference_module(case.op, case.shape[0])
    if case.provider not in BASELINES:
        fused = fused_module(case.op, case.shape[0])
        fused.load_state_dict(module.state_dict())
        module = fused
    return module.to(device=case.device, dtype=case.torch_dtype)


@contextmanager
def forced_backend(provider: str) -> Iterator[None]:
    """Force our modules onto the provider's backend (``CBAM_KERNELS_BACKEND``) meanwhile."""
    if provider in BASELINES:
        yield
        return
    with forced(backend_of(provider)):
        yield


class CompileCache:
    """``torch.compile`` (``dynamic=False``) of the most recent configuration's module (an op's
    or a whole model's).

    A configuration's passes reuse one compiled module; a new configuration resets dynamo first,
    so recompiles across configurations never reach dynamo's recompile limits (past which it
    would silently run eagerly) and compiled code does not pile up.
    """

    def __init__(self, backend: str):
        self.backend = backend
        self._key: Optional[Hashable] = None
        self._entry: Optional[Tuple[nn.Module, Callable]] = None

    def get(self, key: Hashable, build: Callable[[], nn.Module]) -> Tuple[nn.Module, Callable]:
        """(module, compiled module) for ``key``, building and compiling on a new key."""
        if key != self._key:
            self._key, self._entry = None, None
            torch._dynamo.reset()
            module = build()
            self._entry = module, torch.compile(module, backend=self.backend, dynamic=False)
            self._key = key
        return self._entry


def input_sets(case: OpCase) -> List[Tuple[Tensor, Tensor]]:
    """Random (x, grad of y) pairs in the case's format; x requires grad unless forward."""
    count = 1
    if case.device == "cuda":
        l2_bytes = torch.cuda.get_device_properties(case.device).L2_cache_size
        set_bytes = 2 * case.numel * case.torch_dtype.itemsize
        count = min(MAX_INPUT_SETS, max(1, math.ceil(L2_SPAN * l2_bytes / set_bytes)))
    torch.manual_seed(1)
    sets = []
    for _ in range(count):
        x = torch.randn(case.input_shape, device=case.device, dtype=case.torch_dtype)
        x = x.contiguous(memory_format=case.memory_format)
        sets.append((x.requires_grad_(case.pass_name != "forward"), torch.randn_like(x)))
    return sets


def make_workload(case: OpCase, fn: Callable[[Tensor], Tensor], module: nn.Module) -> Workload:
    """The timed callable of ``case``'s pass for ``fn`` (``module`` or its compiled form)."""
    module.train(case.pass_name != "forward")
    params = [p for p in module.parameters() if p.requires_grad]
    rotation = itertools.cycle(input_sets(case))

    def gradients(y: Tensor, x: Tensor, gy: Tensor) -> Tuple[Tensor, ...]:
        return torch.autograd.grad(y, [x, *params], gy)

    if case.pass_name == "forward":
        def infer(x: Tensor) -> Tensor:
            with torch.no_grad():
                return fn(x)
        return Workload(run=infer, setup=lambda: ((next(rotation)[0],), {}))
    if case.pass_name == "fwd+bwd":
        return Workload(run=lambda x, gy: gradients(fn(x), x, gy),
                        setup=lambda: (next(rotation), {}))

    def forward_first():
        x, gy = next(rotation)
        return (fn(x), x, gy), {}
    return Workload(run=gradients, setup=forward_first)
