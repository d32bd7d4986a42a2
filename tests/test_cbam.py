"""CBAM (both parameterisations) against the eager reference, forward and every gradient."""

import pytest
import torch

from cbam_kernels import CBAM
from cbam_kernels.reference import OfficialCBAM, TimmCBAM
from gate_testing import check_module, skip_ill_conditioned

# (N, C, H, W, reduction): odd H*W, C not a multiple of r or 16, N=1, 1x1 maps.
SHAPES = [(2, 24, 5, 7, 4), (1, 17, 3, 3, 16), (3, 8, 1, 1, 2), (2, 33, 9, 11, 8)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def build(style, c, r, k=7, no_spatial=False, pool_types=("avg", "max")):
    """The fused module and its reference with the same configuration."""
    ours = CBAM(c, r, k, pool_types=pool_types, no_spatial=no_spatial, style=style)
    if style == "official":
        ref = OfficialCBAM(c, r, pool_types=pool_types, no_spatial=no_spatial, kernel_size=k)
    else:
        ref = TimmCBAM(c, rd_ratio=1 / r, spatial_kernel_size=k)
    return ours, ref


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("style", ["official", "timm"])
def test_cbam_matches_reference(device_backend, shape, dtype, fmt, train, style):
    *xshape, r = shape
    skip_ill_conditioned(xshape, train)
    ours, ref = build(style, xshape[1], r)
    check_module(ours, ref, xshape, dtype, fmt, train, device_backend)


@pytest.mark.parametrize("pool_types", [("avg",), ("max",), ("max", "avg")])
@pytest.mark.parametrize("no_spatial", [False, True])
@pytest.mark.parametrize("k", [3, 7])
def test_cbam_options(device_backend, pool_types, no_spatial, k):
    ours, ref = build("official", 20, 4, k, no_spatial, pool_types)
    check_module(ours, ref, (2, 20, 6, 5), torch.float32, "nhwc", True, device_backend)


def test_autocast(device_backend):
    """Under torch.autocast the module takes the low-precision activation with float32
    parameters and returns the activation's dtype; gradients reach every parameter."""
    from gate_testing import rel_err

    dtype = torch.bfloat16
    conv = torch.nn.Conv2d(3, 16, 3, padding=1).to(device_backend)
    ours, ref = build("official", 16, 4)
    ours.load_state_dict(ref.state_dict())
    ours.to(device_backend)
    ref.to(device_backend)
    x = torch.randn(2, 3, 8, 8, device=device_backend)
    with torch.autocast(device_type=torch.device(device_backend).type, dtype=dtype):
        got, eager = ours(conv(x)), ref(conv(x))
    truth = ref(conv(x))
    assert got.dtype == dtype
    assert rel_err(got, truth) <= max(2 * rel_err(eager, truth), torch.finfo(dtype).eps)
    got.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())
