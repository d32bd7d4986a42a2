"""ChannelGate against the reference channel attention, forward and every gradient."""

import pytest
import torch

from cbam_kernels import ChannelGate
from cbam_kernels.reference import OfficialChannelGate, TimmChannelAttn
from gate_testing import check_module

SHAPES = [(2, 24, 5, 7, 4), (1, 17, 3, 3, 16), (3, 8, 1, 1, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("style", ["official", "timm"])
def test_channel_gate_matches_reference(device_backend, shape, dtype, fmt, style):
    *xshape, r = shape
    c = xshape[1]
    ours = ChannelGate(c, r, style=style)
    ref = OfficialChannelGate(c, r) if style == "official" else TimmChannelAttn(c, 1 / r)
    check_module(ours, ref, xshape, dtype, fmt, True, device_backend)


@pytest.mark.parametrize("pool_types", [("avg",), ("max",)])
def test_channel_gate_pool_types(device_backend, pool_types):
    ours = ChannelGate(12, 4, pool_types=pool_types)
    ref = OfficialChannelGate(12, 4, pool_types=pool_types)
    check_module(ours, ref, (2, 12, 4, 3), torch.float32, "nchw", True, device_backend)
