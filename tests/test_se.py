"""SE against the reference SE block, forward and every gradient."""

import pytest
import torch

from cbam_kernels import SE
from cbam_kernels.reference import SEModule
from gate_testing import check_module

SHAPES = [(2, 24, 5, 7, 4), (1, 17, 3, 3, 16), (3, 8, 1, 1, 2), (2, 33, 9, 11, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("bias", [True, False])
def test_se_matches_reference(device_backend, shape, dtype, fmt, bias):
    *xshape, r = shape
    ours = SE(xshape[1], r, bias=bias)
    ref = SEModule(xshape[1], r, bias=bias)
    check_module(ours, ref, xshape, dtype, fmt, True, device_backend)


@pytest.mark.parametrize("act,gate", [("silu", "sigmoid"), ("relu", "hardsigmoid")])
def test_se_activation_variants_match_torchvision(device_backend, act, gate):
    """EfficientNet-style (SiLU) and MobileNetV3-style (Hardsigmoid) SE blocks."""
    from torch import nn
    from torchvision.ops import SqueezeExcitation

    ref = SqueezeExcitation(20, 6, activation=nn.SiLU if act == "silu" else nn.ReLU,
                            scale_activation=nn.Hardsigmoid if gate == "hardsigmoid"
                            else nn.Sigmoid)
    ours = SE(20, hidden_channels=6, act=act, gate=gate)
    check_module(ours, ref, (2, 20, 5, 3), torch.float32, "nhwc", True, device_backend)
