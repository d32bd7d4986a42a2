"""VGG-11/13/16/19 (with or without BatchNorm) with optional SE or CBAM after every conv block.

Parameter and buffer names equal torchvision's ``vgg*`` / ``vgg*_bn``. Attention goes at the end
of each conv block, before its max pool: the pool at ``features.i`` becomes an
:class:`AttendThenPool` holding the attention as ``features.i.se`` / ``features.i.cbam``, so no
backbone index shifts.
"""

from typing import List, Optional, Union

from torch import Tensor, nn

from .attention import check_kind, make_attention

CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


class AttendThenPool(nn.Module):
    """The end of a VGG conv block: ``pool(attention(x))``, attention stored under its kind."""

    def __init__(self, kind: str, attention: nn.Module, pool: nn.Module):
        super().__init__()
        self.kind = kind
        self.add_module(kind, attention)
        self.pool = pool

    @property
    def attention(self) -> nn.Module:
        """The attention module (attribute ``se`` or ``cbam``)."""
        return getattr(self, self.kind)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) -> pooled attended x."""
        return self.pool(self.attention(x))


def attach(features: nn.Sequential, kind: Optional[str], reduction: int = 16,
           reference_impl: bool = False) -> nn.Sequential:
    """Put attention of ``kind`` (None: none) before every max pool of a VGG ``features``.

    Each attention module takes the width, device, dtype and mode of the last conv before its
    pool. Returns ``features``, changed in place.
    """
    if check_kind(kind) is None:
        return features
    for i, layer in enumerate(features):
        if isinstance(layer, AttendThenPool):
            raise ValueError(f"features.{i} already has {layer.kind!r} attention")
    last_conv = None
    for i, layer in enumerate(features):
        if isinstance(layer, nn.Conv2d):
            last_conv = layer
        elif isinstance(layer, nn.MaxPool2d) and last_conv is not None:
            attention = make_attention(kind, last_conv.out_channels, reduction, reference_impl,
                                       like=last_conv)
            features[i] = AttendThenPool(kind, attention, layer)
    return features


def make_features(config: List[Union[int, str]], batch_norm: bool) -> nn.Sequential:
    """torchvision's ``make_layers``: 3x3 conv (+ BN) + ReLU per number, max pool per "M"."""
    layers: List[nn.Module] = []
    channels = 3
    for v in config:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """torchvision's VGG (same submodule names and initialisation), optionally with attention.

    Args:
        depth: 11, 13, 16 or 19.
        batch_norm: BatchNorm after every conv (the ``_bn`` variants).
        attention: None, "se" or "cbam", at the end of each conv block (see module docstring).
        reference: eager reference attention modules (for comparison).
        reduction: the attention MLP's reduction ratio.
        num_classes: outputs of the last classifier layer.
        dropout: dropout probability in the classifier.
    """

    def __init__(self, depth: int, batch_norm: bool = False, attention: Optional[str] = None,
                 reference: bool = False, reduction: int = 16, num_classes: int = 1000,
                 dropout: float = 0.5):
        super().__init__()
        if depth not in CONFIGS:
            raise ValueError(f"depth must be one of {tuple(CONFIGS)}, got {depth!r}")
        check_kind(attention)
        self.features = make_features(CONFIGS[depth], batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes))
        self._init_backbone()
        attach(self.features, attention, reduction, reference)

    def _init_backbone(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Images (N, 3, H, W) -> logits (N, num_classes)."""
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def _builder(depth: int, batch_norm: bool):
    name = f"vgg{depth}{'_bn' if batch_norm else ''}"

    def build(attention: Optional[str] = None, *, reference: bool = False, reduction: int = 16,
              num_classes: int = 1000, dropout: float = 0.5) -> VGG:
        return VGG(depth, batch_norm, attention, reference, reduction, num_classes, dropout)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"VGG-{depth}{' with BatchNorm' if batch_norm else ''}: torchvision's "
                     f"``{name}`` names and initialisation, with ``attention`` (None, \"se\", "
                     "\"cbam\") before every max pool; see :class:`VGG` for the arguments.")
    return build


vgg11, vgg11_bn = _builder(11, False), _builder(11, True)
vgg13, vgg13_bn = _builder(13, False), _builder(13, True)
vgg16, vgg16_bn = _builder(16, False), _builder(16, True)
vgg19, vgg19_bn = _builder(19, False), _builder(19, True)
