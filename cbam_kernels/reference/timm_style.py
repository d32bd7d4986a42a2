"""timm's CBAM (``timm/layers/cbam.py``, ``CbamModule``): bias-free 1x1-conv MLP, hidden width
``max(1, int(C * rd_ratio + 0.5))``, spatial map ``[mean, max]``, BatchNorm ``eps=1e-5,
momentum=0.1``; ``state_dict`` key-for-key identical to timm's."""

from typing import Optional

import torch
from torch import Tensor, nn

from .checks import check_channels, check_kernel_size


def timm_rd_channels(channels: int, rd_ratio: float = 1.0 / 16,
                     rd_channels: Optional[int] = None) -> int:
    """timm's hidden width for ``CbamModule`` / ``ChannelAttn``.

    timm uses ``rd_channels`` when it is truthy, else
    ``make_divisible(channels * rd_ratio, divisor=1, round_limit=0.)``, which reduces to
    ``max(1, int(channels * rd_ratio + 0.5))``: round half UP (not Python's banker's ``round``;
    e.g. 40 / 16 = 2.5 -> 3) with a floor of 1 (never 0).
    """
    if rd_channels:
        if not isinstance(rd_channels, int) or rd_channels < 1:
            raise ValueError(f"rd_channels must be a positive int or None, got {rd_channels!r}")
        return rd_channels
    if not rd_ratio > 0:
        raise ValueError(f"rd_ratio must be > 0, got {rd_ratio!r}")
    return max(1, int(channels * rd_ratio + 0.5))


class TimmConvBn(nn.Module):
    """timm's ``ConvNormAct(2, 1, k, apply_act=False)``: conv then BatchNorm, no activation.

    ``conv = Conv2d(in, out, k, padding=(k - 1) // 2, bias=False)`` (``== k // 2`` for the odd
    kernels accepted here), ``bn = BatchNorm2d(out)`` with PyTorch defaults
    ``eps=1e-5, momentum=0.1``.

    state_dict keys: ``conv.weight``, ``bn.{weight,bias,running_mean,running_var,
    num_batches_tracked}``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size,
                              padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class TimmChannelAttn(nn.Module):
    """timm ``ChannelAttn``: ``x * sigmoid(fc2(relu(fc1(avg))) + fc2(relu(fc1(max))))``.

    ``fc1 = Conv2d(C, R, 1, bias=False)``, ``fc2 = Conv2d(R, C, 1, bias=False)``, R from
    :func:`timm_rd_channels`.

    state_dict keys: ``fc1.weight`` (R, C, 1, 1), ``fc2.weight`` (C, R, 1, 1).
    """

    def __init__(self, channels: int, rd_ratio: float = 1.0 / 16,
                 rd_channels: Optional[int] = None):
        super().__init__()
        check_channels("channels", channels)
        hidden = timm_rd_channels(channels, rd_ratio, rd_channels)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.gate = nn.Sigmoid()

    def logits(self, x: Tensor) -> Tensor:
        """Pre-sigmoid channel logits, (N, C, 1, 1)."""
        avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        mx = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return avg + mx

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.logits(x))


class TimmSpatialAttn(nn.Module):
    """timm ``SpatialAttn``: ``x * sigmoid(BN(conv([mean_C x, max_C x])))`` (MEAN first).

    state_dict keys: ``conv.conv.weight`` (1, 2, k, k),
    ``conv.bn.{weight,bias,running_mean,running_var,num_batches_tracked}``.
    """

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        check_kernel_size(kernel_size)
        self.kernel_size = kernel_size
        self.conv = TimmConvBn(2, 1, kernel_size)
        self.gate = nn.Sigmoid()

    def logits(self, x: Tensor) -> Tensor:
        """Pre-sigmoid spatial logits, (N, 1, H, W)."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return self.conv(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.logits(x))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


class TimmCBAM(nn.Module):
    """timm ``CbamModule`` (default ReLU / sigmoid / bias-free MLP): ``spatial(channel(x))``.

    Hidden width ``R = rd_channels or max(1, int(channels * rd_ratio + 0.5))``
    (see :func:`timm_rd_channels`).

    state_dict keys: ``channel.fc1.weight``, ``channel.fc2.weight``,
    ``spatial.conv.conv.weight``,
    ``spatial.conv.bn.{weight,bias,running_mean,running_var,num_batches_tracked}``.
    """

    def __init__(self, channels: int, rd_ratio: float = 1.0 / 16,
                 rd_channels: Optional[int] = None, spatial_kernel_size: int = 7):
        super().__init__()
        self.channel = TimmChannelAttn(channels, rd_ratio=rd_ratio, rd_channels=rd_channels)
        self.spatial = TimmSpatialAttn(spatial_kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial(self.channel(x))
