"""The types every layer of the op shares: what a gate computes (:class:`GateConfig`), its
parameters and BatchNorm state, what each gate saves for its backward, the reduction partials
the kernel passes hand to the small kernels, and the gradients in between.

Nothing here computes: the PyTorch specification (``ops/torch``), the Triton kernels
(``ops/triton``) and the CUDA C++ kernels (``ops/cuda``) all build on these, and none of them
imports another.
"""

import functools
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

#: The dtypes of x that the kernel backends take (float64 runs here only).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Partials(NamedTuple):
    """A reduction over one axis of x, split into S consecutive ranges of that axis.

    ``sum`` (S, N, K) float32: per range, the sum of the values divided by the reduction's
    divisor (the axis length for a mean, 1 for a sum), so that the S entries add up to the
    result. ``max`` and ``arg`` (S, N, K) float32 and int32, or None: per range, the max and the
    index (along the whole axis) of its first occurrence; a NaN wins over numbers, the first
    NaN over later ones. K is the kept axis: C for a reduction over H*W, H*W for one over C.
    """

    sum: Tensor
    max: Optional[Tensor] = None
    arg: Optional[Tensor] = None


ACTIVATIONS = ("relu", "silu")
GATES = ("sigmoid", "hardsigmoid")


class GateConfig(NamedTuple):
    """What a fused gate computes besides its parameters (hashable: launch plans key on it).

    ``use_avg``/``use_max``: the pools the channel MLP sees; ``act``: its hidden activation
    ('relu' or 'silu'); ``gate``: 'sigmoid' or 'hardsigmoid'; ``max_first``: the spatial map
    is [max, mean] (official CBAM) rather than [mean, max] (timm)."""

    use_avg: bool = True
    use_max: bool = True
    act: str = "relu"
    gate: str = "sigmoid"
    max_first: bool = True


class GateParams(NamedTuple):
    """The trainable tensors of a gate (None where absent): the channel MLP ``w1`` (R, C),
    ``b1``, ``w2`` (C, R), ``b2`` -- no ``w1`` means no channel gate -- and the spatial gate's
    ``conv_w`` (1, 2, k, k) and BatchNorm affine ``bn_w``, ``bn_b`` (1,) -- no ``conv_w``, no
    spatial gate."""

    w1: Optional[Tensor] = None
    b1: Optional[Tensor] = None
    w2: Optional[Tensor] = None
    b2: Optional[Tensor] = None
    conv_w: Optional[Tensor] = None
    bn_w: Optional[Tensor] = None
    bn_b: Optional[Tensor] = None


class BatchNormState(NamedTuple):
    """The spatial gate's BatchNorm besides its affine terms: the running statistics (None
    without ``track_running_stats``), eps, momentum (None: cumulative average), and
    ``batch_stats``: normalise with the batch's statistics (training), or with the running ones
    (eval). With batch statistics and ``num_batches_tracked`` given, the running statistics are
    updated as ``nn.BatchNorm2d`` updates them."""

    running_mean: Optional[Tensor] = None
    running_var: Optional[Tensor] = None
    num_batches_tracked: Optional[Tensor] = None
    eps: float = 1e-5
    momentum: Optional[float] = 0.1
    batch_stats: bool = True


class GateGrads(NamedTuple):
    """A fused gate's gradients: of x, of the residual (None without one) and of each
    parameter (a :class:`GateParams` of gradients, None where the parameter is absent)."""

    x: Tensor
    residual: Optional[Tensor]
    params: GateParams


class ChannelSaved(NamedTuple):
    """What the channel gate keeps for its backward (float32 or float64; pstar int32)."""

    ca: Tensor                # (N, C) the gate
    pooled: Tensor            # (K, N, C) average pool, then max pool (those in use)
    hidden: Tensor            # (K, N, R) MLP pre-activations
    pstar: Optional[Tensor]   # (N, C) arg-max over H*W, with the max pool


class SpatialSaved(NamedTuple):
    """What the spatial gate keeps for its backward (float32 or float64; cstar int32)."""

    sa: Tensor      # (N, H*W) the gate
    p: Tensor       # (N, 2, H*W) pooled map in the conv's channel order
    cstar: Tensor   # (N, H*W) channel arg-max
    xhat: Tensor    # (N, H*W) normalised conv output
    stats: Tensor   # (3,) mean, biased variance and 1 / sqrt(var + eps) the BatchNorm used


@functools.lru_cache(maxsize=4096)
def merged_hw_stride(shape: Tuple[int, ...], strides: Tuple[int, ...]) -> Optional[int]:
    """The stride of the merged H*W axis of a 4-D tensor of this shape and these strides, or
    None when its H and W dims do not merge into one strided axis. The kernel backends address
    every full-size tensor as (N, C, H*W) and copy one whose H and W do not merge."""
    _, _, h, w = shape
    if w == 1:
        return strides[2]
    if h == 1 or strides[2] == w * strides[3]:
        return strides[3]
    return None


class SpatialGrads(NamedTuple):
    """The spatial gate's backward: gp for the passes, per-program partials for the tail."""

    gp: Tensor       # (N, 2, HW) gradient of the pooled map
    wpart: Tensor    # (programs, 2 k k) conv weight gradient partials
    bn_part: Tensor  # (programs, 2) sums of gv and gv * xhat


class ChannelGrads(NamedTuple):
    """The channel gate's backward: ga / gm for the grad-input pass, gz / ghidden for the
    tail (float32)."""

    ga: Optional[Tensor]  # (N, C) gradient of the average pool
    gm: Optional[Tensor]  # (N, C) gradient of the max pool
    gz: Tensor            # (N, C) gradient of the logits
    ghidden: Tensor       # (K, N, R) gradient of the hidden pre-activations


class ParamGrads(NamedTuple):
    """The parameter gradients of a backward and what they are computed from.

    ``grads``: a :class:`GateParams` of them, each allocated like its parameter (strides
    included), None where the parameter is absent; the grad-input pass of either kernel backend
    fills them in its own launch, as sums over the batch in a fixed order. Channel gate (None
    without one): ``gz`` (N, C), ``ghidden`` (K, N, R), ``pooled`` (K, N, C), ``hidden``
    (K, N, R) and the MLP's activation ``act``; spatial gate (None without one): the
    per-program partials ``wpart`` (P, 2 k k) and ``bn_part`` (P, 2) of
    :func:`spatial_backward`."""

    grads: GateParams
    gz: Optional[Tensor]
    ghidden: Optional[Tensor]
    pooled: Optional[Tensor]
    hidden: Optional[Tensor]
    act: str
    wpart: Optional[Tensor]
    bn_part: Optional[Tensor]


