"""Count the device launches of a call on the CPU: Triton kernel launches plus ATen ops.

What a call costs on a GPU at small shapes is mostly its number of launches. Both kinds are
countable without a GPU:

* every Triton launch (``kernel[grid](...)``), also when Triton's interpreter runs it on CPU
  tensors (``TRITON_INTERPRET=1``);
* every outermost ATen op that the call executes (through a ``TorchDispatchMode``, so ops that
  autograd runs in a backward count too), except views and allocations (``empty``,
  ``empty_like``, ...), which launch nothing on a GPU. A custom op (``cbam_kernels::*``) is not
  counted itself: the ATen ops and Triton launches inside it are. Copies (``_to_copy``, ``clone``,
  ``copy_``) and fills (``zeros``) count. ATen ops that a Triton launch makes internally (the
  interpreter's own bookkeeping) do not.

Usage::

    with count_launches() as launches:
        y = module(x)
    print(launches.total, launches.names())
"""

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: ATen ops that only allocate (no kernel on a GPU).
ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty",
                         "new_empty_strided", "empty_permuted"})


@dataclass
class Launches:
    """The launches recorded so far, in call order: Triton kernels, ops of C++ extensions (one
    kernel each) and ATen ops."""

    triton: List[str] = field(default_factory=list)
    extension: List[str] = field(default_factory=list)
    aten: List[str] = field(default_factory=list)
    _in_triton: int = 0

    @property
    def total(self) -> int:
        """Every launch counted."""
        return len(self.triton) + len(self.extension) + len(self.aten)

    def names(self) -> List[str]:
        """Every launch by kind (for messages)."""
        return ([f"triton:{n}" for n in self.triton] + [f"ext:{n}" for n in self.extension]
                + [f"aten:{n}" for n in self.aten])


def _backend_keys(args, kwargs) -> torch._C.DispatchKeySet:
    """The backend dispatch key (CPU or CUDA) of the first tensor argument."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    key = torch._C.DispatchKey.CUDA if tensors and tensors[0].is_cuda else torch._C.DispatchKey.CPU
    return torch._C.DispatchKeySet(key)


class _AtenCounter(TorchDispatchMode):
    def __init__(self, record: Launches):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "cbam_kernels":  # a Python custom op: count what it runs inside
            with _AtenCounter(self.record):
                return func.redispatch(_backend_keys(args, kwargs), *args, **kwargs)
        if not self.record._in_triton:  # a composite op: count the ops it decomposes into
            with _AtenCounter(self.record):
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        name = func.overloadpacket.__name__
        if func.namespace not in ("aten", "prim"):
            self.record.extension.append(f"{func.namespace}::{name}")
        elif not (self.record._in_triton or func.is_view or name in ALLOCATIONS):
            self.record.aten.append(name)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _triton_hook(record: Launches) -> Iterator[None]:
    """Record every ``kernel[grid](...)`` launch (compiled or interpreted) meanwhile."""
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:  # no Triton: nothing to hook
        yield
        return
    original = KernelInterface.__getitem__

    def getitem(kernel, grid):
        launch = original(kernel, grid)

        def counted(*args, **kwargs):
            record.triton.append(getattr(kernel, "__name__", type(kernel).__name__))
            record._in_triton += 1
            try:
                return launch(*args, **kwargs)
            finally:
                record._in_triton -= 1
        return counted

    KernelInterface.__getitem__ = getitem
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


@contextlib.contextmanager
def count_launches() -> Iterator[Launches]:
    """Count Triton launches and ATen ops of the code run inside the block."""
    record = Launches()
    with _triton_hook(record), _AtenCounter(record):
        yield record


def count_call(fn, *args, **kwargs) -> Launches:
    """The launches of one call ``fn(*args, **kwargs)``."""
    with count_launches() as record:
        fn(*args, **kwargs)
    return record


def module_launches(module: torch.nn.Module, x: torch.Tensor, train: bool, backward: bool,
                    residual: Optional[torch.Tensor] = None) -> Dict[str, Launches]:
    """Launches of one call of ``module`` on ``x`` (and ``residual``, when given) in training or
    eval mode: ``forward`` (under ``torch.no_grad()`` without ``backward``) and, with
    ``backward``, ``backward``: the gradients of x and of every parameter
    (``torch.autograd.grad`` with a given output gradient)."""
    module.train(train)
    extra = {} if residual is None else {"residual": residual}
    if not backward:
        with torch.no_grad():
            return {"forward": count_call(module, x, **extra)}
    x = x.detach().requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]
    with count_launches() as forward:
        y = module(x, **extra)
    gy = torch.randn_like(y)
    with count_launches() as backward_launches:
        torch.autograd.grad(y, [x, *params], gy)
    return {"forward": forward, "backward": backward_launches}
