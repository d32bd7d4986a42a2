"""cbam_kernels.convert on timm, torchvision and official-style models (CPU).

Every conversion is checked side by side with an untouched copy of the original: output, input
and parameter gradients, and BatchNorm buffers after the forward/backward step
(``model_testing.check_same``), with the model converted in the mode it is compared in. Models
run in float64, except torchvision's (float32, to keep their depthwise convolutions fast).
"""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers.activations import HardSigmoid, Sigmoid, Swish, hard_sigmoid
from timm.layers.activations_me import HardSigmoidMe, SwishMe
from timm.layers.cbam import ChannelAttn, CbamModule, LightCbamModule, SpatialAttn
from timm.layers.eca import CecaModule, EcaModule
from timm.layers.squeeze_excite import EffectiveSEModule, SEModule, SqueezeExciteCl
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn

from cbam_kernels import CBAM, SE, ChannelGate, SpatialGate, reference, revert
from cbam_kernels.ops import backend
from cbam_kernels.conversion.convert import ConversionSummary, convert
from cbam_kernels.conversion.residual import FusedResidualBlock, Recipe, prove_residual
from model_testing import (OfficialBasicBlock, OfficialBottleneck, OfficialResNet, SELayer,
                           check_same, converted_pair, randomize, se_resnet)

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
def test_official_gates_on_their_own(train):
    """The official ChannelGate and SpatialGate outside a CBAM (which capture_attention knows
    too, by the same recognisers) convert to their fused twins, and revert."""
    model = nn.Sequential(reference.OfficialChannelGate(32, 4, ("max", "avg")),
                          reference.OfficialSpatialGate(5)).to(F64)
    randomize(model)
    x = torch.randn(2, 32, 6, 5, dtype=F64)
    converted, summary = _check_converted(model, x, train, replaced=2, fused=0)
    assert isinstance(converted[0], ChannelGate) and converted[1].kernel_size == 5
    assert [what.split(" ->")[0] for _, what in summary.replaced] == [
        "official ChannelGate", "official SpatialGate"]
    assert [type(m) for m in revert(converted)] == [reference.OfficialChannelGate,
                                                    reference.OfficialSpatialGate]


@pytest.mark.parametrize("train", [True, False])
def test_reference_se_modules(train):
    """The reference SE modules (``fc1, act, fc2, gate``, the children of timm's ChannelAttn
    too, and the Linear ``SEBlock``) convert as SE, average pool only."""
    model = nn.Sequential(reference.SEModule(32, 4), reference.SEBlock(32, 8)).to(F64)
    randomize(model)
    x = torch.randn(2, 32, 6, 5, dtype=F64)
    converted, _ = _check_converted(model, x, train, replaced=2, fused=0)
    assert all(isinstance(m, SE) for m in converted)


@pytest.mark.parametrize("layers", [("fc1",), ("fc1", "fc1"), ("fc.2", "fc.0"),
                                    ("fc.0", "mlp.2"), ("fc.a", "fc.b"), ("a.b.0", "a.b.1")])
def test_se_layer_names_are_checked(layers):
    with pytest.raises(ValueError, match="layers must name the MLP's two layers"):
        SE(32, layers=layers)


@pytest.mark.parametrize("train", [True, False])
def test_linear_se_block(train):
    model = nn.Sequential(nn.Conv2d(3, 32, 3), reference.SEBlock(32, 4)).to(F64)
    converted, _ = _check_converted(model, _image(size=16), train, replaced=1, fused=0)
    assert isinstance(converted[1], SE) and converted[1].layers == ("fc.0", "fc.2")
    assert list(converted.state_dict()) == ["0.weight", "0.bias", "1.fc.0.weight",
                                            "1.fc.2.weight"]


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
    (lambda: reference.OfficialChannelGate(32, 4, ("avg", "lse")), "pool types"),
    (lambda: CbamModule(32, act_layer=nn.ReLU6), "activation 'relu6'"),
    (lambda: CbamModule(32, gate_layer="hard_sigmoid"), "spatial gate 'hardsigmoid'"),
    (lambda: LightCbamModule(32), "spatial conv"),
    (lambda: SEModule(32, add_maxpool=True), "add_maxpool"),
    (lambda: SEModule(32, norm_layer=nn.BatchNorm2d), "norm between"),
    (lambda: torchvision.ops.SqueezeExcitation(32, 8, scale_activation=nn.Tanh), "gate 'tanh'"),
    (lambda: SqueezeExcite(32, act_layer=nn.GELU), "activation 'gelu'"),
    (lambda: LightCbamModule(32).channel, "averaged before the MLP"),
    (lambda: EffectiveSEModule(32), "one 1x1 conv between squeeze and gate"),
    (lambda: EffectiveSEModule(32, add_maxpool=True), "one 1x1 conv between squeeze and gate"),
    (lambda: EcaModule(32), "EcaModule looks like attention"),
    (lambda: CecaModule(32), "CecaModule looks like attention"),
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


def _in_a_model(module, dtype=F64):
    return randomize(nn.Sequential(nn.Conv2d(3, 32, 3), module).to(dtype))


