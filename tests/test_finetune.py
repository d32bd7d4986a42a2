"""cbam_kernels.finetune: parameter groups and staged unfreezing on models with attention."""

import pytest
import timm
import torch
import torchvision

from cbam_kernels import finetune, models
from cbam_kernels.conversion.convert import convert
from cbam_kernels.models import AttendThenPool


def _meta(build, *args, **kwargs):
    with torch.device("meta"):
        return build(*args, **kwargs)


def _timm_cbam():
    return _meta(timm.create_model, "resnet18", block_args=dict(attn_layer="cbam"))


MODELS = {
    "resnet18-cbam": lambda: _meta(models.resnet18, "cbam"),
    "resnet50-se-after-add": lambda: _meta(models.resnet50, "se", "after_add"),
    "vgg11_bn-cbam": lambda: _meta(models.vgg11_bn, "cbam"),
    "timm-resnet18-cbam": _timm_cbam,
    "timm-resnet18-cbam-converted": lambda: convert(_timm_cbam())[0],
    "efficientnet_b0": lambda: _meta(torchvision.models.efficientnet_b0),
    "mobilenet_v3_small": lambda: _meta(torchvision.models.mobilenet_v3_small),
}
ATTENTION_MODULES = {"resnet18-cbam": 8, "resnet50-se-after-add": 16, "vgg11_bn-cbam": 5,
                     "timm-resnet18-cbam": 8, "timm-resnet18-cbam-converted": 8,
                     "efficientnet_b0": 16, "mobilenet_v3_small": 9}
HEAD = {"resnet18-cbam": "fc", "resnet50-se-after-add": "fc", "vgg11_bn-cbam": "classifier",
        "timm-resnet18-cbam": "fc", "timm-resnet18-cbam-converted": "fc",
        "efficientnet_b0": "classifier", "mobilenet_v3_small": "classifier"}


@pytest.mark.parametrize("name", MODELS)
def test_groups_cover_every_parameter_exactly_once(name):
    model = MODELS[name]()
    groups = finetune.param_groups(model, 1e-3, attention_lr=1e-2, head_lr=1e-1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    by_name = {g["name"]: g for g in groups}
    assert {k: g["lr"] for k, g in by_name.items()} == {"backbone": 1e-3, "attention": 1e-2,
                                                        "head": 1e-1}
    head = model.get_submodule(HEAD[name])
    assert {id(p) for p in by_name["head"]["params"]} == {id(p) for p in head.parameters()}
    attention = finetune.attention_module_names(model)
    assert len(attention) == ATTENTION_MODULES[name]
    expected = {id(p) for a in attention for p in model.get_submodule(a).parameters()}
    assert {id(p) for p in by_name["attention"]["params"]} == expected


def test_groups_build_an_optimizer_and_default_rates():
    model = models.resnet18(num_classes=10)
    groups = finetune.param_groups(model, 0.1, head="fc")
    assert [g["name"] for g in groups] == ["backbone", "head"]  # no attention: group left out
    optimizer = torch.optim.SGD(groups, lr=1.0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.1]


def test_backbone_stages():
    assert finetune.backbone_stages(MODELS["resnet18-cbam"]()) == [
        ["conv1"], ["bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    vgg = MODELS["vgg11_bn-cbam"]()
    stages = finetune.backbone_stages(vgg)
    assert len(stages) == 5 and stages[0] == ["features.0", "features.1", "features.2",
                                              "features.3"]
    assert all(isinstance(vgg.get_submodule(s[-1]), AttendThenPool) for s in stages)
    assert finetune.backbone_stages(MODELS["efficientnet_b0"]()) == [
        [f"features.{i}"] for i in range(9)]


@pytest.mark.parametrize("name", ["resnet18-cbam", "timm-resnet18-cbam"])
def test_staged_unfreezing(name):
    model = MODELS[name]()
    head = finetune.unfreeze(model, "head")
    assert head == ["fc.weight", "fc.bias"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == head
    middle = finetune.unfreeze(model, "attention", last_stages=1)
    attention = [n for n in middle if ".cbam." in n or ".se." in n]
    assert len({n.split(".")[0] + n.split(".")[1] for n in attention}) == 8
    assert set(middle) - set(attention) - set(head) == {
        n for n, _ in model.named_parameters() if n.startswith("layer4.") and n not in attention}
    everything = finetune.unfreeze(model, "all")
    assert everything == [n for n, _ in model.named_parameters()]
    assert len(finetune.unfreeze(model, "attention", last_stages=100)) == len(everything)


def test_only_unfrozen_parameters_train():
    torch.manual_seed(0)
    model = models.resnet18("se", num_classes=10)
    finetune.unfreeze(model, "head")
    optimizer = torch.optim.SGD(finetune.param_groups(model, 0.1), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"fc.weight", "fc.bias"}


def test_clear_errors():
    model = MODELS["resnet18-cbam"]()
    with pytest.raises(ValueError, match=r"stage must be one of \('head', 'attention', 'all'\)"):
        finetune.unfreeze(model, "stem")
    with pytest.raises(ValueError, match="last_stages must be >= 0"):
        finetune.unfreeze(model, "attention", last_stages=-1)
    with pytest.raises(ValueError, match="head 'classifier' is not a submodule"):
        finetune.param_groups(model, 0.1, head="classifier")
