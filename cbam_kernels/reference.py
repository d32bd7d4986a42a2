"""Pure-PyTorch reference modules: the oracle for the fused kernels and the eager baseline.

Everything here is plain eager PyTorch with no custom ops, written to reproduce the public
parameterisations of CBAM and Squeeze-and-Excitation (see ``docs/design.md``, "Parameterisations"):

* :class:`OfficialCBAM` follows the authors' repository (Jongchan/attention-module,
  ``MODELS/cbam.py``): ``Linear`` MLP with bias, hidden width ``C // r``, spatial map
  concatenated as ``[max, mean]``, BatchNorm ``eps=1e-5, momentum=0.01``. Module structure and
  attribute names match, so its ``state_dict`` loads checkpoints from that repository.
* :class:`TimmCBAM` follows timm's ``CbamModule`` (``timm/layers/cbam.py``): bias-free 1x1-conv
  MLP, hidden width ``max(1, int(C * rd_ratio + 0.5))``, spatial map ``[mean, max]``, BatchNorm
  ``eps=1e-5, momentum=0.1``. Its ``state_dict`` is key-for-key identical to timm's.
* :class:`SEModule` follows timm's ``SEModule`` / torchvision's ``SqueezeExcitation`` (1x1 convs
  ``fc1``/``fc2``); :class:`SEBlock` is the classic Hu et al. block with bias-free ``Linear``
  layers.

All arithmetic happens in the input dtype, exactly as the original modules do (parameters must be
in that dtype too, as usual for eager modules). That includes a known property of eager PyTorch:
in float16 the global average pool is a reduction over ``H * W`` values whose sum can exceed the
float16 range (pytorch/pytorch#43992), so fp16 results of this oracle may be ``inf``/``nan``
where a kernel that accumulates in float32 is finite. Compare fused kernels against this module
run in float32/float64 when that matters.
"""

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules.mlp_layers import add_layers, get_layer, layer_paths

__all__ = [
    "Flatten",
    "BasicConv",
    "ChannelPool",
    "logsumexp_2d",
    "OfficialChannelGate",
    "OfficialSpatialGate",
    "OfficialCBAM",
    "timm_rd_channels",
    "TimmConvBn",
    "TimmChannelAttn",
    "TimmSpatialAttn",
    "TimmCBAM",
    "SEModule",
    "SEBlock",
    "PlainChannelGate",
    "POOL_TYPES",
]

#: Pool types understood by :class:`OfficialChannelGate`.
POOL_TYPES: Tuple[str, ...] = ("avg", "max", "lp", "lse")


def _check_channels(name: str, channels: int) -> None:
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ValueError(f"{name} must be a positive int, got {channels!r}")


def _check_kernel_size(kernel_size: int) -> None:
    # An even kernel with symmetric padding (k - 1) // 2 (both originals) shrinks the map by one
    # pixel, and the gate then no longer broadcasts against x; reject it up front.
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"spatial kernel_size must be a positive odd int (the gate must keep the H x W "
            f"size), got {kernel_size!r}")


def _reduced_width(channels: int, reduction: int, what: str) -> int:
    """``channels // reduction`` with clear errors (the official / Hu et al. rule)."""
    if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction < 1:
        raise ValueError(f"{what} must be a positive int, got {reduction!r}")
    hidden = channels // reduction
    if hidden == 0:
        raise ValueError(
            f"hidden width channels // {what} = {channels} // {reduction} = 0; use at most "
            f"{channels} for {what} or more channels")
    return hidden


# ---------------------------------------------------------------------------------------------
# Official CBAM (Jongchan/attention-module)
# ---------------------------------------------------------------------------------------------


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
        _check_channels("gate_channels", gate_channels)
        hidden = _reduced_width(gate_channels, reduction_ratio, "reduction_ratio")
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
        _check_kernel_size(kernel_size)
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


# ---------------------------------------------------------------------------------------------
# timm CbamModule
# ---------------------------------------------------------------------------------------------


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
        _check_channels("channels", channels)
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
        _check_kernel_size(kernel_size)
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


# ---------------------------------------------------------------------------------------------
# Squeeze-and-Excitation
# ---------------------------------------------------------------------------------------------


