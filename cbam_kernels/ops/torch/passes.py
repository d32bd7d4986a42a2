"""The six full-size passes of CBAM and SE, in plain PyTorch.

Every fused gate is the same small pipeline (see ``ops.gate.py``): a few passes over the large
activation tensor ``x`` of shape (N, C, H, W), with all other work on per-sample vectors of
length C and maps of size H x W. This module is the portable implementation of those passes:
it runs on any device and dtype (float64 included, so ``gradcheck`` can test the fused backward
formula on the CPU) and is the specification that the Triton kernels in ``ops.triton.passes.py``
match, argument for argument.

Shared conventions:

* ``x`` and ``gy`` are 4-D (N, C, H, W) in any memory format; results that are full-size come
  back in ``x``'s dtype and memory format.
* Small results are float32 (float64 for float64 inputs): ``ca`` and ``ga``/``gm`` are (N, C),
  ``sa`` and ``gsa`` are (N, H, W), the pooled map ``p`` and its gradient ``gp`` are (N, 2, H, W).
* ``max_first`` says which channel of ``p`` holds the max over channels: 0 when True (the
  official CBAM order [max, mean]), 1 when False (timm's [mean, max]).
* Arg-max indices are int64 here (int32 from the kernels); ties go to the first (lowest) index,
  and a NaN is the max (the first NaN), as ``torch.max`` has them.
* ``None`` for ``ca``, ``sa`` or a gradient means "that factor is absent" (SE has no spatial
  gate, the spatial gate alone has no channel gate).

The kernel backends return their reductions unfinished, as :class:`Partials`: the reduced axis
is cut into S consecutive ranges and each range gets its own sum (and max and arg-max); the
small kernel that consumes them combines the S results in range order, as
:func:`combine_partials` specifies, so no extra launch combines them and results are
deterministic.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..types import Partials

def combine_partials(partials: Partials) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The finished reduction (N, K): the sum of the ranges' sums, and the max with its first
    index, taken over the ranges in order (a NaN wins; among equal maxima the earliest range,
    which holds the lowest index). This is how the kernels' consumers combine partials."""
    total = partials.sum.sum(dim=0)
    if partials.max is None:
        return total, None, None
    mx, arg = partials.max[0], partials.arg[0]
    for s in range(1, partials.max.shape[0]):
        m, a = partials.max[s], partials.arg[s]
        take = (m > mx) | (m.isnan() & ~mx.isnan())
        mx, arg = torch.where(take, m, mx), torch.where(take, a, arg)
    return total, mx, arg


def acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype for ``x``: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` (``t`` itself when it already is: no dispatch, no copy)."""
    return t if t.dtype == dtype else t.to(dtype)


def in_acc_dtype(x: Tensor) -> Tensor:
    """``x`` in its accumulation dtype (``x`` itself for float32 and float64)."""
    return x if x.dtype == torch.float32 or x.dtype == torch.float64 else x.float()


def _flat(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, H*W) in the accumulation dtype."""
    return in_acc_dtype(x).flatten(2)


def _max_channel(max_first: bool) -> int:
    return 0 if max_first else 1


def pool_hw(x: Tensor, with_max: bool, with_arg: bool = True, keepdim: bool = False
            ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Global pooling over H*W: (mean, max, first arg-max), each (N, C), or (N, C, 1, 1) with
    ``keepdim``; the max is None without ``with_max``, the arg-max without it or without
    ``with_arg`` (then the max takes ``amax``, many times faster on the CPU than a max with
    indices). The mean is accumulated in float32 (pytorch/pytorch#43992).
    """
    if not with_max:
        return in_acc_dtype(x).mean(dim=(2, 3), keepdim=keepdim), None, None
    v = _flat(x)
    if with_arg:
        mx, arg = v.max(dim=2, keepdim=keepdim)
    else:
        mx, arg = v.amax(dim=2, keepdim=keepdim), None
    avg = v.mean(dim=2, keepdim=keepdim)
    if keepdim:
        return avg.unsqueeze(3), mx.unsqueeze(3), None if arg is None else arg.unsqueeze(3)
    return avg, mx, arg


def channel_pool(x: Tensor, ca: Optional[Tensor], max_first: bool, with_arg: bool = True
                 ) -> Tuple[Tensor, Optional[Tensor]]:
    """Pool x1 = x * ca over channels: the map p (N, 2, H, W) and the first channel arg-max
    (N, H, W; None without ``with_arg``, the max then taken by ``amax``)."""
    v = scale(x, ca, None)
    if with_arg:
        mx, arg = v.max(dim=1, keepdim=True)
        arg = arg.squeeze(1)
    else:
        mx, arg = v.amax(dim=1, keepdim=True), None
    mean = v.mean(dim=1, keepdim=True)
    pair = (mx, mean) if max_first else (mean, mx)
    return torch.cat(pair, dim=1), arg


def scale(x: Tensor, ca: Optional[Tensor], sa: Optional[Tensor], inplace: bool = False
          ) -> Tensor:
    """x * ca[n, c] * sa[n, h, w] in the accumulation dtype (either gate may be None).
    ``inplace``: x is a float32/float64 temporary of the caller's, that may hold the result
    (no autograd through it; one full-size allocation less)."""
    y = in_acc_dtype(x)
    if ca is not None:
        ca = ca if ca.dim() == 4 else ca.view(ca.shape[0], ca.shape[1], 1, 1)
        y = y.mul_(ca) if inplace else y * ca
    if sa is not None:
        sa = sa.view(sa.shape[0], 1, x.shape[2], x.shape[3])
        y = y.mul_(sa) if inplace else y * sa
    return y


def epilogue(y: Tensor, residual: Optional[Tensor], like: Tensor, inplace: bool = False
             ) -> Tensor:
    """The gated activation ``y`` as the op's output: with ``residual``, the ResNet block
    epilogue relu(y + residual); in the dtype and memory format of ``like`` (the input x).
    ``inplace``: ``y`` is a temporary that may hold the result (no autograd through it)."""
    if residual is not None:
        residual = cast(residual, y.dtype)
        y = y.add_(residual).relu_() if inplace else torch.relu(y + residual)
    return _like(y, like)


def apply_gates(x: Tensor, ca: Optional[Tensor], sa: Optional[Tensor],
                residual: Optional[Tensor] = None) -> Tensor:
    """y = x * ca[n, c] * sa[n, h, w], in x's dtype and memory format.

    With ``residual`` (x's shape and dtype, any memory format), the ResNet block epilogue
    y = relu(x * ca * sa + residual) instead.
    """
    return epilogue(scale(x, ca, sa), residual, x)


def grad_spatial(gy: Tensor, x: Tensor, ca: Optional[Tensor]) -> Tensor:
    """gsa[n, h, w] = sum_c gy * x * ca  (N, H, W)."""
    prod = _flat(gy) * _flat(x)
    if ca is not None:
        prod = prod * ca.unsqueeze(2)
    return prod.sum(dim=1).view(x.shape[0], x.shape[2], x.shape[3])


def grad_channel(gy: Tensor, x: Tensor, sa: Optional[Tensor], gp: Optional[Tensor],
                 cstar: Optional[Tensor], max_first: bool) -> Tensor:
    """gca[n, c] = sum_hw gx1 * x  (N, C), with gx1 as in :func:`grad_x1`."""
    return (grad_x1(gy, x.shape[1], sa, gp, cstar, max_first) * _flat(x)).sum(dim=2)


def grad_input(gy: Tensor, x: Tensor, ca: Optional[Tensor], sa: Optional[Tensor],
               gp: Optional[Tensor], cstar: Optional[Tensor], max_first: bool,
               ga: Optional[Tensor], gm: Optional[Tensor], pstar: Optional[Tensor]) -> Tensor:
    """gx = gx1 * ca + ga / (H*W) + gm * [hw == pstar], in x's dtype and memory format."""
    n, c, h, w = x.shape
    g = grad_x1(gy, c, sa, gp, cstar, max_first)
    if ca is not None:
        g = g * ca.unsqueeze(2)
    if ga is not None:
        g = g + (ga / (h * w)).unsqueeze(2)
    if gm is not None:
        g = g + gm.unsqueeze(2) * _one_hot(pstar, h * w, dim=2)
    return _like(g.view(n, c, h, w), x)


def grad_x1(gy: Tensor, channels: int, sa: Optional[Tensor], gp: Optional[Tensor],
            cstar: Optional[Tensor], max_first: bool) -> Tensor:
    """Gradient reaching x1 = x * ca, flattened (N, C, H*W):

    gx1 = gy * sa + gp_mean / C + gp_max * [c == cstar]; terms whose inputs are None drop out.
    """
    g = _flat(gy)
    n, _, hw = g.shape  # explicit sizes: a -1 is ambiguous when N = 0
    if sa is not None:
        g = g * sa.reshape(n, 1, hw)
    if gp is not None:
        gp = cast(gp.reshape(n, 2, hw), g.dtype)
        gmax, gmean = gp[:, _max_channel(max_first)], gp[:, 1 - _max_channel(max_first)]
        g = g + (gmean / channels).unsqueeze(1)
        g = g + gmax.unsqueeze(1) * _one_hot(cstar.reshape(n, hw), channels, dim=1)
    return g


def _one_hot(index: Tensor, size: int, dim: int) -> Tensor:
    """0/1 tensor that is 1 where the position along ``dim`` equals ``index``."""
    index = index.long().unsqueeze(dim)
    shape = [1] * index.dim()
    shape[dim] = size
    return (torch.arange(size, device=index.device).view(shape) == index).float()


def _like(v: Tensor, x: Tensor) -> Tensor:
    """``v`` in x's dtype, laid out like ``torch.empty_like(x)`` (no copy when it is)."""
    if v.dtype == x.dtype and v.stride() == x.stride():
        return v
    out = torch.empty_like(x)
    out.copy_(v.view(x.shape))
    return out
