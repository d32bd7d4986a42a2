"""The fused gate on a kernel backend: full-size passes and small kernels, in order.

The passes (``ops.triton.passes`` or ``ops.cuda.passes``) leave their reductions unfinished and the
small kernels finish them: Triton's (``ops.triton.channel_mlp``, ``ops.triton.spatial``) on both
kernel backends where Triton serves the GPU, else, on the CUDA backend, PyTorch's
(``ops.torch.small_kernels``: several ATen launches each). With Triton's, a call launches
(kernels, nothing else):

==================  =====================================  =========================
gate                forward                                backward
==================  =====================================  =========================
SE, channel gate    pool, MLP, apply: 3                    reduce, MLP, input: 3
spatial gate        pool, conv, [BN], apply: 3 / 4         reduce, 2 small, input: 4
CBAM                5 (eval) / 6 (training)                6
==================  =====================================  =========================

with [BN] the training-mode BatchNorm kernel (it also updates the running statistics). The
parameter gradients ride in the grad-input launch (extra programs of its grid, on both
backends). The ResNet epilogue adds no launch: apply takes the residual, and the first backward
reduction masks gy by the ReLU.
"""

import contextlib
from types import ModuleType
from typing import Any, Callable, ContextManager, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .types import (BatchNormState, ChannelGrads, ChannelSaved, GateConfig, GateGrads,
                    GateParams, ParamGrads, SpatialGrads, SpatialSaved, merged_hw_stride)


class SmallKernels(NamedTuple):
    """The small kernels of a :class:`KernelPipeline`, with the arguments and results of
    ``ops.triton.channel_mlp`` and ``ops.triton.spatial`` (``ops.torch.small_kernels`` has the
    same four functions)."""

    channel_mlp: Callable[..., ChannelSaved]
    mlp_backward: Callable[..., ChannelGrads]
    spatial_gate: Callable[..., SpatialSaved]
    spatial_backward: Callable[..., SpatialGrads]


def small_kernels(kind: str) -> Any:
    """The small kernels ``kind``: 'triton', a :class:`SmallKernels` of the functions of
    ``ops.triton.channel_mlp`` and ``ops.triton.spatial`` (imports Triton), or 'torch', the
    module ``ops.torch.small_kernels``."""
    if kind == "triton":
        from .triton import channel_mlp, spatial
        return SmallKernels(channel_mlp.channel_mlp, channel_mlp.mlp_backward,
                            spatial.spatial_gate, spatial.spatial_backward)
    if kind == "torch":
        from .torch import small_kernels as torch_small
        return torch_small
    raise ValueError(f"small kernels {kind!r}: 'triton' or 'torch'")


def _on_device(x: Tensor) -> ContextManager:
    """Make x's GPU the current one for the launches (Triton launches on the current device)."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _mergeable(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t``, or one contiguous copy of it when its H and W dims do not merge (every pass
    then reads the copy, instead of each pass copying ``t`` again)."""
    if t is None or merged_hw_stride(t.shape, t.stride()) is not None:
        return t
    return t.contiguous()


