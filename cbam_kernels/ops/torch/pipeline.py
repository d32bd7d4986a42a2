"""The fused gate in plain PyTorch: the specification of the whole pipeline, on any device.

:func:`forward` composes the full-size passes of ``ops.torch.passes`` with the small math below
in the order every backend follows (pool over H*W, channel MLP, pool over C, spatial conv +
BatchNorm, apply), and is differentiable: the ``torch`` backend runs it under autograd, so that
eager mode and ``torch.compile`` see plain PyTorch. :func:`backward` is the hand-written
backward that the kernel pipelines implement, pass for pass (checked against autograd of
:func:`forward` by ``gradcheck`` in float64).

The small math (the channel MLP, the spatial conv + BatchNorm, forward and backward) sees only
pooled vectors (N, C) and pooled maps (N, 2, H, W), never the full activation. It is written out
by hand (rather than left to autograd) so that the fused op can save exactly what it needs and
run its backward as one opaque, ``torch.compile``-friendly step. All of it is in the
accumulation dtype of the pooled tensors (float32, or float64 for gradcheck); parameter
gradients come back in the parameters' own dtypes. The kernel backends implement it as small
kernels (``ops.triton.channel_mlp``, ``ops.triton.spatial``).
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import passes as passes_torch
from .passes import cast
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
        z, hidden = mlp_forward(pooled, k, *params[:4], cfg.act, keep)
        ca = gate(z, cfg.gate)
        x1 = passes_torch.scale(x1, ca, None)
        if keep:
            n, c = x.shape[0], x.shape[1]
            channel = ChannelSaved(ca.view(n, c), pooled.view(k, n, c), hidden.view(k, n, -1),
                                   _int32(pstar if pstar is None else pstar.view(n, c)))
    sa = None
    if params.conv_w is not None:
        p, cstar = passes_torch.channel_pool(x1, None, cfg.max_first, args)
        sa, u, mean, rstd = spatial_forward(p, params.conv_w, params.bn_w,
                                                      params.bn_b, bn)
        if keep:
            xhat, stats = batch_norm_stats(u, mean, rstd, bn)
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
        gp, (gconv, gbn_w, gbn_b) = spatial_backward(
            gsa, spatial, params.conv_w, params.bn_w, params.bn_b, bn, h, w)
        cstar = spatial.cstar
    ga = gm = pstar = None
    gw1 = gb1 = gw2 = gb2 = None
    if channel is not None:
        gca = passes_torch.grad_channel(gy, x, sa, gp, cstar, cfg.max_first)
        gz = gca * gate_grad_from_output(channel.ca, cfg.gate)
        gpooled, (gw1, gb1, gw2, gb2) = mlp_backward(
            gz, channel.pooled, channel.hidden, params.w1, params.b1, params.w2, params.b2,
            cfg.act)
        ga = gpooled[0] if cfg.use_avg else None
        gm = gpooled[-1] if cfg.use_max else None
        pstar = channel.pstar
    gx = passes_torch.grad_input(gy, x, ca, sa, gp, cstar, cfg.max_first, ga, gm, pstar)
    return GateGrads(gx, gres, GateParams(gw1, gb1, gw2, gb2, gconv, gbn_w, gbn_b))


# ----------------------------------------------------------------------------- small math

def activation(h: Tensor, act: str, inplace: bool = False) -> Tensor:
    """The MLP's hidden activation: 'relu' or 'silu' (in place with ``inplace``)."""
    if act == "relu":
        return h.relu_() if inplace else h.relu()
    return F.silu(h, inplace=inplace)


def activation_grad(h: Tensor, act: str) -> Tensor:
    """d activation(h) / dh."""
    if act == "relu":
        return (h > 0).to(h.dtype)
    s = torch.sigmoid(h)
    return s * (1 + h * (1 - s))


def gate(z: Tensor, kind: str) -> Tensor:
    """The gate function turning logits into attention weights: 'sigmoid' or 'hardsigmoid'."""
    return torch.sigmoid(z) if kind == "sigmoid" else F.hardsigmoid(z)


def gate_grad_from_output(g: Tensor, kind: str) -> Tensor:
    """d gate(z) / dz expressed through the gate's output g = gate(z)."""
    if kind == "sigmoid":
        return g * (1 - g)
    return ((g > 0) & (g < 1)).to(g.dtype) / 6


