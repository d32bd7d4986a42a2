"""The fused gate in plain PyTorch: the specification of the whole pipeline, on any device.

:func:`forward` composes the passes of ``ops.torch.passes`` with the small math of ``ops.torch.small_math``
in the order every backend follows (pool over H*W, channel MLP, pool over C, spatial conv +
BatchNorm, apply), and is differentiable: the ``torch`` backend runs it under autograd, so that
eager mode and ``torch.compile`` see plain PyTorch. :func:`backward` is the hand-written
backward that the kernel pipelines implement, pass for pass (checked against autograd of
:func:`forward` by ``gradcheck`` in float64).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import passes as passes_torch
from . import small_math as gate_math
from ..types import (BatchNormState, ChannelSaved, GateConfig, GateGrads, GateParams,
                        SpatialSaved)


def forward(x: Tensor, residual: Optional[Tensor], params: GateParams, cfg: GateConfig,
            bn: BatchNormState, keep: bool = True
            ) -> Tuple[Tensor, Optional[ChannelSaved], Optional[SpatialSaved]]:
    """y = x * ca * sa (relu(... + residual) with a residual), in x's dtype and memory format;
    with batch statistics the BatchNorm's running statistics are updated. With ``keep``, also
    what :func:`backward` needs (else None: the path that autograd differentiates computes
    nothing more than y)."""
    channel = spatial = None
    grad = torch.is_grad_enabled() and (x.requires_grad or any(
        p is not None and p.requires_grad for p in params))
    # Arg-maxes only where something needs them: the saved state, or autograd in eager mode
    # (a max's gradient goes to its first arg-max, as in the kernels). Under torch.compile the
    # max is an amax, whose gradient inductor fuses into a few loops (a max with indices makes
    # a compiled CPU training step about 1.5x slower): exact ties then share the gradient
    # equally, as with torch.amax and timm's modules.
    # A TorchScript trace takes one form whatever the grad mode (torch.jit.trace checks its
    # graph by tracing again, and the grad mode may differ): the max without indices and no
    # in-place multiply.
    tracing = torch.jit.is_tracing()
    args = keep or (grad and not torch.compiler.is_compiling() and not tracing)
    x1 = passes_torch.in_acc_dtype(x)
    if params.w1 is not None:
        avg, mx, pstar = passes_torch.pool_hw(x, cfg.use_max, args,
                                              keepdim=params.w1.dim() == 4)  # 1x1 convs
        k = cfg.use_avg + cfg.use_max
        pooled = torch.cat([avg, mx]) if k == 2 else (avg if cfg.use_avg else mx)
        z, hidden = gate_math.mlp_forward(pooled, k, *params[:4], cfg.act, keep)
        ca = gate_math.gate(z, cfg.gate)
        x1 = passes_torch.scale(x1, ca, None)
        if keep:
            n, c = x.shape[0], x.shape[1]
            channel = ChannelSaved(ca.view(n, c), pooled.view(k, n, c), hidden.view(k, n, -1),
                                   _int32(pstar if pstar is None else pstar.view(n, c)))
    sa = None
    if params.conv_w is not None:
        p, cstar = passes_torch.channel_pool(x1, None, cfg.max_first, args)
        sa, u, mean, rstd = gate_math.spatial_forward(p, params.conv_w, params.bn_w,
                                                      params.bn_b, bn)
        if keep:
            xhat, stats = gate_math.batch_norm_stats(u, mean, rstd, bn)
            spatial = SpatialSaved(sa, p.flatten(2), _int32(cstar.flatten(1)), xhat, stats)
    # Without autograd, the temporaries x1 (x * ca, or x cast up) and y take the next results.
    own = not grad and not keep and x1 is not x and not tracing
    y = passes_torch.scale(x1, None, sa, inplace=own) if sa is not None else x1
    return passes_torch.epilogue(y, residual, x, inplace=own), channel, spatial


def _int32(index: Optional[Tensor]) -> Optional[Tensor]:
    """Arg-max indices as the kernels keep them (int32)."""
    return None if index is None else index.to(torch.int32)


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
