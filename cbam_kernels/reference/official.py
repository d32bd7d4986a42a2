"""The official CBAM (the authors' repository, Jongchan/attention-module, ``MODELS/cbam.py``):
``Linear`` MLP with bias, hidden width ``C // r``, spatial map ``[max, mean]``, BatchNorm
``eps=1e-5, momentum=0.01``; same module structure and attribute names, so its ``state_dict``
loads that repository's checkpoints."""

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_channels, check_kernel_size, reduced_width

#: Pool types understood by :class:`OfficialChannelGate`.
POOL_TYPES: Tuple[str, ...] = ("avg", "max", "lp", "lse")


class Flatten(nn.Module):
    """``(N, C, ...) -> (N, C * ...)``, as the first element of the official channel MLP.

    No parameters (it only occupies index 0 of ``ChannelGate.mlp``, which is why the Linear
    layers' keys are ``mlp.1.*`` and ``mlp.3.*``).
    """

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)


def logsumexp_2d(x: Tensor) -> Tensor:
    """Numerically stable log-sum-exp over the spatial dims: ``(N, C, H, W) -> (N, C, 1)``.

    ``s + log(sum(exp(x - s)))`` with ``s`` the per-channel maximum, as in the official repo.
    """
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    peak = flat.amax(dim=2, keepdim=True)
    return peak + (flat - peak).exp().sum(dim=2, keepdim=True).log()


class BasicConv(nn.Module):
    """Conv2d followed by optional BatchNorm and ReLU (the official repo's ``BasicConv``).

    BatchNorm uses ``eps=1e-5, momentum=0.01, affine=True``. Disabled parts are stored as
    ``None`` and contribute no keys.

    state_dict keys: ``conv.weight`` (+ ``conv.bias`` if ``bias``), and with ``bn``:
    ``bn.{weight,bias,running_mean,running_var,num_batches_tracked}``.
    """

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, relu: bool = True,
                 bn: bool = True, bias: bool = False):
        super().__init__()
        self.out_channels = out_planes
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=kernel_size, stride=stride,
                              padding=padding, dilation=dilation, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class ChannelPool(nn.Module):
    """Official spatial-gate compression: ``cat([max over C, mean over C], dim=1)``.

    ``(N, C, H, W) -> (N, 2, H, W)``; channel 0 is the MAX map, channel 1 the MEAN map (the
    opposite of timm's order). No parameters.
    """

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)), dim=1)