def mlp_forward(pooled: Tensor, k: int, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                b2: Optional[Tensor], act: str = "relu",
                keep: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """Shared MLP over the pooled vectors of ``k`` pool types.

    ``pooled`` holds the (N, C) vectors of the pool types, stacked: (K * N, C) for Linear
    weights (R, C) and (C, R), applied as matrix products; (K * N, C, 1, 1) for 1x1-conv
    kernels (R, C, 1, 1) and (C, R, 1, 1), applied as the convolutions they are (so autograd
    returns their gradients in the kernels' own layout, channels_last included, as DDP's
    gradient buckets expect). Returns the channel logits ``z = sum_k (W2 act(W1 v_k + b1) +
    b2)`` (N, C) or (N, C, 1, 1) -- the output bias counts once per pool type, as in the
    official CBAM -- and, with ``keep``, the hidden pre-activations (K * N, R[, 1, 1]) for
    :func:`mlp_backward` (else None: the activation runs in place).
    """
    hidden = _layer(pooled, w1, b1)
    out = _layer(activation(hidden, act, inplace=not keep), w2, b2)
    z = out.view(k, -1, *out.shape[1:]).sum(dim=0) if k > 1 else out
    return z, (hidden if keep else None)


def _layer(v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """One MLP layer: ``F.linear`` for a (O, I) weight, ``F.conv2d`` for a (O, I, 1, 1) one."""
    w = weight if weight.dtype == v.dtype else weight.to(v.dtype)
    return (F.linear if w.dim() == 2 else F.conv2d)(v, w, _cast(bias, v))


def matrix(weight: Tensor) -> Tensor:
    """An MLP weight as the (O, I) matrix (a 1x1-conv kernel's view)."""
    return weight if weight.dim() == 2 else weight.view(weight.shape[0], weight.shape[1])


def mlp_backward(gz: Tensor, pooled: Tensor, hidden: Tensor, w1: Tensor, b1: Optional[Tensor],
                 w2: Tensor, b2: Optional[Tensor], act: str = "relu"
                 ) -> Tuple[Tensor, List[Optional[Tensor]]]:
    """Backward of :func:`mlp_forward` given dL/dz (N, C).

    Returns dL/dpooled (K, N, C) and the parameter gradients [gw1, gb1, gw2, gb2] (None for an
    absent bias).
    """
    k = pooled.shape[0]
    gw2 = torch.einsum("nc,knr->cr", gz, activation(hidden, act))
    gb2 = gz.sum(dim=0) * k if b2 is not None else None
    ghidden = (gz @ cast(matrix(w2), gz.dtype)).unsqueeze(0) * activation_grad(hidden, act)
    gw1 = torch.einsum("knr,knc->rc", ghidden, pooled)
    gb1 = ghidden.sum(dim=(0, 1)) if b1 is not None else None
    gpooled = ghidden @ cast(matrix(w1), gz.dtype)
    return gpooled, [_as_param(g, q) for g, q in zip([gw1, gb1, gw2, gb2], [w1, b1, w2, b2])]


def spatial_forward(p: Tensor, conv_w: Tensor, bn_w: Optional[Tensor], bn_b: Optional[Tensor],
                    bn: BatchNormState) -> Tuple[Tensor, Tensor, Optional[Tensor],
                                                 Optional[Tensor]]:
    """conv k x k (2 -> 1, 'same' padding, no bias) -> BatchNorm -> sigmoid.

    ``p`` is the pooled map (N, 2, H, W) in the conv weight's channel order. The BatchNorm is
    PyTorch's own: with ``bn.batch_stats`` (``torch.native_batch_norm``) it normalises with the
    batch mean and biased variance and, given ``bn.num_batches_tracked``, updates the running
    statistics exactly as ``nn.BatchNorm2d`` does; otherwise (``torch.batch_norm``, which
    exports to ONNX's BatchNormalization) it uses the running statistics and changes nothing.
    Returns the gate ``sa`` (N, H*W), the conv output ``u`` (N, H*W), and with batch statistics
    the batch mean and 1 / sqrt(var + eps) it used, each (1,) (None otherwise).
    """
    u = F.conv2d(p, cast(conv_w, p.dtype), padding=conv_w.shape[-1] // 2)
    update = bn.batch_stats and bn.num_batches_tracked is not None
    momentum = 0.0
    if update:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else (
            1.0 / float(bn.num_batches_tracked))
    running = (bn.running_mean, bn.running_var) if update or not bn.batch_stats else (None, None)
    mixed = running[0] is not None and running[0].dtype != u.dtype  # a float16 module's buffers
    stats = tuple(r.to(u.dtype) for r in running) if mixed else running
    if bn.batch_stats:
        v, mean, rstd = torch.native_batch_norm(u, _cast(bn_w, u), _cast(bn_b, u), *stats, True,
                                                momentum, bn.eps)
    else:  # aten::batch_norm, as nn.BatchNorm2d calls it: every ONNX exporter translates it
        v = torch.batch_norm(u, _cast(bn_w, u), _cast(bn_b, u), *stats, False, 0.0, bn.eps,
                             torch.backends.cudnn.enabled)
        mean = rstd = None
    if mixed and update:
        with torch.no_grad():
            for buffer, new in zip(running, stats):
                buffer.copy_(new)
    return torch.sigmoid(v).flatten(1), u.flatten(1), mean, rstd


def batch_norm_stats(u: Tensor, mean: Optional[Tensor], rstd: Optional[Tensor],
                     bn: BatchNormState) -> Tuple[Tensor, Tensor]:
    """What backward keeps of the BatchNorm of :func:`spatial_forward`: the normalised map
    ``xhat`` (N, H*W) and ``stats`` = [mean, biased variance, 1 / sqrt(var + eps)] it used."""
    if mean is None:
        mean = cast(bn.running_mean, u.dtype)
        var = cast(bn.running_var, u.dtype)
        rstd = torch.rsqrt(var + bn.eps)
    else:
        var = (u - mean).square().mean().view(1)
    return (u - mean) * rstd, torch.cat([mean, var, rstd])


@torch.no_grad()
def update_running_stats(bn: BatchNormState, mean: Tensor, var: Tensor, count: int) -> None:
    """Fold a batch's mean and biased variance (each (1,)) over ``count`` values into the
    running statistics, as ``nn.BatchNorm2d`` does in training: num_batches_tracked += 1, then
    r = f s + (1 - f) r with f = momentum (1 / num_batches_tracked when momentum is None) and
    the unbiased variance for running_var. Only in training (``bn.batch_stats`` with
    ``bn.num_batches_tracked`` given). No value is read back to the host."""
    if not bn.batch_stats or bn.num_batches_tracked is None:
        return
    bn.num_batches_tracked.add_(1)
    f = bn.momentum
    if f is None:
        f = 1.0 / bn.num_batches_tracked.to(mean.dtype)
    unbiased = var * (count / (count - 1))
    for running, stat in ((bn.running_mean, mean), (bn.running_var, unbiased)):
        running.copy_(f * stat + (1 - f) * running)


def spatial_backward(gsa: Tensor, saved: SpatialSaved, conv_w: Tensor, bn_w: Optional[Tensor],
                     bn_b: Optional[Tensor], bn: BatchNormState, height: int, width: int
                     ) -> Tuple[Tensor, List[Optional[Tensor]]]:
    """Backward of :func:`spatial_forward` given dL/dsa (N, H*W).

    Returns dL/dp (N, 2, H*W) and [gconv_w, gbn_w, gbn_b] (None for an absent affine term).
    With batch statistics the gradient flows through the batch mean and variance as in
    ``nn.BatchNorm2d``.
    """
    sa, xhat = saved.sa, saved.xhat
    gv = gsa * sa * (1 - sa)
    gbn_w = (gv * xhat).sum().view(1) if bn_w is not None else None
    gbn_b = gv.sum().view(1) if bn_b is not None else None
    gxhat = gv * cast(bn_w, gv.dtype) if bn_w is not None else gv
    rstd = saved.stats[2]
    if bn.batch_stats:
        gxhat = gxhat - gxhat.mean() - xhat * (gxhat * xhat).mean()
    n = gsa.shape[0]
    gu = (gxhat * rstd).view(n, 1, height, width)
    pad = conv_w.shape[-1] // 2
    w = cast(conv_w, gu.dtype)
    p = saved.p.view(n, 2, height, width)
    # Neither gradient through a conv backward kernel (cuDNN's may use atomics): gp is the
    # forward conv of gu with the flipped kernel; gconv[ch, i, j] sums p's (k x k)-patch
    # entries against gu over the batch and the pixels, one product of the unfolded patches
    # (N, 2 k k, H W) with gu: plain sums, the same on every device.
    gp = F.conv2d(gu, w.flip(2, 3).transpose(0, 1), padding=pad)
    k = conv_w.shape[-1]
    patches = F.unfold(p, k, padding=pad)
    gconv = torch.einsum("nkl,nl->k", patches, gu.flatten(1)).view(1, 2, k, k)
    return gp.flatten(2), [_as_param(g, q) for g, q in zip([gconv, gbn_w, gbn_b],
                                                           [conv_w, bn_w, bn_b])]


def _as_param(grad: Optional[Tensor], param: Optional[Tensor]) -> Optional[Tensor]:
    """A parameter's gradient in the parameter's shape, dtype and strides (DDP's gradient
    buckets expect the parameter's layout)."""
    if grad is None:
        return None
    grad = grad.view(param.shape)
    if grad.dtype == param.dtype and grad.stride() == param.stride():
        return grad
    return torch.empty_like(param).copy_(grad)


def _cast(t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    return None if t is None else cast(t, like.dtype)
