"""cbam_kernels.models: builders against torchvision, official checkpoints, add_attention.

Key and shape comparisons build both models on the meta device (no memory, no init time).
Numerical comparisons run in float64 (``model_testing.check_same``).
"""

import pytest
import torch
import torchvision
from torch import nn

from cbam_kernels import CBAM, SE, models, reference
from cbam_kernels.models.resnet import ResidualBlock
from model_testing import (OfficialBasicBlock, OfficialResNet, check_same, converted_pair,
                           randomize)

F64 = torch.float64
RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
VGGS = [f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")]


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _meta(build, *args, **kwargs):
    with torch.device("meta"):
        return build(*args, **kwargs)


def _image(size=64):
    return torch.randn(2, 3, size, size, dtype=F64)


def _same_weights(ours, ref):
    ours.load_state_dict(ref.state_dict())
    return ours


@pytest.mark.parametrize("name", RESNETS + VGGS)
def test_backbone_keys_equal_torchvision(name):
    ours, theirs = _meta(getattr(models, name)), _meta(getattr(torchvision.models, name))
    assert list(_shapes(ours).items()) == list(_shapes(theirs).items())


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg11_bn"])
@pytest.mark.parametrize("attention", models.KINDS)
def test_torchvision_weights_load_with_only_attention_keys_missing(name, attention):
    ours = _meta(getattr(models, name), attention)
    result = ours.load_state_dict(_meta(getattr(torchvision.models, name)).state_dict(),
                                  strict=False, assign=True)
    assert not result.unexpected_keys
    assert result.missing_keys and all(f".{attention}." in k for k in result.missing_keys)
    blocks = 8 if name == "resnet18" else 16 if name == "resnet50" else 5
    prefixes = {k.split(f".{attention}.")[0] for k in result.missing_keys}
    assert len(prefixes) == blocks


def test_cbam_keys_follow_the_official_repository():
    keys = [k for k in _meta(models.resnet50, "cbam").state_dict() if k.startswith("layer1.0.cbam")]
    assert keys == ["layer1.0.cbam." + k for k in (
        "ChannelGate.mlp.1.weight", "ChannelGate.mlp.1.bias", "ChannelGate.mlp.3.weight",
        "ChannelGate.mlp.3.bias", "SpatialGate.spatial.conv.weight",
        "SpatialGate.spatial.bn.weight", "SpatialGate.spatial.bn.bias",
        "SpatialGate.spatial.bn.running_mean", "SpatialGate.spatial.bn.running_var",
        "SpatialGate.spatial.bn.num_batches_tracked")]
    assert _shapes(_meta(models.resnet50, "cbam"))["layer1.0.cbam.ChannelGate.mlp.1.weight"] == (
        16, 256)


@pytest.mark.parametrize("train", [True, False])
def test_official_checkpoint_loads(tmp_path, train):
    official = randomize(OfficialResNet(OfficialBasicBlock, [2, 2, 2, 2], num_classes=10))
    state = {"module." + k: v for k, v in official.state_dict().items()}
    path = tmp_path / "RESNET18_IMAGENET_CBAM_checkpoint.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet", "state_dict": state, "best_prec1": 70.0}, path)
    ours = models.resnet18("cbam", num_classes=10)
    result = models.load_checkpoint(ours, path)
    assert not result.missing_keys and not result.unexpected_keys
    check_same(ours.to(F64), official.to(F64), _image(), train)


@pytest.mark.parametrize("attention", models.KINDS)
@pytest.mark.parametrize("placement", models.PLACEMENTS)
@pytest.mark.parametrize("train", [True, False])
def test_fused_equals_reference(attention, placement, train):
    ref = randomize(models.resnet18(attention, placement, reference=True, num_classes=10))
    ours = _same_weights(models.resnet18(attention, placement, num_classes=10), ref)
    check_same(ours.to(F64), ref.to(F64), _image(), train)


@pytest.mark.parametrize("attention, module, reference_module", [
    ("cbam", CBAM, reference.OfficialCBAM), ("se", SE, reference.SEModule)])