@pytest.mark.parametrize("module, act, gate", [
    (lambda: SqueezeExcite(32, act_layer=nn.SiLU), "silu", "sigmoid"),  # EfficientNet
    (lambda: SqueezeExcite(32, act_layer=nn.Hardswish, gate_layer="hard_sigmoid",
                           force_act_layer=nn.ReLU), "relu", "hardsigmoid"),  # MobileNetV3
    (lambda: SqueezeExcite(32, rd_channels=5, act_layer=Swish, gate_layer=HardSigmoid),
     "silu", "hardsigmoid"),
    (lambda: SqueezeExcite(32, act_layer=SwishMe, gate_layer=HardSigmoidMe), "silu",
     "hardsigmoid"),
    (lambda: SqueezeExcite(32, gate_layer=Sigmoid), "relu", "sigmoid"),
    (lambda: SEModule(32, bias=False, act_layer="silu", gate_layer="hard_sigmoid"), "silu",
     "hardsigmoid"),
    (lambda: SEModule(32, rd_channels=7), "relu", "sigmoid"),  # RegNet's widths
    (lambda: ChannelAttn(32, mlp_bias=True, act_layer=nn.SiLU), "silu", "sigmoid"),
    (lambda: SpatialAttn(3), None, None),
])
@pytest.mark.parametrize("train", [True, False])
def test_timm_attention_variants(module, act, gate, train):
    """timm's SE and CBAM parts with each activation and gate the fused op has, keys kept."""
    model = _in_a_model(module())
    keys = list(model.state_dict())
    converted, _ = _check_converted(model, _image(size=16), train, replaced=1, fused=0)
    assert list(converted.state_dict()) == keys
    if act is None:
        assert isinstance(converted[1], SpatialGate)
    else:
        assert isinstance(converted[1], ChannelGate)
        assert (converted[1].act, converted[1].gate) == (act, gate)


def test_timm_hard_sigmoids_are_the_fused_gate():
    """timm's hard sigmoids compute F.hardsigmoid (the fused gate) exactly; their gradient is
    1/6 on (-3, 3) and 0 outside (F.hardsigmoid's own backward rounds 1/6 to float32, and the
    memory-efficient HardSigmoidMe passes it at exactly -3 and 3 too)."""
    z = torch.linspace(-4, 4, 801, dtype=F64, requires_grad=True)
    expected = F.hardsigmoid(z)
    slope = (z.detach().abs() < 3).to(F64) / 6
    edges = z.detach().abs() == 3
    for gate in (hard_sigmoid, HardSigmoid(), HardSigmoidMe(), nn.Hardsigmoid()):
        y = gate(z)
        assert torch.equal(y, expected)
        grad = torch.autograd.grad(y.sum(), z)[0]
        torch.testing.assert_close(grad[~edges], slope[~edges], rtol=1e-7, atol=0)


def test_channels_last_se_is_left_in_place():
    converted, summary = convert(SqueezeExciteCl(32))
    assert isinstance(converted, SqueezeExciteCl) and "channels-last" in summary.skipped[0][1]


def test_attention_look_alike_is_listed_only_when_nothing_inside_is():
    class WrappedSE(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    converted, summary = convert(nn.Sequential(WrappedSE(SEModule(32)), WrappedSE(nn.Identity())))
    assert [name for name, _ in summary.replaced] == ["0.inner"]
    assert [name for name, _ in summary.skipped] == ["1"]
    assert "WrappedSE looks like attention" in summary.skipped[0][1]


@pytest.mark.parametrize("name", backend.BACKENDS)
def test_convert_whatever_backend_is_forced(name, monkeypatch):
    """The probe runs on the PyTorch backend; the variable applies again afterwards."""
    monkeypatch.setenv(backend.ENV_VAR, name)
    backend.forget_choices()
    model = nn.Sequential(CbamModule(32), SqueezeExcite(32, act_layer=nn.SiLU), SELayer(32, 4))
    x = torch.randn(2, 32, 6, 6)
    expected = model.eval()(x)
    converted, summary = convert(model)
    assert len(summary.replaced) == 3 and not summary.skipped
    assert backend.requested_backend() == name
    if name in ("auto", "torch"):
        torch.testing.assert_close(converted(x), expected)
    else:
        with pytest.raises(RuntimeError, match=f"{backend.ENV_VAR}={name}"):
            converted(x)


def test_linear_se_checkpoints_load_strictly_before_and_after_convert_and_revert():
    """senet.pytorch's se_resnet: keys fc.0/fc.2 stay, with the fused epilogue too."""
    model = se_resnet()
    saved = copy.deepcopy(model.state_dict())
    converted, summary = convert(model)
    assert (len(summary.replaced), len(summary.fused)) == (4, 4)
    converted.load_state_dict(saved)
    se_resnet().load_state_dict(converted.state_dict())
    reverted = revert(converted)
    assert type(reverted.layer1[0].se) is SELayer
    reverted.load_state_dict(saved)
    se_resnet().load_state_dict(reverted.state_dict())
