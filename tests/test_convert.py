"""cbam_kernels.convert on timm, torchvision and official-style models (CPU).

Every conversion is checked side by side with an untouched copy of the original: output, input
and parameter gradients, and BatchNorm buffers after the forward/backward step
(``model_testing.check_same``), with the model converted in the mode it is compared in. Models
run in float64, except torchvision's (float32, to keep their depthwise convolutions fast).
"""

import pytest
import timm
import torch
import torchvision
from timm.layers.cbam import CbamModule, LightCbamModule
from timm.layers.squeeze_excite import SEModule
from torch import nn

from cbam_kernels import CBAM, SE, reference
from cbam_kernels.convert import ConversionSummary, convert
from cbam_kernels.epilogue import FusedResidualBlock, Recipe, prove_residual
from model_testing import (OfficialBasicBlock, OfficialBottleneck, OfficialResNet, check_same,
                           converted_pair, randomize)

F64 = torch.float64


def _image(n=2, size=64, dtype=F64):
    return torch.randn(n, 3, size, size, dtype=dtype)


def _modes(model):
    return {name: m.training for name, m in model.named_modules()}


def _check_converted(model, x, train, replaced, fused, rename=lambda n: n):
    """Convert ``model`` (in the given mode), check the summary counts and that modes are kept,
    then compare with the original."""
    model.train(train)
    modes = _modes(model)
    converted, summary, original = converted_pair(model)
    assert (len(summary.replaced), len(summary.fused), summary.skipped) == (replaced, fused, [])
    assert all(modes[name] == training for name, training in _modes(converted).items()
               if name in modes)
    check_same(converted, original, x, train, rename)
    return converted, summary


# Train mode needs a 64 px input: at 32 px the last stage is 1 x 1 and its BatchNorms normalise
# two values per channel, which amplifies rounding far beyond any tolerance.
@pytest.mark.parametrize("arch, attn, train, size", [
    ("resnet18", "cbam", True, 64), ("resnet18", "cbam", False, 32),
    ("resnet18", "se", True, 64), ("resnet18", "se", False, 32),
    ("resnet50", "cbam", True, 64), ("resnet50", "se", False, 32)])
def test_timm_resnet(arch, attn, train, size):
    model = randomize(timm.create_model(arch, block_args=dict(attn_layer=attn),
                                        num_classes=10)).to(F64)
    blocks = sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))
    converted, _ = _check_converted(model, _image(size=size), train, blocks, blocks)
    block = converted.layer2[0]
    assert isinstance(block, FusedResidualBlock) and block.stride == 2
    assert isinstance(block.se, CBAM if attn == "cbam" else SE)


@pytest.mark.parametrize("arch, replaced", [("efficientnet_b0", 16), ("mobilenet_v3_small", 9)])
@pytest.mark.parametrize("train, size", [(True, 64), (False, 32)])
def test_torchvision_squeeze_excitation(arch, replaced, train, size):
    model = randomize(getattr(torchvision.models, arch)(num_classes=10))
    converted, summary = _check_converted(model, _image(size=size, dtype=torch.float32), train,
                                          replaced, fused=0)
    assert all("SqueezeExcitation -> SE" in what for _, what in summary.replaced)
    se = converted.get_submodule(summary.replaced[0][0])
    assert (se.act, se.gate) == (("silu", "sigmoid") if arch.startswith("efficientnet")
                                 else ("relu", "hardsigmoid"))


@pytest.mark.parametrize("block, layers", [(OfficialBasicBlock, [2, 1, 1, 1]),
                                           (OfficialBottleneck, [1, 1, 1, 1])])
@pytest.mark.parametrize("train", [True, False])
def test_official_cbam_resnet(block, layers, train):
    model = randomize(OfficialResNet(block, layers, num_classes=10)).to(F64)
    converted, summary = _check_converted(model, _image(), train, sum(layers), sum(layers))
    assert summary.replaced[0] == ("layer1.0.cbam", summary.replaced[0][1])
    assert "official CBAM -> CBAM" in summary.replaced[0][1]
    assert set(converted.state_dict()) == set(OfficialResNet(block, layers, 10).state_dict())