def test_resnet50_reference_for_the_benchmark(attention, module, reference_module):
    ref = models.resnet50(attention, reference=True, num_classes=10)
    assert all(type(b.attention) is reference_module for b in ref.blocks())
    ours = _same_weights(models.resnet50(attention, num_classes=10), randomize(ref))
    assert all(type(b.attention) is module for b in ours.blocks())
    check_same(ours.to(F64), ref.to(F64), _image(32), train=False)


def test_resnet50_without_attention_matches_torchvision():
    ref = randomize(torchvision.models.resnet50(num_classes=10))
    ours = _same_weights(models.resnet50(num_classes=10), ref)
    check_same(ours.to(F64), ref.to(F64), _image(32), train=False)


def test_convert_turns_the_reference_build_into_the_fused_one():
    model = randomize(models.resnet18("cbam", reference=True, num_classes=10)).to(F64)
    converted, summary, original = converted_pair(model)
    assert len(summary.replaced) == len(summary.fused) == 8 and not summary.skipped
    assert all(isinstance(b.attention, CBAM) for b in converted.blocks())
    check_same(converted, original, _image(), train=True)


@pytest.mark.parametrize("attention", models.KINDS)
def test_vgg_attention_before_each_pool(attention):
    ref = models.vgg11_bn(attention, reference=True, num_classes=10)
    pools = [(i, m) for i, m in enumerate(ref.features) if isinstance(m, models.AttendThenPool)]
    assert [i for i, _ in pools] == [3, 7, 14, 21, 28]
    assert all(isinstance(ref.features[i - 1], nn.ReLU) for i, _ in pools)
    assert [ref.features[i - 3].out_channels for i, _ in pools] == [64, 128, 256, 512, 512]
    ours = _same_weights(models.vgg11_bn(attention, num_classes=10), randomize(ref))
    check_same(ours.features.to(F64), ref.features.to(F64), _image(32), train=True)


def test_add_attention_to_torchvision_resnet():
    tv = randomize(torchvision.models.resnet18(num_classes=10))
    backbone = dict(tv.named_parameters())
    models.add_attention(tv, "cbam")
    assert all(isinstance(b, ResidualBlock) and isinstance(b.cbam, CBAM)
               for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4) for b in layer)
    params = dict(tv.named_parameters())
    assert all(params[k] is p for k, p in backbone.items())
    ours = _same_weights(models.resnet18("cbam", num_classes=10), tv)
    check_same(ours.to(F64), tv.to(F64), _image(), train=True)


def test_add_attention_to_torchvision_vgg_after_add_and_eval():
    vgg = _meta(torchvision.models.vgg11, num_classes=10).eval()
    models.add_attention(vgg, "se")
    assert set(vgg.state_dict()) == set(_meta(models.vgg11, "se", num_classes=10).state_dict())
    assert not vgg.features[2].se.training
    resnet = torchvision.models.resnet18().to(F64)
    models.add_attention(resnet, "se", "after_add")
    assert resnet.layer1[0].placement == "after_add" and resnet.layer1[0].se.fc1.weight.dtype == F64


@pytest.mark.parametrize("call, message", [
    (lambda: models.resnet18("bam"), "attention must be None or one of ('se', 'cbam')"),
    (lambda: models.resnet18("se", "middle"),
     "placement must be one of ('before_add', 'after_add')"),
    (lambda: models.vgg16("eca"), "attention must be None or one of ('se', 'cbam')"),
    (lambda: models.add_attention(_meta(models.resnet18), None), "needs a kind"),
    (lambda: models.add_attention(_meta(models.resnet18, "se"), "cbam"),
     "layer1.0 already has 'se' attention"),
    (lambda: models.add_attention(_meta(models.vgg11), "se", "after_add"), "leave it None"),
])
def test_clear_errors(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_add_attention_rejects_other_models():
    with pytest.raises(TypeError, match="torchvision-style ResNet"):
        models.add_attention(nn.Linear(2, 2), "se")
    tv = _meta(torchvision.models.resnet18)
    tv.layer2[1].extra = nn.Identity()
    with pytest.raises(TypeError, match="layer2.1 is a BasicBlock with children"):
        models.add_attention(tv, "se")
    assert not isinstance(tv.layer1[0], ResidualBlock)  # nothing changed before the error