class OfficialChannelGate(nn.Module):
    """Official CBAM channel attention: ``x * sigmoid(sum_p MLP(pool_p(x)))``.

    The shared MLP is ``Flatten -> Linear(C, C // r) -> ReLU -> Linear(C // r, C)`` (both Linear
    layers with bias). Its output, second bias included, is summed over the pool types, so with
    two pool types ``mlp.3.bias`` enters the logit twice. Pool types (over the whole H x W map):

    * ``"avg"``: mean; ``"max"``: maximum;
    * ``"lp"``: power-2 LP pool, ``sqrt(sum x^2)`` (``F.lp_pool2d`` with norm 2);
    * ``"lse"``: log-sum-exp, computed stably (:func:`logsumexp_2d`).

    state_dict keys: ``mlp.1.weight`` (R, C), ``mlp.1.bias`` (R,), ``mlp.3.weight`` (C, R),
    ``mlp.3.bias`` (C,), with ``R = C // reduction_ratio``.
    """

    def __init__(self, gate_channels: int, reduction_ratio: int = 16,
                 pool_types: Sequence[str] = ("avg", "max")):
        super().__init__()
        check_channels("gate_channels", gate_channels)
        hidden = reduced_width(gate_channels, reduction_ratio, "reduction_ratio")
        if isinstance(pool_types, str):
            pool_types = (pool_types,)
        pool_types = tuple(pool_types)
        if not pool_types:
            raise ValueError(f"pool_types must name at least one of {POOL_TYPES}")
        for p in pool_types:
            if p not in POOL_TYPES:
                raise ValueError(f"unknown pool type {p!r}; expected one of {POOL_TYPES}")
        self.gate_channels = gate_channels
        self.reduction_ratio = reduction_ratio
        self.pool_types = pool_types
        self.mlp = nn.Sequential(
            Flatten(),
            nn.Linear(gate_channels, hidden),
            nn.ReLU(),
            nn.Linear(hidden, gate_channels),
        )

    @staticmethod
    def pool(x: Tensor, pool_type: str) -> Tensor:
        """One global pool of ``x`` (N, C, H, W), shaped as the official code leaves it."""
        hw = (x.shape[2], x.shape[3])
        if pool_type == "avg":
            return F.avg_pool2d(x, hw, stride=hw)
        if pool_type == "max":
            return F.max_pool2d(x, hw, stride=hw)
        if pool_type == "lp":
            return F.lp_pool2d(x, 2, hw, stride=hw)
        if pool_type == "lse":
            return logsumexp_2d(x)
        raise ValueError(f"unknown pool type {pool_type!r}; expected one of {POOL_TYPES}")

    def logits(self, x: Tensor) -> Tensor:
        """Pre-sigmoid channel logits, (N, C)."""
        total: Optional[Tensor] = None
        for p in self.pool_types:
            raw = self.mlp(self.pool(x, p))
            total = raw if total is None else total + raw
        assert total is not None
        return total

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.sigmoid(self.logits(x))
        return x * scale[:, :, None, None]

    def extra_repr(self) -> str:
        return (f"gate_channels={self.gate_channels}, reduction_ratio={self.reduction_ratio}, "
                f"pool_types={self.pool_types}")


class OfficialSpatialGate(nn.Module):
    """Official CBAM spatial attention: ``x * sigmoid(BN(conv_kxk([max_C x, mean_C x])))``.

    ``compress`` is a :class:`ChannelPool` (max first); ``spatial`` is a :class:`BasicConv`
    ``Conv2d(2, 1, k, padding=(k - 1) // 2, bias=False)`` + ``BatchNorm2d(1, eps=1e-5,
    momentum=0.01)`` without ReLU. (The original hard-codes ``kernel_size = 7``.)

    state_dict keys: ``spatial.conv.weight`` (1, 2, k, k),
    ``spatial.bn.{weight,bias,running_mean,running_var,num_batches_tracked}``.
    """

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        check_kernel_size(kernel_size)
        self.kernel_size = kernel_size
        self.compress = ChannelPool()
        self.spatial = BasicConv(2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2,
                                 relu=False)

    def logits(self, x: Tensor) -> Tensor:
        """Pre-sigmoid spatial logits, (N, 1, H, W)."""
        return self.spatial(self.compress(x))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.logits(x))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


class OfficialCBAM(nn.Module):
    """Official CBAM block: ``SpatialGate(ChannelGate(x))`` (spatial part optional).

    Attributes ``ChannelGate`` (:class:`OfficialChannelGate`), ``no_spatial`` and, unless
    ``no_spatial``, ``SpatialGate`` (:class:`OfficialSpatialGate`).

    state_dict keys: ``ChannelGate.mlp.1.{weight,bias}``, ``ChannelGate.mlp.3.{weight,bias}``,
    and unless ``no_spatial``: ``SpatialGate.spatial.conv.weight``,
    ``SpatialGate.spatial.bn.{weight,bias,running_mean,running_var,num_batches_tracked}``.
    """

    def __init__(self, gate_channels: int, reduction_ratio: int = 16,
                 pool_types: Sequence[str] = ("avg", "max"), no_spatial: bool = False,
                 kernel_size: int = 7):
        super().__init__()
        self.ChannelGate = OfficialChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = bool(no_spatial)
        if not self.no_spatial:
            self.SpatialGate = OfficialSpatialGate(kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        out = self.ChannelGate(x)
        if not self.no_spatial:
            out = self.SpatialGate(out)
        return out

    def extra_repr(self) -> str:
        return f"no_spatial={self.no_spatial}"
