"""cbam_kernels.convert on whole timm models on the CPU, one training step each, in float64.

Each model is compared with an untouched deep copy of itself (``model_testing.check_same``):
output, input gradient, every parameter gradient and the BatchNorm running statistics after the
step, within the float64 bound of ``model_testing.tolerance``. Float64, because whole randomly
initialised networks on 2 x 3 x 48 x 48 inputs (train-mode BatchNorms over 8 values per channel
in the last stage) are too ill-conditioned for float32: regnety_002's input gradient in float32
differs from its own float64 one by 100 %, so two float32 runs that round differently cannot
be compared. The float32 fused kernels are compared with the reference elsewhere, op by op.
"""

import pytest
import timm
import torch

from cbam_kernels import CBAM, SE
from model_testing import check_same, converted_pair, randomize

MODELS = {  # name -> (create_model arguments, attention modules, fused residual epilogues)
    "efficientnet_b0": ({}, 16, 0),
    "mobilenetv3_large_100": ({}, 8, 0),
    "regnety_002": ({}, 13, 0),
    "seresnext26d_32x4d": ({}, 8, 8),
    "resnet50-cbam": (dict(block_args=dict(attn_layer="cbam")), 16, 16),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_training_step_matches_the_original(name):
    kwargs, replaced, fused = MODELS[name]
    model = randomize(timm.create_model(name.split("-")[0], pretrained=False, num_classes=10,
                                        **kwargs)).train().double()
    keys = list(model.state_dict())
    converted, summary, original = converted_pair(model)
    assert (len(summary.replaced), len(summary.fused), summary.skipped) == (replaced, fused, [])
    assert list(converted.state_dict()) == keys
    assert all(isinstance(converted.get_submodule(n), CBAM if "cbam" in name else SE)
               for n, _ in summary.replaced)
    check_same(converted, original, torch.randn(2, 3, 48, 48, dtype=torch.float64), train=True)
