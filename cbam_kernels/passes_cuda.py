"""The six full-size passes of CBAM and SE as CUDA C++ kernels (``csrc/``, built into
``cbam_kernels._C``).

Same functions, signatures and results as :mod:`cbam_kernels.passes_torch` (the specification),
for CUDA tensors ``x`` and ``gy`` of dtype float16, bfloat16 or float32 in any memory format,
accumulating in float32. Each function calls its ``torch.ops.cbam_kernels_cuda`` op, which runs on
the current CUDA stream of x's device. Importing this module loads the extension and raises
ImportError when it was not built; :mod:`cbam_kernels.backend` imports it only when asked to.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the library registers torch.ops.cbam_kernels_cuda)

_ops = torch.ops.cbam_kernels_cuda


def pool_hw(x: Tensor, with_max: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Global pooling over H*W: (mean, max, argmax), each (N, C); see ``passes_torch``."""
    return _ops.pool_hw(x, with_max)


def channel_pool(x: Tensor, ca: Optional[Tensor], max_first: bool) -> Tuple[Tensor, Tensor]:
    """Pool x * ca over channels: the map p (N, 2, H, W) and the channel arg-max (N, H, W)."""
    return _ops.channel_pool(x, ca, max_first)


def apply_gates(x: Tensor, ca: Optional[Tensor], sa: Optional[Tensor],
                residual: Optional[Tensor] = None) -> Tensor:
    """y = x * ca[n, c] * sa[n, h, w], in x's dtype and memory format; with ``residual`` (any
    memory format) the ResNet block epilogue relu(x * ca * sa + residual)."""
    return _ops.apply_gates(x, ca, sa, residual)


def grad_spatial(gy: Tensor, x: Tensor, ca: Optional[Tensor]) -> Tensor:
    """gsa[n, h, w] = sum_c gy * x * ca  (N, H, W)."""
    return _ops.grad_spatial(gy, x, ca)


def grad_channel(gy: Tensor, x: Tensor, sa: Optional[Tensor], gp: Optional[Tensor],
                 cstar: Optional[Tensor], max_first: bool) -> Tensor:
    """gca[n, c] = sum_hw gx1 * x  (N, C)."""
    return _ops.grad_channel(gy, x, sa, gp, cstar, max_first)


def grad_input(gy: Tensor, x: Tensor, ca: Optional[Tensor], sa: Optional[Tensor],
               gp: Optional[Tensor], cstar: Optional[Tensor], max_first: bool,
               ga: Optional[Tensor], gm: Optional[Tensor], pstar: Optional[Tensor]) -> Tensor:
    """gx = gx1 * ca + ga / (H*W) + gm * [hw == pstar], in x's dtype and memory format."""
    return _ops.grad_input(gy, x, ca, sa, gp, cstar, max_first, ga, gm, pstar)
