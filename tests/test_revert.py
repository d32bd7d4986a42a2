"""cbam_kernels.revert: fused modules back to plain PyTorch ones (CPU).

``revert(convert(model))`` must give back the original classes with the same keys, values and
outputs, holding the converted model's very tensors; fused modules that convert did not make
become cbam_kernels.reference modules that compute the same (forward, backward, BatchNorm
statistics: ``model_testing.check_same``).
"""

import copy

import pytest
import timm
import torch
import torchvision
from timm.layers.cbam import CbamModule
from torch import nn

from cbam_kernels import CBAM, SE, ChannelGate, SpatialGate, convert, reference, revert
from cbam_kernels.conversion.residual import FusedResidualBlock, Recipe
from model_testing import OfficialBottleneck, OfficialResNet, check_same, randomize, se_resnet

F64 = torch.float64
FUSED = (CBAM, ChannelGate, SpatialGate, FusedResidualBlock)

MODELS = {
    "official CBAM ResNet": lambda: OfficialResNet(OfficialBottleneck, [1, 1, 1, 1], 10),
    "timm resnet18 cbam": lambda: timm.create_model(
        "resnet18", block_args=dict(attn_layer="cbam"), num_classes=10),
    "timm mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050",
                                                            num_classes=10),
    "torchvision mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(
        num_classes=10),
    "senet.pytorch se_resnet": se_resnet,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_revert_undoes_convert(name):
    model = randomize(MODELS[name]()).eval()
    original = copy.deepcopy(model)
    converted, summary = convert(model)
    assert summary.replaced and not summary.skipped
    tensors = {n: t for n, t in (*converted.named_parameters(), *converted.named_buffers())}
    reverted = revert(converted)
    assert [(n, type(m)) for n, m in reverted.named_modules()] == \
        [(n, type(m)) for n, m in original.named_modules()]
    assert {n: t for n, t in (*reverted.named_parameters(), *reverted.named_buffers())} == tensors
    expected = original.state_dict()
    assert list(reverted.state_dict()) == list(expected)
    assert all(torch.equal(v, expected[k]) for k, v in reverted.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reverted(x), original(x))
    assert len(convert(reverted)[1].replaced) == len(summary.replaced)


@pytest.mark.parametrize("make, plain", [
    (lambda: SE(32, 4), reference.PlainChannelGate),
    (lambda: SE(32, 4, bias=False, layers=("fc.0", "fc.2"), linear=True),
     reference.PlainChannelGate),
    (lambda: SE(32, act="silu", gate="hardsigmoid", layers=("conv_reduce", "conv_expand")),
     reference.PlainChannelGate),
    (lambda: ChannelGate(32, 4, pool_types=("max",), style="timm", act="silu"),
     reference.PlainChannelGate),
    (lambda: CBAM(32, 4), nn.Sequential),
    (lambda: CBAM(32, 4, kernel_size=3, style="timm", no_spatial=True), nn.Sequential),
    (lambda: SpatialGate(3, "timm"), reference.TimmSpatialAttn),
    (lambda: SpatialGate(5, "official"), reference.OfficialSpatialGate),
])
@pytest.mark.parametrize("train", [True, False])
def test_fused_modules_not_made_by_convert_become_reference_modules(make, plain, train):
    fused = randomize(make().to(F64))
    reverted = revert(copy.deepcopy(fused))
    assert type(reverted) is plain and not any(isinstance(m, FUSED) for m in reverted.modules())
    assert list(reverted.state_dict()) == list(fused.state_dict())
    check_same(fused, reverted, torch.randn(2, 32, 6, 5, dtype=F64), train)


def test_model_that_is_a_fused_module():
    converted, _ = convert(CbamModule(32))
    assert isinstance(converted, CBAM)
    assert type(revert(converted)) is CbamModule


def test_fused_block_not_made_by_convert_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.se = nn.Conv2d(8, 8, 1), SE(8, 2)

        def forward(self, x):
            return torch.relu(self.se(self.conv(x)) + x)

    fused = FusedResidualBlock(Block(), Recipe(("conv",), "se", None))
    with pytest.raises(ValueError, match="not made by convert"):
        revert(fused)
