"""Adding SE or CBAM to a torchvision-style ResNet or VGG the user already has."""

from typing import Optional

from torch import nn

from . import vgg
from .attention import check_kind
from .resnet import BasicBlock, Bottleneck, ResidualBlock, check_placement

BLOCK_CHILDREN = {  # besides ``downsample``, a module or None
    BasicBlock: {"conv1", "bn1", "relu", "conv2", "bn2"},
    Bottleneck: {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu"},
}


def _as_residual_block(block: nn.Module, where: str) -> ResidualBlock:
    if isinstance(block, ResidualBlock):
        if block.kind is not None:
            raise ValueError(f"{where} already has {block.kind!r} attention")
        return block
    children = set(block._modules) - {"downsample"}
    for cls, expected in BLOCK_CHILDREN.items():
        if children == expected and hasattr(block, "downsample"):
            return cls.adopt(block)
    raise TypeError(f"{where} is a {type(block).__name__} with children {sorted(children)}; "
                    "expected a torchvision BasicBlock or Bottleneck "
                    f"({sorted(BLOCK_CHILDREN[Bottleneck])} and downsample)")


def add_attention(model: nn.Module, kind: str, placement: Optional[str] = None,
                  reduction: int = 16) -> nn.Module:
    """Add a new ``kind`` ("se" or "cbam") attention module to every block of ``model``, in place.

    ``model`` is a torchvision-style ResNet (``layer1``..``layer4`` of ``BasicBlock`` /
    ``Bottleneck``, including this package's) or VGG (a ``features`` Sequential).

    * ResNet: each block becomes a :class:`~cbam_kernels.models.resnet.ResidualBlock` holding the
      very same submodules, plus attention at ``placement`` ("before_add", the default, or
      "after_add"), with the fused epilogue.
    * VGG: attention before every max pool (``placement`` must be left None), see
      :mod:`cbam_kernels.models.vgg`.

    Attention modules take the device, dtype and train/eval mode of the layers they follow and
    their own default initialisation. Existing parameters and state_dict keys are untouched (only
    attention keys are added). Returns ``model``.
    """
    if check_kind(kind) is None:
        raise ValueError("add_attention needs a kind of attention, got None")
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(s, nn.Sequential) for s in stages):
        placement = check_placement(placement or "before_add")
        blocks = [(stage, j, _as_residual_block(block, f"layer{i}.{j}"))
                  for i, stage in enumerate(stages, 1) for j, block in enumerate(stage)]
        for stage, j, block in blocks:
            stage[j] = block.attach(kind, placement, reduction)
        return model
    if isinstance(getattr(model, "features", None), nn.Sequential):
        if placement is not None:
            raise ValueError(f"VGG attention has one placement (before each pool); got "
                             f"placement={placement!r}, leave it None")
        vgg.attach(model.features, kind, reduction)
        return model
    raise TypeError(f"add_attention expects a torchvision-style ResNet (layer1..layer4) or VGG "
                    f"(features), got a {type(model).__name__}")
