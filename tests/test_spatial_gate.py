"""SpatialGate against the reference spatial attention, including BatchNorm running stats."""

import pytest
import torch
from torch import nn

from cbam_kernels import SpatialGate
from cbam_kernels.reference import OfficialSpatialGate, TimmSpatialAttn
from gate_testing import check_module, distinct_max_input, skip_ill_conditioned

SHAPES = [(2, 24, 5, 7), (2, 1, 6, 5), (1, 17, 3, 3), (3, 8, 1, 1)]


def build(style, k=7):
    ref = OfficialSpatialGate(k) if style == "official" else TimmSpatialAttn(k)
    return SpatialGate(k, style=style), ref


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("style", ["official", "timm"])
def test_spatial_gate_matches_reference(device_backend, shape, dtype, fmt, train, style):
    skip_ill_conditioned(shape, train)
    ours, ref = build(style)
    check_module(ours, ref, shape, dtype, fmt, train, device_backend)


def test_spatial_gate_kernel_3(device_backend):
    ours, ref = build("official", 3)
    check_module(ours, ref, (2, 5, 4, 6), torch.float32, "nhwc", True, device_backend)


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_running_stats_follow_batchnorm(device_backend, momentum):
    """Several training steps: running_mean/var/num_batches_tracked as nn.BatchNorm2d."""
    ours, ref = build("official")
    for m in (ours.spatial.bn, ref.spatial.bn):
        m.momentum = momentum
    ours.load_state_dict(ref.state_dict())
    ours.to(device_backend)
    ref.to(device_backend)
    for _ in range(3):
        x = distinct_max_input((3, 6, 5, 4), torch.float32, device_backend)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_sync_batchnorm_runs_unfused_in_training(device_backend):
    """After convert_sync_batchnorm the norm's own logic applies (eval mode stays fused)."""
    ours, ref = build("official")
    ours.load_state_dict(ref.state_dict())
    ours = nn.SyncBatchNorm.convert_sync_batchnorm(ours).to(device_backend).eval()
    assert isinstance(ours.spatial.bn, nn.SyncBatchNorm) and ours.fusable()
    ours.train()
    assert not ours.fusable()
    ref.to(device_backend).eval()
    x = distinct_max_input((2, 6, 5, 4), torch.float32, device_backend)
    torch.testing.assert_close(ours.eval()(x), ref(x), rtol=1e-5, atol=1e-6)
