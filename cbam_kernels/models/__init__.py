"""ResNet and VGG with SE or CBAM attention, torchvision-compatible state_dicts.

Builders ``resnet18/34/50/101/152(attention=None|"se"|"cbam", placement="before_add"|"after_add")``
and ``vgg11/13/16/19[_bn](attention=...)``; :func:`add_attention` for models the user already has;
:func:`load_checkpoint` for the official CBAM repository's checkpoints.
"""

from .add_attention import add_attention
from .attention import KINDS
from .checkpoint import load_checkpoint
from .resnet import (PLACEMENTS, BasicBlock, Bottleneck, ResidualBlock, ResNet, resnet18,
                     resnet34, resnet50, resnet101, resnet152)
from .vgg import (VGG, AttendThenPool, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19,
                  vgg19_bn)

__all__ = ["add_attention", "load_checkpoint", "KINDS", "PLACEMENTS", "ResNet", "ResidualBlock",
           "BasicBlock", "Bottleneck", "VGG", "AttendThenPool", "resnet18", "resnet34",
           "resnet50", "resnet101", "resnet152", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16",
           "vgg16_bn", "vgg19", "vgg19_bn"]