class SEModule(nn.Module):
    """SE with 1x1 convs (timm ``SEModule`` / torchvision ``SqueezeExcitation`` layout).

    ``x * sigmoid(fc2(relu(fc1(mean_HW x))))`` with ``fc1 = Conv2d(C, R, 1, bias=bias)``,
    ``fc2 = Conv2d(R, C, 1, bias=bias)``, ``R = hidden_channels or C // reduction``.
    (timm's own default width differs: ``make_divisible(C / 16, 8)``; pass the width explicitly
    to compare.)

    state_dict keys: ``fc1.weight`` (R, C, 1, 1), ``fc2.weight`` (C, R, 1, 1), and with
    ``bias``: ``fc1.bias`` (R,), ``fc2.bias`` (C,).
    """

    def __init__(self, channels: int, reduction: int = 16, bias: bool = True,
                 hidden_channels: Optional[int] = None):
        super().__init__()
        _check_channels("channels", channels)
        if hidden_channels is not None:
            if (not isinstance(hidden_channels, int) or isinstance(hidden_channels, bool)
                    or hidden_channels < 1):
                raise ValueError(
                    f"hidden_channels must be a positive int or None, got {hidden_channels!r}")
            hidden = hidden_channels
        else:
            hidden = _reduced_width(channels, reduction, "reduction")
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=bias)
        self.gate = nn.Sigmoid()

    def logits(self, x: Tensor) -> Tensor:
        """Pre-sigmoid channel logits, (N, C, 1, 1)."""
        return self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.logits(x))


class SEBlock(nn.Module):
    """Classic Squeeze-and-Excitation block (Hu et al.) with bias-free Linear layers.

    ``avg_pool = AdaptiveAvgPool2d(1)``; ``fc = Sequential(Linear(C, C // r, bias=False),
    ReLU(inplace=True), Linear(C // r, C, bias=False), Sigmoid())``; ``y = x * fc(avg_pool(x))``.

    state_dict keys: ``fc.0.weight`` (C // r, C), ``fc.2.weight`` (C, C // r).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        _check_channels("channels", channels)
        hidden = _reduced_width(channels, reduction, "reduction")
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[0], x.shape[1]
        scale = self.fc(self.avg_pool(x).reshape(n, c))
        return x * scale.reshape(n, c, 1, 1)


# ---------------------------------------------------------------------------------------------
# Any layout
# ---------------------------------------------------------------------------------------------

#: The hidden activations and gates of :class:`PlainChannelGate`, by name.
ACTIVATIONS = {"relu": F.relu, "silu": F.silu}
GATES = {"sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}


class PlainChannelGate(nn.Module):
    """Channel attention with its two MLP layers under any names, in eager PyTorch: the twin of
    :class:`cbam_kernels.ChannelGate` and :class:`cbam_kernels.SE` in every configuration (what
    :func:`cbam_kernels.revert` gives for one that :func:`cbam_kernels.convert` did not make).

    ``x * gate(sum_p second(act(first(pool_p(x)))))`` over the global pools ``pool_types``
    ("avg", "max"), with ``act`` "relu" or "silu" and ``gate`` "sigmoid" or "hardsigmoid".

    state_dict keys: ``{layers[0]}.weight`` (R, C) for ``linear`` layers, else (R, C, 1, 1),
    ``{layers[1]}.weight``, and with ``bias`` the two biases (``layers``: see
    :mod:`cbam_kernels.mlp_layers`).
    """

    def __init__(self, channels: int, hidden_channels: int,
                 pool_types: Sequence[str] = ("avg",), bias: bool = True, act: str = "relu",
                 gate: str = "sigmoid", layers: Sequence[str] = ("fc1", "fc2"),
                 linear: bool = False):
        super().__init__()
        _check_channels("channels", channels)
        _check_channels("hidden_channels", hidden_channels)
        if (act not in ACTIVATIONS or gate not in GATES or not pool_types
                or not set(pool_types) <= {"avg", "max"}):
            raise ValueError(f"act must be one of {tuple(ACTIVATIONS)}, gate one of "
                             f"{tuple(GATES)} and pool_types a non-empty subset of ('avg', "
                             f"'max'), got {act!r}, {gate!r}, {pool_types!r}")
        self.pool_types, self.act, self.gate, self.linear = tuple(pool_types), act, gate, linear
        self._paths = layer_paths(layers)
        if linear:
            first = nn.Linear(channels, hidden_channels, bias)
            second = nn.Linear(hidden_channels, channels, bias)
        else:
            first = nn.Conv2d(channels, hidden_channels, 1, bias=bias)
            second = nn.Conv2d(hidden_channels, channels, 1, bias=bias)
        add_layers(self, self._paths, first, second, act)

    def logits(self, x: Tensor) -> Tensor:
        """Pre-gate channel logits, (N, C, 1, 1)."""
        first, second = (get_layer(self, path) for path in self._paths)
        total: Optional[Tensor] = None
        for p in self.pool_types:
            pooled = x.mean((2, 3), keepdim=True) if p == "avg" else x.amax((2, 3), keepdim=True)
            if self.linear:
                pooled = pooled.flatten(1)
            raw = second(ACTIVATIONS[self.act](first(pooled)))
            total = raw if total is None else total + raw
        assert total is not None
        return total.reshape(x.shape[0], x.shape[1], 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * GATES[self.gate](self.logits(x))

    def extra_repr(self) -> str:
        first, second = (".".join(path) for path in self._paths)
        return (f"pool_types={self.pool_types}, act={self.act!r}, gate={self.gate!r}, "
                f"layers=({first!r}, {second!r}), linear={self.linear}")