@pytest.mark.parametrize("train", [True, False])
def test_official_cbam_variants(train):
    """no_spatial, a single pool type, a 3x3 spatial kernel, and a width C // r < 16."""
    model = nn.Sequential(reference.OfficialCBAM(32, 4, ("max",)),
                          reference.OfficialCBAM(32, 8, no_spatial=True),
                          reference.OfficialCBAM(32, 2, ("avg", "max"), kernel_size=3)).to(F64)
    randomize(model)
    x = torch.randn(2, 32, 6, 5, dtype=F64)
    converted, summary = _check_converted(model, x, train, replaced=3, fused=0)
    assert converted[1].spatial_gate is None and converted[2].spatial_gate.kernel_size == 3


@pytest.mark.parametrize("train", [True, False])
def test_linear_se_block(train):
    model = nn.Sequential(nn.Conv2d(3, 32, 3), reference.SEBlock(32, 4)).to(F64)
    renames = {"1.fc1.weight": "1.fc.0.weight", "1.fc2.weight": "1.fc.2.weight"}
    converted, _ = _check_converted(model, _image(size=16), train, replaced=1, fused=0,
                                    rename=lambda n: renames.get(n, n))
    assert isinstance(converted[1], SE) and converted[1].fc1.bias is None


def test_model_that_is_an_attention_module():
    model = CbamModule(32).to(F64)
    converted, summary = convert(model)
    assert isinstance(converted, CBAM) and summary.replaced[0][0] == ""
    assert "(model)" in str(summary)


def _skipped(model):
    model = model.to(F64).eval()
    x = torch.randn(2, 32, 6, 6, dtype=F64)
    expected = model(x)
    converted, summary = convert(model)
    assert converted is model and not summary.replaced and len(summary.skipped) == 1
    assert torch.equal(converted(x), expected)
    return summary.skipped[0][1]


@pytest.mark.parametrize("module, reason", [
    (lambda: reference.OfficialCBAM(32, 4, ("avg", "lp")), "pool types"),
    (lambda: CbamModule(32, act_layer=nn.ReLU6), "activation 'relu6'"),
    (lambda: CbamModule(32, gate_layer="hard_sigmoid"), "gates"),
    (lambda: LightCbamModule(32), "spatial conv"),
    (lambda: SEModule(32, add_maxpool=True), "add_maxpool"),
    (lambda: SEModule(32, norm_layer=nn.BatchNorm2d), "norm between"),
    (lambda: torchvision.ops.SqueezeExcitation(32, 8, scale_activation=nn.Tanh), "gate 'tanh'"),
])
def test_unsupported_variants_are_left_in_place(module, reason):
    assert reason in _skipped(module())


def test_probe_catches_a_structural_look_alike():
    class DoubledSE(SEModule):
        def forward(self, x):
            return 2 * super().forward(x)

    reason = _skipped(DoubledSE(32))
    assert "outputs differ" in reason and "timm SEModule" in reason


def test_epilogue_left_unfused_when_not_provable():
    """timm's drop path sits between the attention and the add in every block but the first
    (whose drop rate is 0): all attention converted, only the first block fused."""
    model = randomize(timm.create_model("resnet18", block_args=dict(attn_layer="se"),
                                        drop_path_rate=0.1, num_classes=10)).to(F64)
    converted, summary = _check_converted(model, _image(size=32), train=False, replaced=8,
                                          fused=1)
    assert summary.fused == ["layer1.0"]
    assert type(converted.layer1[1]).__name__ == "BasicBlock"


