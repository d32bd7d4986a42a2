"""The fused gate in plain PyTorch: the specification of the whole pipeline, on any device.

:func:`forward` composes the passes of ``passes_torch`` with the small math of ``gate_math``
in the order every backend follows (pool over H*W, channel MLP, pool over C, spatial conv +
BatchNorm, apply), and is differentiable: the ``torch`` backend runs it under autograd, so that
eager mode and ``torch.compile`` see plain PyTorch. :func:`backward` is the hand-written
backward that the kernel pipelines implement, pass for pass (checked against autograd of
:func:`forward` by ``gradcheck`` in float64).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import gate_math, passes_torch
from .gate_math import (BatchNormState, ChannelSaved, GateConfig, GateGrads, GateParams,
                        SpatialSaved)


def forward(x: Tensor, residual: Optional[Tensor], params: GateParams, cfg: GateConfig,
            bn: BatchNormState) -> Tuple[Tensor, Optional[ChannelSaved], Optional[SpatialSaved]]:
    """y = x * ca * sa (relu(... + residual) with a residual) and what backward needs; with
    batch statistics the BatchNorm's running statistics are updated."""
    n, _, h, w = x.shape
    channel = spatial = None
    if params.w1 is not None:
        avg, mx, pstar = passes_torch.pool_hw(x, cfg.use_max)
        pooled = torch.stack([v for v, use in ((avg, cfg.use_avg), (mx, cfg.use_max)) if use])
        z, hidden = gate_math.mlp_forward(pooled, params.w1, params.b1, params.w2, params.b2,
                                          cfg.act)
        channel = ChannelSaved(gate_math.gate(z, cfg.gate), pooled, hidden,
                               pstar if cfg.use_max else None)
    ca = channel.ca if channel is not None else None
    if params.conv_w is not None:
        p, cstar = passes_torch.channel_pool(x, ca, cfg.max_first)
        sa, xhat, mean, var = gate_math.spatial_forward(p, params.conv_w, params.bn_w,
                                                        params.bn_b, bn)
        gate_math.update_running_stats(bn, mean, var, n * h * w)
        spatial = SpatialSaved(sa, p.flatten(2), cstar.flatten(1), xhat, torch.cat([mean, var]))
    sa = spatial.sa if spatial is not None else None
    return passes_torch.apply_gates(x, ca, sa, residual), channel, spatial


def backward(gy: Tensor, x: Tensor, out: Optional[Tensor], params: GateParams, cfg: GateConfig,
             bn: BatchNormState, channel: Optional[ChannelSaved],
             spatial: Optional[SpatialSaved]) -> GateGrads:
    """Gradients of :func:`forward` given dL/dy. ``out`` is the forward output when it was a
    relu(... + residual) epilogue: its ReLU mask applies, and the masked gradient is the
    residual's."""
    n, _, h, w = x.shape
    gres = None
    if out is not None:
        gy = gres = torch.ops.aten.threshold_backward(gy, out, 0)
    ca = channel.ca if channel is not None else None
    sa = spatial.sa if spatial is not None else None
    gp = cstar = None
    gconv = gbn_w = gbn_b = None
    if spatial is not None:
        gsa = passes_torch.grad_spatial(gy, x, ca).flatten(1)
        gp, (gconv, gbn_w, gbn_b) = gate_math.spatial_backward(
            gsa, spatial, params.conv_w, params.bn_w, params.bn_b, bn, h, w)
        cstar = spatial.cstar
    ga = gm = pstar = None
    gw1 = gb1 = gw2 = gb2 = None
    if channel is not None:
        gca = passes_torch.grad_channel(gy, x, sa, gp, cstar, cfg.max_first)
        gz = gca * gate_math.gate_grad_from_output(channel.ca, cfg.gate)
        gpooled, (gw1, gb1, gw2, gb2) = gate_math.mlp_backward(
            gz, channel.pooled, channel.hidden, params.w1, params.b1, params.w2, params.b2,
            cfg.act)
        ga = gpooled[0] if cfg.use_avg else None
        gm = gpooled[-1] if cfg.use_max else None
        pstar = channel.pstar
    gx = passes_torch.grad_input(gy, x, ca, sa, gp, cstar, cfg.max_first, ga, gm, pstar)
    return GateGrads(gx, gres, GateParams(gw1, gb1, gw2, gb2, gconv, gbn_w, gbn_b))
