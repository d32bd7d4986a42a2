"""The six full-size passes of CBAM and SE as CUDA C++ kernels (``csrc/``, built into
``cbam_kernels._C``).

The passes of :mod:`cbam_kernels.ops.torch.passes` (the specification) for CUDA tensors ``x`` and
``gy`` of dtype float16, bfloat16 or float32 in any memory format, accumulating in float32, with
the interface of the fused pipeline's kernel backends:

* the reductions return their results unfinished, as
  :class:`~cbam_kernels.ops.torch.passes.Partials` over S ranges of the reduced axis (S >= 1, chosen
  by the kernels from the shape and layout), which the kernel that consumes them combines as
  :func:`~cbam_kernels.ops.torch.passes.combine_partials` specifies;
* ``channel_pool`` returns the mean and max over channels as such partials, not the map p, so it
  takes no ``max_first`` (the consumer orders the map);
* ``grad_spatial`` and ``grad_channel`` take ``out``, the output of the forward's residual
  epilogue relu(... + residual), apply its ReLU to ``gy`` and return the masked ``gy`` too.

Each function calls its op of ``torch.ops.cbam_kernels_cuda``, which runs on the current CUDA
stream of x's device. The extension is loaded at the first call, which raises ImportError when
it was not built; :mod:`cbam_kernels.ops.backend` chooses this backend only when it loads.
:class:`OpPasses` runs the same functions over any namespace of ops with the schemas of
``csrc/ops.cpp``: the CPU emulation of the kernels in ``tests/cuda_emulation`` has its own.
"""

import functools
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from ..types import ParamGrads, Partials


class OpPasses:
    """The passes over the ops that ``load_ops()`` returns (called once, at the first call)."""

    def __init__(self, load_ops: Callable[[], Any]):
        self._load_ops = load_ops

    @functools.cached_property
    def _ops(self) -> Any:
        return self._load_ops()

    def pool_hw(self, x: Tensor, with_max: bool) -> Partials:
        """Global pooling over H*W, (S, N, C) partials: sums divided by H*W (adding up to the
        mean) and, with ``with_max``, the max and its first h*w index (else None)."""
        return Partials(*self._ops.pool_hw(x, with_max))

    def channel_pool(self, x: Tensor, ca: Optional[Tensor]) -> Partials:
        """Pooling of x * ca over channels, (S, N, H*W) partials: sums divided by C (adding up
        to the mean), the max and its first channel index."""
        return Partials(*self._ops.channel_pool(x, ca))

    def apply_gates(self, x: Tensor, ca: Optional[Tensor], sa: Optional[Tensor],
                    residual: Optional[Tensor] = None) -> Tensor:
        """y = x * ca[n, c] * sa[n, h, w], in x's dtype and memory format; with ``residual`` (any
        memory format) the ResNet block epilogue relu(x * ca * sa + residual)."""
        return self._ops.apply_gates(x, ca, sa, residual)

    def grad_spatial(self, gy: Tensor, x: Tensor, ca: Optional[Tensor],
                     out: Optional[Tensor] = None) -> Tuple[Partials, Optional[Tensor]]:
        """(S, N, H*W) partial sums over C of g * x * ca, and gres. g is gy, or with ``out``
        (the forward's relu(... + residual), any memory format) gy through that ReLU,
        ``threshold_backward(gy, out, 0)``, which is then also returned as gres, laid out like
        ``torch.empty_like(x)``."""
        total, gres = self._ops.grad_spatial(gy, x, ca, out)
        return Partials(total), gres

    def grad_channel(self, gy: Tensor, x: Tensor, sa: Optional[Tensor], gp: Optional[Tensor],
                     cstar: Optional[Tensor], max_first: bool,
                     out: Optional[Tensor] = None) -> Tuple[Partials, Optional[Tensor]]:
        """(S, N, C) partial sums over H*W of gx1 * x, gx1 as ``ops.torch.passes.grad_x1`` of g,
        and gres; g and gres as in :meth:`grad_spatial`."""
        total, gres = self._ops.grad_channel(gy, x, sa, gp, cstar, max_first, out)
        return Partials(total), gres

    def grad_input(self, gy: Tensor, x: Tensor, ca: Optional[Tensor], sa: Optional[Tensor],
                   gp: Optional[Tensor], cstar: Optional[Tensor], max_first: bool,
                   ga: Optional[Tensor], gm: Optional[Tensor], pstar: Optional[Tensor], *,
                   tail: Optional[ParamGrads] = None) -> Tensor:
        """gx = gx1 * ca + ga / (H*W) + gm * [hw == pstar], in x's dtype and memory format.
        With ``tail``, the same launch also fills the parameter gradients ``tail.grads``."""
        inputs, grads, silu = [], [], False
        if tail is not None:
            inputs = [tail.gz, tail.ghidden, tail.pooled, tail.hidden, tail.wpart, tail.bn_part]
            grads, silu = list(tail.grads), tail.act == "silu"
        return self._ops.grad_input(gy, x, ca, sa, gp, cstar, max_first, ga, gm, pstar, inputs,
                                    grads, silu)


def _extension_ops() -> Any:
    """torch.ops.cbam_kernels_cuda, registered by loading the extension."""
    from ... import _C  # noqa: F401
    return torch.ops.cbam_kernels_cuda


_extension = OpPasses(_extension_ops)
pool_hw = _extension.pool_hw
channel_pool = _extension.channel_pool
apply_gates = _extension.apply_gates
grad_spatial = _extension.grad_spatial
grad_channel = _extension.grad_channel
grad_input = _extension.grad_input
