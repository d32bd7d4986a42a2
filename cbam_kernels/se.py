"""Squeeze-and-Excitation (Hu et al., 2018): y = x * sigmoid(fc2(relu(fc1(avg_hw(x)))))."""

from typing import Optional

from .channel_gate import ChannelGate, hidden_width


class SE(ChannelGate):
    """Squeeze-and-Excitation block, fused forward and backward.

    The channel gate with average pooling only, its MLP held as 1x1 convs like timm's
    ``SEModule`` and torchvision's ``SqueezeExcitation``: state_dict keys ``fc1.weight``
    (R, C, 1, 1), ``fc1.bias``, ``fc2.weight`` (C, R, 1, 1), ``fc2.bias``.

    Args:
        channels: C.
        reduction: r; hidden width R = C // r.
        bias: biases on both 1x1 convs (False for the classic bias-free ``SEBlock``).
        hidden_channels: R, overriding C // r (e.g. timm's rounded widths).
        act: hidden activation, "relu" or "silu" (torchvision's EfficientNet).
        gate: "sigmoid" or "hardsigmoid" (torchvision's MobileNetV3).
    """

    def __init__(self, channels: int, reduction: float = 16, bias: bool = True,
                 hidden_channels: Optional[int] = None, act: str = "relu",
                 gate: str = "sigmoid"):
        super().__init__(channels, reduction, pool_types=("avg",), style="timm",
                         hidden_channels=hidden_channels or hidden_width(channels, reduction,
                                                                         "official"),
                         bias=bias, act=act, gate=gate)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, hidden_channels={self.hidden_channels}, "
                f"bias={self.fc1.bias is not None}, act={self.act!r}, gate={self.gate!r}")
