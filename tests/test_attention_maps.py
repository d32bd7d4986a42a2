"""capture_attention and plot_spatial_maps: the maps of fused modules equal those of the eager
originals with the same weights; capturing changes nothing else."""

import copy
import sys
from collections import OrderedDict

import pytest
import torch
import torchvision
from timm.layers.cbam import CbamModule, LightCbamModule
from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
from torch import nn

from cbam_kernels import (CBAM, SE, ChannelGate, SpatialGate, capture_attention, convert,
                          plot_spatial_maps, reference)
from cbam_kernels.attention_maps import find_attention
from cbam_kernels.conversion import recognise
from cbam_kernels.models import resnet18
from model_testing import randomize


def assert_same_maps(actual, expected):
    assert list(actual) == list(expected)
    for name in expected:
        for field in ("channel", "spatial"):
            a, e = getattr(actual[name], field), getattr(expected[name], field)
            assert (a is None) == (e is None), (name, field)
            if e is not None:
                torch.testing.assert_close(a, e, msg=f"{name} {field}")


def captured(model, x):
    with capture_attention(model) as maps:
        model(x)
    return maps


@pytest.mark.parametrize("kind", ["cbam", "se"])
def test_fused_resnet_maps_equal_reference(kind):
    torch.manual_seed(0)
    ref = randomize(resnet18(attention=kind, reference=True, num_classes=10))
    fused = resnet18(attention=kind, num_classes=10)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):
        maps = captured(fused.train(train), x)
        assert_same_maps(maps, captured(ref.train(train), x))
    assert len(maps) == 8
    first = maps["layer1.0." + kind]
    assert first.channel.shape == (2, 64)
    assert first.spatial is None if kind == "se" else first.spatial.shape == (2, 16, 16)
    assert maps["layer4.1." + kind].channel.shape == (2, 512)


def test_originals_maps_equal_converted():
    """timm's CbamModule and SEModule, torchvision's SqueezeExcitation (hardsigmoid gate) and
    the reference modules, captured as they are and after conversion."""
    torch.manual_seed(0)
    model = randomize(nn.Sequential(
        CbamModule(32), SEModule(32, rd_channels=8),
        torchvision.ops.SqueezeExcitation(32, 8, scale_activation=nn.Hardsigmoid),
        reference.OfficialCBAM(32, 4), reference.TimmCBAM(32), reference.SEBlock(32, 4),
        reference.OfficialCBAM(32, 4, no_spatial=True))).eval()
    x = torch.randn(2, 32, 7, 9)
    original = captured(model, x)
    fused, summary = convert(copy.deepcopy(model))
    assert len(summary.replaced) == 7
    assert_same_maps(captured(fused, x), original)
    assert [m.spatial is not None for m in original.values()] == [1, 0, 0, 1, 1, 0, 0]
    assert original["0"].spatial.shape == (2, 7, 9)


@pytest.mark.parametrize("style", ["official", "timm"])
def test_standalone_gates(style):
    torch.manual_seed(0)
    pairs = [(ChannelGate(16, 4, style="official"), reference.OfficialChannelGate(16, 4)),
             (SpatialGate(7, style), reference.OfficialSpatialGate(7) if style == "official"
              else reference.TimmSpatialAttn(7))]
    x = torch.randn(3, 16, 5, 6)
    for fused, ref in pairs:
        randomize(ref).eval()
        fused.load_state_dict(ref.state_dict())
        fused.eval()
        assert_same_maps(captured(fused, x), captured(ref, x))


def test_capture_changes_nothing():
    """Same outputs and running statistics with and without capture (training mode); hooks gone
    afterwards, also after an error."""
    torch.manual_seed(0)
    model = CBAM(16, 4).train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 16, 5, 5)
    with capture_attention(model) as maps:
        y = model(x)
    torch.testing.assert_close(y, twin(x), rtol=0, atol=0)
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(a, b), name
    assert maps[""].spatial.shape == (2, 5, 5)  # the model itself is the attention module
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(model):
            raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in model.modules())


class PlainSE(nn.Module):
    """An SE block of a pool and a Sequential of five: no structure recognise knows."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(8, 2), nn.ReLU(), nn.Linear(2, 8),
                                nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(self.pool(x))[:, :, None, None]


@pytest.mark.parametrize("module, fields", [
    (CbamModule(8), ("channel", "spatial")),
    (LightCbamModule(8), ("spatial",)),  # not convertible; its channel sigmoid is a function
    (EffectiveSEModule(8), ("channel",)),  # recognised, never converted
    (SEModule(8, rd_channels=2, add_maxpool=True), ("channel",)),
    (reference.OfficialCBAM(8, 2, no_spatial=True), ("channel",)),
    (PlainSE(), ()),
    (nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Sequential(nn.Flatten(), nn.Sigmoid())), ()),
])
def test_captured_exactly_as_recognised(module, fields):
    """capture_attention takes the module for what recognise.identify says it is (convertible
    or not) and reads the maps where the match says, and captures nothing identify rejects."""
    match = recognise.identify(module)
    assert (match is None) == (not fields)
    assert list(find_attention(module)) == ([] if match is None else [""])
    if match is None:
        with pytest.raises(ValueError, match="no CBAM or SE module"):
            captured(module, torch.randn(2, 8, 5, 6))
        return
    assert recognise.is_attention(module)
    maps = captured(module.eval(), torch.randn(2, 8, 5, 6))[""]
    assert tuple(f for f in ("channel", "spatial") if getattr(maps, f) is not None) == fields
    shapes = {"channel": (2, 8), "spatial": (2, 5, 6)}
    assert all(getattr(maps, f).shape == shapes[f] for f in fields)


def test_capture_follows_the_recognisers(monkeypatch):
    """Without timm's CbamModule recogniser, capture_attention no longer knows the module as a
    whole (only its standalone-recognised parts, under their own names)."""
    module = CbamModule(8)
    assert [tap.module for tap in find_attention(module)[""]] == [module.channel.gate,
                                                                  module.spatial.gate]
    monkeypatch.setattr(recognise, "RECOGNISERS", tuple(
        r for r in recognise.RECOGNISERS if r is not recognise.timm_cbam))
    assert recognise.identify(module) is None
    assert recognise.identify(module.channel).kind == "timm ChannelAttn"
    assert list(find_attention(module)) == ["channel", "spatial"]


def test_no_attention_is_an_error():
    with pytest.raises(ValueError, match="no CBAM or SE module"):
        with capture_attention(nn.Sequential(nn.Conv2d(3, 3, 1))):
            pass


def test_plot_spatial_maps(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        layer1=nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), CBAM(16, 4), SE(16, 4)),
        layer2=nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), CBAM(16, 4), CBAM(16, 4)))).eval()
    image = torch.rand(3, 32, 32)
    path = tmp_path / "maps.png"
    with capture_attention(model) as maps:
        model(image[None])
    stages = plot_spatial_maps(model, image, path, title="random")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert list(stages) == ["layer1", "layer2"]  # each stage's last map
    torch.testing.assert_close(stages["layer1"], maps["layer1.1"].spatial[0])
    torch.testing.assert_close(stages["layer2"], maps["layer2.2"].spatial[0])
    with pytest.raises(ValueError, match="no attention module with a spatial gate"):
        plot_spatial_maps(SE(3, 1), image, path)


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="needs matplotlib"):
        plot_spatial_maps(SE(8, 4), torch.rand(3, 4, 4), tmp_path / "x.png")
