"""Squeeze-and-Excitation (Hu et al., 2018): y = x * sigmoid(fc2(relu(fc1(avg_hw(x)))))."""

from typing import Optional, Sequence

from .cbam import ChannelGate, hidden_width


class SE(ChannelGate):
    """Squeeze-and-Excitation block, fused forward and backward.

    The channel gate with average pooling only. By default its MLP is held as 1x1 convs like
    timm's ``SEModule`` and torchvision's ``SqueezeExcitation``: state_dict keys ``fc1.weight``
    (R, C, 1, 1), ``fc1.bias``, ``fc2.weight`` (C, R, 1, 1), ``fc2.bias``. ``layers`` and
    ``linear`` hold it as another block does, e.g. ``layers=("fc.0", "fc.2"), linear=True`` for
    the classic ``SEBlock`` (``fc.0.weight`` (R, C), ``fc.2.weight`` (C, R)) or
    ``layers=("conv_reduce", "conv_expand")`` for timm's EfficientNet ``SqueezeExcite``.

    Args:
        channels: C.
        reduction: r; hidden width R = C // r.
        bias: biases on both layers (False for the classic bias-free ``SEBlock``).
        hidden_channels: R, overriding C // r (e.g. timm's rounded widths).
        act: hidden activation, "relu" or "silu" (EfficientNet).
        gate: "sigmoid" or "hardsigmoid" (MobileNetV3).
        layers: the names of the two layers (see :mod:`cbam_kernels.modules.mlp_layers`).
        linear: ``nn.Linear`` layers rather than 1x1 convs.
    """

    def __init__(self, channels: int, reduction: float = 16, bias: bool = True,
                 hidden_channels: Optional[int] = None, act: str = "relu",
                 gate: str = "sigmoid", layers: Sequence[str] = ("fc1", "fc2"),
                 linear: bool = False):
        super().__init__(channels, reduction, pool_types=("avg",), style="timm",
                         hidden_channels=hidden_channels or hidden_width(channels, reduction,
                                                                         "official"),
                         bias=bias, act=act, gate=gate, layers=layers, linear=linear)

    def extra_repr(self) -> str:
        first = self._layers()[0]
        return (f"channels={self.channels}, hidden_channels={self.hidden_channels}, "
                f"bias={first.bias is not None}, act={self.act!r}, gate={self.gate!r}"
                + ("" if (self.layers, self.linear) == (("fc1", "fc2"), False)
                   else f", layers={self.layers}, linear={self.linear}"))
