"""The small-tensor half of a fused gate: the channel MLP and the spatial conv + BatchNorm.

These functions see only pooled vectors (N, C) and pooled maps (N, 2, H, W), never the full
activation, so they are plain PyTorch on every backend. Forward and backward are written out by
hand (rather than left to autograd) so that the fused op can save exactly what they need and run
its backward as one opaque, ``torch.compile``-friendly step. All math is in the accumulation
dtype of the pooled tensors (float32, or float64 for gradcheck); parameter gradients come back in
the parameters' own dtypes.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


ACTIVATIONS = ("relu", "silu")
GATES = ("sigmoid", "hardsigmoid")


def activation(h: Tensor, act: str) -> Tensor:
    """The MLP's hidden activation: 'relu' or 'silu'."""
    return h.relu() if act == "relu" else F.silu(h)


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


def mlp_forward(pooled: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                b2: Optional[Tensor], act: str = "relu") -> Tuple[Tensor, Tensor]:
    """Shared MLP over stacked pooled vectors.

    ``pooled`` is (K, N, C): one (N, C) matrix per pool type. Returns the channel logits
    ``z = sum_k (W2 act(W1 v_k + b1) + b2)`` (N, C) -- the output bias counts once per pool type,
    as in the official CBAM -- and the hidden pre-activations (K, N, R) for
    :func:`mlp_backward`.
    """
    hidden = F.linear(pooled, w1.to(pooled.dtype), _cast(b1, pooled))
    out = F.linear(activation(hidden, act), w2.to(pooled.dtype), _cast(b2, pooled))
    return out.sum(dim=0), hidden


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
    ghidden = (gz @ w2.to(gz.dtype)).unsqueeze(0) * activation_grad(hidden, act)
    gw1 = torch.einsum("knr,knc->rc", ghidden, pooled)
    gb1 = ghidden.sum(dim=(0, 1)) if b1 is not None else None
    gpooled = ghidden @ w1.to(gz.dtype)
    grads = [gw1, gb1, gw2, gb2]
    params = [w1, b1, w2, b2]
    return gpooled, [None if g is None else g.to(p.dtype) for g, p in zip(grads, params)]


def spatial_forward(p: Tensor, conv_w: Tensor, bn_w: Optional[Tensor], bn_b: Optional[Tensor],
                    bn_mean: Optional[Tensor], bn_var: Optional[Tensor], eps: float,
                    batch_stats: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """conv k x k (2 -> 1, 'same' padding, no bias) -> BatchNorm -> sigmoid.

    ``p`` is the pooled map (N, 2, H, W) in the conv weight's channel order. With
    ``batch_stats`` the BatchNorm normalises with the batch mean and biased variance (training
    mode); otherwise with ``bn_mean``/``bn_var``. Returns the gate ``sa`` (N, H, W), the
    normalised map ``xhat`` (N, H, W), and the mean and variance used, each of shape (1,).
    """
    u = F.conv2d(p, conv_w.to(p.dtype), padding=conv_w.shape[-1] // 2).squeeze(1)
    if batch_stats:
        var, mean = torch.var_mean(u, correction=0)
        mean, var = mean.view(1), var.view(1)
    else:
        mean, var = bn_mean.to(u.dtype), bn_var.to(u.dtype)
    xhat = (u - mean) * torch.rsqrt(var + eps)
    v = xhat
    if bn_w is not None:
        v = v * bn_w.to(u.dtype)
    if bn_b is not None:
        v = v + bn_b.to(u.dtype)
    return torch.sigmoid(v), xhat, mean, var


def spatial_backward(gsa: Tensor, sa: Tensor, p: Tensor, xhat: Tensor, var: Tensor, eps: float,
                     conv_w: Tensor, bn_w: Optional[Tensor], bn_b: Optional[Tensor],
                     batch_stats: bool) -> Tuple[Tensor, List[Optional[Tensor]]]:
    """Backward of :func:`spatial_forward` given dL/dsa (N, H, W).

    Returns dL/dp (N, 2, H, W) and [gconv_w, gbn_w, gbn_b] (None for an absent affine term).
    With batch statistics the gradient flows through the batch mean and variance as in
    ``nn.BatchNorm2d``.
    """
    gv = gsa * sa * (1 - sa)
    gbn_w = (gv * xhat).sum().view(1) if bn_w is not None else None
    gbn_b = gv.sum().view(1) if bn_b is not None else None
    gxhat = gv * bn_w.to(gv.dtype) if bn_w is not None else gv
    rstd = torch.rsqrt(var + eps)
    if batch_stats:
        gxhat = gxhat - gxhat.mean() - xhat * (gxhat * xhat).mean()
    gu = (gxhat * rstd).unsqueeze(1)
    pad = conv_w.shape[-1] // 2
    w = conv_w.to(gu.dtype)
    # Both conv gradients as forward convolutions, which are deterministic (cuDNN's backward
    # kernels may use atomics): gp correlates gu with the flipped kernel; gconv correlates each
    # channel of p with gu, the batch acting as the summed channel axis.
    gp = F.conv2d(gu, w.flip(2, 3).transpose(0, 1), padding=pad)
    gconv = F.conv2d(p.transpose(0, 1), gu.transpose(0, 1), padding=pad).transpose(0, 1)
    grads = [gconv, gbn_w, gbn_b]
    params = [conv_w, bn_w, bn_b]
    return gp, [None if g is None else g.to(q.dtype) for g, q in zip(grads, params)]


def _cast(t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    return None if t is None else t.to(like.dtype)
