"""The kernel pipeline's four small kernels in PyTorch: what the CUDA backend runs between its
passes on a GPU that Triton cannot serve (sm_75, or Triton not installed).

Each function has the arguments and results of its Triton kernel (``ops.triton.channel_mlp``,
``ops.triton.spatial``): it takes the :class:`~cbam_kernels.ops.types.Partials` of a pass,
finishes them as :func:`~cbam_kernels.ops.torch.passes.combine_partials` specifies, and returns
the same NamedTuple, with the same shapes and dtypes (float32, arg-maxes int32), on the
partials' device:

* :func:`channel_mlp`      -- :class:`ChannelSaved` (ca, pooled, hidden, pstar);
* :func:`spatial_gate`     -- :class:`SpatialSaved` (sa, p, cstar, xhat, stats); in training the
  batch statistics, and the running statistics updated as ``nn.BatchNorm2d`` updates them,
  without reading a value back to the host;
* :func:`mlp_backward`     -- :class:`ChannelGrads` (ga, gm, gz, ghidden);
* :func:`spatial_backward` -- :class:`SpatialGrads` (gp, wpart, bn_part): the partials that the
  grad-input pass's parameter-gradient tail sums over its P rows, here one row (P = 1) holding
  the whole sum: wpart (1, 2 k k), the conv weight gradient by (input channel, row, column);
  bn_part (1, 2), [sum gv, sum gv * xhat], the BatchNorm bias and weight gradients.

The math is the specification's own (``ops.torch.pipeline``): these functions only finish the
partials and hand the small math the tensors it expects. Several ATen launches each, where a
Triton kernel is one: the launch budgets of ``ops.kernel_pipeline`` hold for the Triton small
kernels only.
"""

from typing import Optional

import torch
from torch import Tensor

from .passes import cast, combine_partials
from .pipeline import (activation_grad, batch_norm_stats, gate_grad_from_output, matrix,
                       mlp_forward, spatial_forward, update_running_stats)
from .pipeline import gate as gate_value
from .pipeline import spatial_backward as _spatial_backward
from ..types import (BatchNormState, ChannelGrads, ChannelSaved, Partials, SpatialGrads,
                     SpatialSaved)


def channel_mlp(pool: Partials, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                b2: Optional[Tensor], use_avg: bool, use_max: bool, act: str,
                gate: str) -> ChannelSaved:
    """The channel gate from the partials of ``pool_hw`` (S, N, C): ca = gate(sum_k MLP(v_k))
    over the pools in use, v_k the average and/or the max over H*W. Saves pooled (K, N, C), the
    hidden pre-activations (K, N, R) and, with the max pool, its first arg-max pstar (N, C)."""
    avg, mx, arg = combine_partials(pool)
    k = int(use_avg) + int(use_max)
    n, c = avg.shape
    if k == 2:
        pooled = torch.stack((avg, mx))
    else:
        pooled = (avg if use_avg else mx).unsqueeze(0)
    z, hidden = mlp_forward(pooled.view(k * n, c), k, matrix(w1), b1, matrix(w2), b2, act)
    pstar = cast(arg, torch.int32) if use_max else None
    return ChannelSaved(gate_value(z, gate), pooled, hidden.view(k, n, -1), pstar)


def mlp_backward(grad: Partials, saved: ChannelSaved, w1: Tensor, w2: Tensor, use_avg: bool,
                 use_max: bool, act: str, gate: str) -> ChannelGrads:
    """Backward of :func:`channel_mlp` from the partials of ``grad_channel`` (dL/dca, (S, N,
    C)): gz = gca * gate'(ca), ghidden_k = (gz W2) * act'(hidden_k), ga / gm = ghidden_k W1.
    The MLP's parameter gradients are left to the grad-input pass's tail (from gz, ghidden and
    the saved tensors), as with the Triton kernel."""
    gz = combine_partials(grad)[0] * gate_grad_from_output(saved.ca, gate)
    ghidden = (gz @ cast(matrix(w2), gz.dtype)).unsqueeze(0) * activation_grad(saved.hidden, act)
    gpooled = ghidden @ cast(matrix(w1), gz.dtype)
    return ChannelGrads(gpooled[0] if use_avg else None, gpooled[-1] if use_max else None, gz,
                        ghidden)


def spatial_gate(pool: Partials, conv_w: Tensor, bn_w: Optional[Tensor], bn_b: Optional[Tensor],
                 bn: BatchNormState, max_first: bool, height: int, width: int) -> SpatialSaved:
    """sa = sigmoid(BN(conv(p))) from the partials of ``channel_pool`` (S, N, H*W): p is the
    map [max, mean] over C (``max_first``) or [mean, max], with the first channel arg-max
    cstar. With ``bn.batch_stats`` the BatchNorm uses the batch mean and biased variance and,
    given ``bn.num_batches_tracked``, updates the running statistics (on the device: the
    cumulative momentum too); otherwise it uses the running statistics."""
    mean, mx, cstar = combine_partials(pool)
    n = mean.shape[0]
    p = torch.stack((mx, mean) if max_first else (mean, mx), dim=1)
    # In training the update is update_running_stats' (spatial_forward's reads
    # num_batches_tracked back to the host for a cumulative momentum).
    norm = BatchNormState(eps=bn.eps, momentum=bn.momentum) if bn.batch_stats else bn
    sa, u, batch_mean, rstd = spatial_forward(p.view(n, 2, height, width), conv_w, bn_w, bn_b,
                                              norm)
    xhat, stats = batch_norm_stats(u, batch_mean, rstd, bn)
    if bn.batch_stats:
        update_running_stats(bn, stats[0:1], stats[1:2], n * height * width)
    return SpatialSaved(sa, p, cast(cstar, torch.int32), xhat, stats)


def spatial_backward(grad: Partials, saved: SpatialSaved, conv_w: Tensor, bn_w: Optional[Tensor],
                     bn: BatchNormState, height: int, width: int) -> SpatialGrads:
    """Backward of :func:`spatial_gate` from the partials of ``grad_spatial`` (dL/dsa, (S, N,
    H*W)): gp (N, 2, H*W) through the sigmoid, the BatchNorm (its batch statistics in training)
    and the conv; and the parameter gradients as one row of partials (P = 1) for the grad-input
    pass's tail: wpart (1, 2 k k) and bn_part (1, 2) = [sum gv, sum gv * xhat]."""
    gsa = combine_partials(grad)[0]
    one = gsa.new_ones(1)
    # The specification's backward in float32 (its parameter gradients come back in the
    # parameters' dtypes: given float32 ones, the unrounded sums). Without a BatchNorm weight
    # its gradient, sum gv * xhat, is still the tail's bn_part entry: the factor 1 leaves gv
    # as it is. A bias of any value makes it return sum gv.
    weight = one if bn_w is None else cast(bn_w, gsa.dtype)
    gp, (gconv, gweight, gbias) = _spatial_backward(
        gsa, saved, cast(conv_w, gsa.dtype), weight, one, bn, height, width)
    return SpatialGrads(gp.contiguous(), gconv.reshape(1, -1),
                        torch.cat((gbias, gweight)).view(1, 2))
