"""Squeeze-and-Excitation: timm's ``SEModule`` / torchvision's ``SqueezeExcitation`` (1x1 convs
``fc1``/``fc2``), the classic Hu et al. ``SEBlock`` (bias-free ``Linear`` layers), and
:class:`PlainChannelGate`, any channel gate of :class:`~cbam_kernels.ChannelGate`'s options."""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules.mlp_layers import add_layers, layer_paths
from .checks import check_channels, reduced_width


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
        check_channels("channels", channels)
        if hidden_channels is not None:
            if (not isinstance(hidden_channels, int) or isinstance(hidden_channels, bool)
                    or hidden_channels < 1):
                raise ValueError(
                    f"hidden_channels must be a positive int or None, got {hidden_channels!r}")
            hidden = hidden_channels
        else:
            hidden = reduced_width(channels, reduction, "reduction")
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
        check_channels("channels", channels)
        hidden = reduced_width(channels, reduction, "reduction")
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
    :mod:`cbam_kernels.modules.mlp_layers`).
    """

    def __init__(self, channels: int, hidden_channels: int,
                 pool_types: Sequence[str] = ("avg",), bias: bool = True, act: str = "relu",
                 gate: str = "sigmoid", layers: Sequence[str] = ("fc1", "fc2"),
                 linear: bool = False):
        super().__init__()
        check_channels("channels", channels)
        check_channels("hidden_channels", hidden_channels)
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
        first, second = (self.get_submodule(".".join(path)) for path in self._paths)
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
