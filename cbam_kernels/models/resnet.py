"""ResNet-18/34/50/101/152 with optional SE or CBAM in every residual block.

Parameter and buffer names equal torchvision's ``resnet*`` models, so torchvision weights load
with only the attention keys missing. The attention module of a block is stored under its kind:
``layerX.Y.cbam.*`` (the official CBAM repository's keys, e.g.
``layer1.0.cbam.ChannelGate.mlp.1.weight``) or ``layerX.Y.se.*`` (``fc1``/``fc2``).
"""

from typing import List, Optional, Type

from torch import Tensor, nn

from .attention import accepts_residual, check_kind, make_attention

PLACEMENTS = ("before_add", "after_add")


def check_placement(placement: str) -> str:
    """Validate a ``placement`` argument."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    return placement


class ResidualBlock(nn.Module):
    """Base of :class:`BasicBlock` and :class:`Bottleneck`: main path, attention, epilogue.

    With attention placed "before_add" (the official CBAM placement, after the block's last BN)
    the block returns ``relu(attention(out) + identity)``; a fused attention module computes it in
    one pass (``attention(out, residual=identity)``), an eager one in three steps. "after_add"
    returns ``attention(relu(out + identity))``.
    """

    kind: Optional[str] = None
    placement = "before_add"

    def main_path(self, x: Tensor) -> Tensor:
        """conv/BN/ReLU layers up to the last BN (no attention, no residual)."""
        raise NotImplementedError

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        """The BatchNorm that ends the main path (its width is the block's output width)."""
        raise NotImplementedError

    @property
    def attention(self) -> Optional[nn.Module]:
        """The block's attention module (attribute ``se`` or ``cbam``), or None."""
        return getattr(self, self.kind) if self.kind else None

    def attach(self, kind: Optional[str], placement: str = "before_add", reduction: int = 16,
               reference_impl: bool = False) -> "ResidualBlock":
        """Give the block a new attention module of ``kind`` (None: none) at ``placement``.

        The module takes the block's device, dtype and mode. Returns the block.
        """
        check_placement(placement)
        if check_kind(kind) is None:
            return self
        if self.kind is not None:
            raise ValueError(f"block already has {self.kind!r} attention")
        channels = self.last_bn.num_features
        self.add_module(kind, make_attention(kind, channels, reduction, reference_impl,
                                             like=self.last_bn))
        self.kind, self.placement = kind, placement
        return self

    @classmethod
    def adopt(cls, block: nn.Module) -> "ResidualBlock":
        """A block of this class built from the submodules of a torchvision-style ``block``.

        The submodules themselves (not copies) move over under the same names, so parameters,
        optimizer state and state_dict keys are unchanged.
        """
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in block._modules.items():
            new.add_module(name, child)
        new.downsample, new.stride = block.downsample, block.stride
        new.training = block.training
        return new

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C_in, H, W) -> block output (N, C_out, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.main_path(x)
        attention = self.attention
        if attention is None:
            return self._add_relu(out, identity)
        if self.placement == "after_add":
            return attention(self._add_relu(out, identity))
        if accepts_residual(attention):
            return attention(out, residual=identity)
        return self._add_relu(attention(out), identity)

    def _add_relu(self, out: Tensor, identity: Tensor) -> Tensor:
        out += identity
        return self.relu(out)

def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias (torchvision's ``conv3x3``)."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias (torchvision's ``conv1x1``)."""
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(ResidualBlock):
    """ResNet-18/34 block: conv3x3-BN-ReLU-conv3x3-BN, torchvision's names."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def main_path(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(ResidualBlock):
    """ResNet-50/101/152 block (stride on the 3x3 conv, torchvision's "v1.5"), its names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def main_path(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class ResNet(nn.Module):
    """torchvision's ResNet (same submodule names and initialisation), optionally with attention.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage.
        attention: None, "se" or "cbam" (see :func:`~cbam_kernels.models.attention.make_attention`).
        placement: "before_add" or "after_add" (see :class:`ResidualBlock`).
        reference: eager reference attention modules and an unfused epilogue (for comparison).
        reduction: the attention MLP's reduction ratio.
        num_classes: outputs of ``fc``.
        zero_init_residual: zero the last BN's weight in every block, as torchvision.

    The backbone is initialised as torchvision's; attention modules keep their own default
    initialisation.
    """

    def __init__(self, block: Type[ResidualBlock], layers: List[int],
                 attention: Optional[str] = None, placement: str = "before_add",
                 reference: bool = False, reduction: int = 16, num_classes: int = 1000,
                 zero_init_residual: bool = False):
        super().__init__()
        check_kind(attention)
        check_placement(placement)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._init_backbone(zero_init_residual)
        for b in self.blocks():
            b.attach(attention, placement, reduction, reference)

    def _make_layer(self, block: Type[ResidualBlock], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_backbone(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for b in self.blocks():
                nn.init.zeros_(b.last_bn.weight)

    def blocks(self) -> List[ResidualBlock]:
        """The residual blocks, in order."""
        return [b for layer in (self.layer1, self.layer2, self.layer3, self.layer4)
                for b in layer]

    def forward(self, x: Tensor) -> Tensor:
        """Images (N, 3, H, W) -> logits (N, num_classes)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _builder(block: Type[ResidualBlock], layers: List[int], depth: int):
    def build(attention: Optional[str] = None, placement: str = "before_add", *,
              reference: bool = False, reduction: int = 16, num_classes: int = 1000,
              zero_init_residual: bool = False) -> ResNet:
        return ResNet(block, layers, attention, placement, reference, reduction, num_classes,
                      zero_init_residual)

    build.__name__ = build.__qualname__ = f"resnet{depth}"
    build.__doc__ = (f"ResNet-{depth}: torchvision's ``resnet{depth}`` names and initialisation, "
                     "with ``attention`` (None, \"se\", \"cbam\") at ``placement`` in every block; "
                     "see :class:`ResNet` for the arguments.")
    return build


resnet18 = _builder(BasicBlock, [2, 2, 2, 2], 18)
resnet34 = _builder(BasicBlock, [3, 4, 6, 3], 34)
resnet50 = _builder(Bottleneck, [3, 4, 6, 3], 50)
resnet101 = _builder(Bottleneck, [3, 4, 23, 3], 101)
resnet152 = _builder(Bottleneck, [3, 8, 36, 3], 152)