class _Block(nn.Module):
    """A residual block whose forward is one of several variants (for the epilogue proof)."""

    FORWARDS = {
        "module relu": lambda b, x: b.relu(b.se(b.conv(x)) + b.down(x)),
        "function relu, identity first": lambda b, x: torch.relu(x + b.se(b.conv(x))),
        "in-place methods": lambda b, x: b.se(b.conv(x)).add_(x).relu_(),
        "scaled shortcut": lambda b, x: b.relu(b.se(b.conv(x)) + 0.5 * x),
        "second output": lambda b, x: b.relu(b.se(b.conv(x)) + x) + b.conv(x),
        "add with alpha": lambda b, x: b.relu(torch.add(b.se(b.conv(x)), x, alpha=2)),
        "shortcut reused in main path": lambda b, x: b.relu(b.se(b.conv(d := b.down(x))) + d),
        "attention after the add": lambda b, x: b.relu(b.se(b.conv(x) + x)),
        "no relu": lambda b, x: b.se(b.conv(x)) + x,
    }

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.conv, self.down = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.se, self.relu = SE(8, 2), nn.ReLU()

    def forward(self, x):
        return self.FORWARDS[self.variant](self, x)


@pytest.mark.parametrize("variant, recipe", [
    ("module relu", Recipe(("conv",), "se", "down")),
    ("function relu, identity first", Recipe(("conv",), "se", None)),
    ("in-place methods", Recipe(("conv",), "se", None)),
    ("scaled shortcut", None), ("second output", None), ("add with alpha", None),
    ("shortcut reused in main path", None), ("attention after the add", None), ("no relu", None)])
def test_epilogue_proof(variant, recipe):
    block = _Block(variant).to(F64)
    assert prove_residual(block) == recipe
    if recipe is not None:
        x = torch.randn(2, 8, 5, 5, dtype=F64)
        torch.testing.assert_close(FusedResidualBlock(block, recipe)(x), block(x))
        block.register_forward_hook(lambda *args: None)
        assert prove_residual(block) is None


def test_modules_with_hooks_are_left_in_place():
    module = SEModule(32)
    module.fc1.register_forward_hook(lambda *args: None)
    assert "hooks" in _skipped(module)


def test_keeps_tensors_dtype_memory_format_and_requires_grad():
    model = timm.create_model("resnet18", block_args=dict(attn_layer="cbam"), num_classes=10)
    model = model.to(torch.bfloat16, memory_format=torch.channels_last).eval()
    attn = model.layer2[0].se
    attn.channel.fc1.weight.requires_grad_(False)
    tensors = {n: t for n, t in (*attn.named_parameters(), *attn.named_buffers())}
    converted, _ = convert(model)
    new = converted.layer2[0].se
    assert {n: t for n, t in (*new.named_parameters(), *new.named_buffers())} == tensors
    assert all(t.dtype == torch.bfloat16 for n, t in tensors.items() if "num_batches" not in n)
    assert new.spatial.conv.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not new.channel.fc1.weight.requires_grad and not new.training
    x = _image(dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    assert converted(x).dtype == torch.bfloat16


def test_optimizer_built_before_conversion_still_trains_the_attention():
    model = randomize(timm.create_model("resnet18", block_args=dict(attn_layer="cbam"),
                                        num_classes=10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    converted, _ = convert(model)
    weight = converted.layer1[0].se.channel.fc2.weight
    before = weight.detach().clone()
    converted(_image(dtype=torch.float32)).sum().backward()
    optimizer.step()
    assert not torch.equal(weight, before)


def test_summary_str():
    summary = ConversionSummary(replaced=[("a.se", "timm SEModule -> SE(channels=8)")],
                                skipped=[("b", "pool types ('lp',)")], fused=["a"])
    assert str(summary).splitlines() == [
        "converted 1 attention modules, fused 1 residual epilogues, left 1 in place",
        "  replaced a.se: timm SEModule -> SE(channels=8)",
        "  fused    a",
        "  skipped  b: pool types ('lp',)"]