def _empty_like_or_none(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else torch.empty_like(t)


def param_grads_work(params: GateParams, act: str,
                     channel: Optional[Tuple[ChannelSaved, ChannelGrads]],
                     spatial: Optional[SpatialGrads]) -> ParamGrads:
    """Allocate the parameter gradients (each like its parameter, strides included) and collect
    what they are computed from: the channel gate's saved tensors and gradients and the spatial
    gate's partials (either may be None: that gate is absent)."""
    gw1, gb1, gw2, gb2 = (_empty_like_or_none(t) if channel is not None else None for t in params[:4])
    gconv, gbn_w, gbn_b = (_empty_like_or_none(t) if spatial is not None else None for t in params[4:])
    grads = GateParams(gw1, gb1, gw2, gb2, gconv, gbn_w, gbn_b)
    gz = ghidden = pooled = hidden = wpart = bn_part = None
    if channel is not None:
        saved, channel_grads = channel
        gz, ghidden, pooled, hidden = (channel_grads.gz, channel_grads.ghidden, saved.pooled,
                                       saved.hidden)
    if spatial is not None:
        wpart, bn_part = spatial.wpart, spatial.bn_part
    return ParamGrads(grads, gz, ghidden, pooled, hidden, act, wpart, bn_part)


def _laid_out_like(t: Optional[Tensor], like: Tensor, copy: Tensor) -> Optional[Tensor]:
    """A full-size result ``t``, computed from ``copy`` (``like`` or its contiguous copy), laid
    out like ``torch.empty_like(like)`` as every result of the op is."""
    if t is None or copy is like:
        return t
    out = torch.empty_like(like)
    out.copy_(t)
    return out


class KernelPipeline:
    """:func:`forward` and :func:`backward` of ``ops.torch.pipeline`` on the passes of one kernel
    backend (``passes``: ``ops.triton.passes`` or ``ops.cuda.passes``) and the small kernels
    ``small``: anything with the four functions of :class:`SmallKernels`, as
    :func:`small_kernels` gives them (default: ``small_kernels('triton')``)."""

    def __init__(self, passes: ModuleType, small: Optional[Any] = None):
        self.passes = passes
        self.small = small_kernels("triton") if small is None else small

    def forward(self, x: Tensor, residual: Optional[Tensor], params: GateParams,
                cfg: GateConfig, bn: BatchNormState
                ) -> Tuple[Tensor, Optional[ChannelSaved], Optional[SpatialSaved]]:
        """As ``ops.torch.pipeline.forward``."""
        _, _, h, w = x.shape
        channel = spatial = None
        given, x, residual = x, _mergeable(x), _mergeable(residual)
        with _on_device(x):
            if params.w1 is not None:
                channel = self.small.channel_mlp(self.passes.pool_hw(x, cfg.use_max), params.w1,
                                                 params.b1, params.w2, params.b2, cfg.use_avg,
                                                 cfg.use_max, cfg.act, cfg.gate)
            ca = channel.ca if channel is not None else None
            if params.conv_w is not None:
                spatial = self.small.spatial_gate(self.passes.channel_pool(x, ca), params.conv_w,
                                                  params.bn_w, params.bn_b, bn, cfg.max_first, h,
                                                  w)
            sa = spatial.sa.view(-1, h, w) if spatial is not None else None
            y = self.passes.apply_gates(x, ca, sa, residual)
        return _laid_out_like(y, given, x), channel, spatial

    def backward(self, gy: Tensor, x: Tensor, out: Optional[Tensor], params: GateParams,
                 cfg: GateConfig, bn: BatchNormState, channel: Optional[ChannelSaved],
                 spatial: Optional[SpatialSaved]) -> GateGrads:
        """As ``ops.torch.pipeline.backward``."""
        n, _, h, w = x.shape
        given, x, gy, out = x, _mergeable(x), _mergeable(gy), _mergeable(out)
        ca = channel.ca if channel is not None else None
        sa = spatial.sa.view(n, h, w) if spatial is not None else None
        gres = gp = cstar = spatial_grads = channel_grads = ga = gm = pstar = None
        with _on_device(x):
            if spatial is not None:
                part, gres = self.passes.grad_spatial(gy, x, ca, out)
                gy, out = (gres, None) if gres is not None else (gy, out)
                spatial_grads = self.small.spatial_backward(part, spatial, params.conv_w,
                                                            params.bn_w, bn, h, w)
                gp, cstar = spatial_grads.gp.view(n, 2, h, w), spatial.cstar.view(n, h, w)
            if channel is not None:
                part, masked = self.passes.grad_channel(gy, x, sa, gp, cstar, cfg.max_first, out)
                gy, gres = (masked, masked) if masked is not None else (gy, gres)
                channel_grads = self.small.mlp_backward(part, channel, params.w1, params.w2,
                                                        cfg.use_avg, cfg.use_max, cfg.act,
                                                        cfg.gate)
                ga, gm, pstar = channel_grads.ga, channel_grads.gm, channel.pstar
            work = param_grads_work(
                params, cfg.act, None if channel is None else (channel, channel_grads),
                spatial_grads)
            gx = self.passes.grad_input(gy, x, ca, sa, gp, cstar, cfg.max_first, ga, gm, pstar,
                                        tail=work)
        return GateGrads(_laid_out_like(gx, given, x), _laid_out_like(gres, given, x),
                         work.grads)
