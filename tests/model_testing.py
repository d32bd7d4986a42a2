"""Helpers for the model-level tests (convert, builders, fine-tuning).

* :func:`check_same` runs two models side by side (forward and backward) and compares outputs,
  input and parameter gradients, and buffers (BatchNorm running statistics) after the step.
* :class:`OfficialResNet` mirrors the official CBAM repository's ``MODELS/model_resnet.py``
  (ImageNet variant) with :class:`cbam_kernels.reference.OfficialCBAM` in each block.
* :func:`se_resnet` mirrors senet.pytorch's ``se_resnet18`` (:class:`SELayer`: a Linear SE block).

Tolerances: whole networks are compared, where train-mode BatchNorm over few values amplifies
rounding differences by orders of magnitude, so the bound is ``sqrt(eps)`` of the dtype on the
relative error (norm of the difference over the norm of the expected value; for parameter
gradients, over the norm of all expected gradients, since some true gradients are exactly zero,
e.g. a BN bias feeding another train-mode BN, and then both sides are rounding noise). Rounding
gives errors near ``eps``; a wrong weight, gate or epilogue gives errors of order 1.
"""

import copy
import functools
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from cbam_kernels import reference
from cbam_kernels.conversion.convert import convert
from cbam_kernels.models import resnet18

def tolerance(dtype: torch.dtype) -> float:
    """Relative-error bound for comparing two whole networks computed in ``dtype``."""
    return torch.finfo(dtype).eps ** 0.5


def randomize(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm affine terms and running statistics (timm zero-inits the last BN
    of each block, which would hide the attention entirely)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


def rel_err(actual: Tensor, expected: Tensor, scale: Optional[float] = None) -> float:
    """||actual - expected|| / (scale or ||expected||), in float64."""
    diff = (actual.double() - expected.double()).norm().item()
    return diff / max(scale if scale is not None else expected.double().norm().item(), 1e-300)


def _run(model: nn.Module, x: Tensor, seed: int) -> Dict[str, object]:
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # dropout / stochastic depth draw the same masks on both sides
    y = model(x)
    y.backward(torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1)))
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return dict(y=y.detach(), gx=x.grad, grads=grads, buffers=dict(model.named_buffers()))


def check_same(ours: nn.Module, ref: nn.Module, x: Tensor, train: bool,
               rename: Callable[[str], str] = lambda name: name) -> None:
    """Assert that ``ours`` and ``ref`` (same weights) agree on ``x`` in train or eval mode:
    output, input gradient, parameter gradients (``rename`` maps ours' names to ref's) and
    buffers after the forward/backward step (which changes both models)."""
    tol = tolerance(x.dtype)
    ours.train(train)
    ref.train(train)
    a, b = _run(ours, x, seed=2), _run(ref, x, seed=2)
    for key in ("y", "gx"):
        assert rel_err(a[key], b[key]) <= tol, (key, rel_err(a[key], b[key]))
    grads = {rename(n): g for n, g in a["grads"].items()}
    assert set(grads) == set(b["grads"])
    scale = torch.cat([g.flatten() for g in b["grads"].values()]).double().norm().item()
    for name, g in b["grads"].items():
        err = rel_err(grads[name].reshape(g.shape), g, scale)
        assert err <= tol, (name, err)
    buffers = {rename(n): v for n, v in a["buffers"].items()}
    assert set(buffers) == set(b["buffers"])
    for name, v in b["buffers"].items():
        assert rel_err(buffers[name], v) <= tol, (name, rel_err(buffers[name], v))


def converted_pair(model: nn.Module, **kwargs):
    """(converted model, summary, untouched deep copy of the original)."""
    original = copy.deepcopy(model)
    converted, summary = convert(model, **kwargs)
    return converted, summary, original


@functools.lru_cache(maxsize=None)
def resnet18_pair(kind: str):
    """(original, converted) ResNet-18 with 10 classes, in eval mode, with random BatchNorm
    terms and running statistics. "cbam": this package's ResNet with the reference (official)
    CBAM; "se": timm's ``resnet18`` with its ``SEModule`` (its blocks get the fused epilogue).
    Built once per kind and shared by the tests that call it: use, do not change."""
    import timm

    torch.manual_seed(0)
    if kind == "cbam":
        model = resnet18(attention="cbam", reference=True, num_classes=10)
    else:
        model = timm.create_model("resnet18", block_args=dict(attn_layer="se"), num_classes=10)
    converted, summary, original = converted_pair(randomize(model).eval())
    assert len(summary.replaced) == 8 and not summary.skipped, str(summary)
    return original, converted


class OfficialBasicBlock(nn.Module):
    """The official repository's ``BasicBlock`` (CBAM after bn2, before the residual add)."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, use_cbam=False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.cbam = reference.OfficialCBAM(planes, 16) if use_cbam else None

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        if self.cbam is not None:
            out = self.cbam(out)
        out += residual
        out = self.relu(out)
        return out


class OfficialBottleneck(nn.Module):
    """The official repository's ``Bottleneck`` (stride on the 3x3 conv, CBAM after bn3)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, use_cbam=False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.cbam = reference.OfficialCBAM(planes * 4, 16) if use_cbam else None

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        if self.cbam is not None:
            out = self.cbam(out)
        out += residual
        out = self.relu(out)
        return out


class OfficialResNet(nn.Module):
    """The official repository's ``ResNet`` for ImageNet with ``att_type='CBAM'``."""

    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # AvgPool2d(7) at 224 px; no parameters either way
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, use_cbam=True)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, use_cbam=True) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


class SELayer(nn.Module):
    """senet.pytorch's ``SELayer`` (``senet/se_module.py``): ``avg_pool`` + bias-free Linear MLP
    ``fc`` (keys ``fc.0.weight``, ``fc.2.weight``)."""

    def __init__(self, channel, reduction=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid())

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


class SEBasicBlock(nn.Module):
    """senet.pytorch's ``SEBasicBlock`` (``senet/se_resnet.py``): SE after bn2, before the add."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, norm_layer=None, *, reduction=16):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SELayer(planes, reduction)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        out = self.relu(out)
        return out


def se_resnet(layers=(1, 1, 1, 1), num_classes=10) -> nn.Module:
    """senet.pytorch's ``se_resnet18`` (torchvision's ``ResNet`` of :class:`SEBasicBlock`), with
    one block per stage by default, random BatchNorm terms and running statistics."""
    import torchvision

    return randomize(torchvision.models.ResNet(SEBasicBlock, list(layers), num_classes))
