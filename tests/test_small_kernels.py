"""The PyTorch small kernels (``ops.torch.small_kernels``): what the CUDA backend runs between
its C++ passes where Triton cannot serve the GPU (sm_75, or Triton not installed).

* Each small kernel on its own, on partials split into S > 1 ranges (ties across ranges, NaN),
  against the specification: the same NamedTuples, shapes, dtypes and contents as the Triton
  kernels (the parameter-gradient inputs as the grad-input tail sums them), and, under
  ``TRITON_INTERPRET=1``, against the Triton kernels themselves on the same partials.
* The whole gate on the CPU through the CUDA emulation (``tests/cuda_emulation``):
  ``KernelPipeline(<emulated C++ passes>, ops.torch.small_kernels)`` against the float64
  specification pipeline (every saved tensor, the running statistics, every gradient; CBAM in
  both parameterisations, SE, each gate alone; training and eval; the residual epilogue;
  float32/float16/bfloat16; NCHW and channels_last; odd shapes), and the fused modules routed
  through it against the eager references; and the same pipeline with Triton not installed.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbam_kernels import CBAM, SE, ChannelGate, SpatialGate
from cbam_kernels.ops import backend
from cbam_kernels.ops.kernel_pipeline import KernelPipeline
from cbam_kernels.ops.torch import pipeline as spec
from cbam_kernels.ops.torch import small_kernels as small
from cbam_kernels.ops.types import (BatchNormState, ChannelSaved, GateConfig, GateParams,
                                    Partials, SpatialSaved)
from cbam_kernels.reference import (OfficialCBAM, OfficialChannelGate, OfficialSpatialGate,
                                    SEModule, TimmCBAM, TimmChannelAttn, TimmSpatialAttn)
from conftest import INTERPRET
from gate_testing import check_module, distinct_max_input, skip_ill_conditioned
from pass_testing import check_small, to_layout
from test_gate_op import (PIPELINE_SHAPES, check_against_spec, check_pipeline, gate_inputs,
                          ill_conditioned, references, results, running_stats)

F32 = torch.float32
HAS_COMPILER = shutil.which("c++") is not None
needs_emulation = pytest.mark.skipif(not HAS_COMPILER,
                                     reason="the CUDA emulation needs a host C++ compiler (c++)")


# ------------------------------------------------------------------ partials and references

def split_partials(values, ranges, divisor, with_max=True):
    """The :class:`Partials` of a reduction of ``values`` (N, K, L) over L cut into ``ranges``
    consecutive ranges, as the kernel passes write them: per range the sum divided by
    ``divisor``, the max and the index (along the whole of L) of its first occurrence (a NaN
    the max, its first one)."""
    sums, maxes, args = [], [], []
    for idx in torch.arange(values.shape[2]).tensor_split(ranges):
        part = values[:, :, idx]
        sums.append(part.sum(dim=2) / divisor)
        mx, arg = part.max(dim=2)
        maxes.append(mx)
        args.append((arg + idx[0]).to(torch.int32))
    stacked = [torch.stack(t).contiguous() for t in (sums, maxes, args)]
    return Partials(*stacked) if with_max else Partials(stacked[0])


def hw_partials(x, ranges, with_max=True):
    """pool_hw's partials of x (N, C, H, W): (S, N, C)."""
    n, c, h, w = x.shape
    return split_partials(x.float().reshape(n, c, h * w), ranges, h * w, with_max)


def c_partials(x1, ranges):
    """channel_pool's partials of x1 = x * ca (N, C, H, W): (S, N, H*W)."""
    n, c, h, w = x1.shape
    return split_partials(x1.float().reshape(n, c, h * w).transpose(1, 2), ranges, c)


def tie_input(shape, nan=False, seed=3):
    """Small integers (maxima tied within and across ranges), with NaN in one (n, c) row at
    two positions and at one pixel across every channel when ``nan``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 2, shape, generator=g).float()
    if nan:
        x[0, 0, -1, -1] = x[0, 0, 0, 1] = float("nan")
        x[-1, :, 0, 0] = float("nan")
    return x


def mlp_params(c, r, conv, bias, dtype=F32):
    """w1, b1, w2, b2: Linear (R, C) / (C, R) or 1x1-conv (R, C, 1, 1) / (C, R, 1, 1) weights."""
    g = torch.Generator().manual_seed(5)
    tail = (1, 1) if conv else ()
    w1 = torch.randn(r, c, *tail, generator=g).to(dtype)
    w2 = torch.randn(c, r, *tail, generator=g).to(dtype)
    b1, b2 = (torch.randn(r, generator=g).to(dtype), torch.randn(c, generator=g).to(dtype))
    return (w1, b1, w2, b2) if bias else (w1, None, w2, None)


def spatial_params(k, affine=True, dtype=F32, channels_last=False):
    """conv_w (1, 2, k, k) and the BatchNorm affine terms."""
    g = torch.Generator().manual_seed(6)
    conv_w = torch.randn(1, 2, k, k, generator=g).to(dtype)
    if channels_last:
        conv_w = conv_w.contiguous(memory_format=torch.channels_last)
    if not affine:
        return conv_w, None, None
    return conv_w, torch.rand(1, generator=g).to(dtype) + 0.5, torch.randn(1, generator=g).to(dtype)


def batch_norm(batch_stats, momentum=0.1, dtype=F32):
    """A BatchNorm state with running statistics and num_batches_tracked = 3."""
    mean, var = running_stats(dtype, "cpu")
    return BatchNormState(mean, var, torch.tensor(3), 1e-5, momentum, batch_stats)


def clone_bn(bn):
    return bn._replace(running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone(),
                       num_batches_tracked=bn.num_batches_tracked.clone())


def check_close(got, want, rtol=1e-5, atol=1e-5):
    """A small float32/int32 result of ours: contiguous, the expected shape and dtype, equal
    (int32 exactly, NaN where ``want`` has NaN)."""
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    if got.dtype == torch.int32:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)


# ------------------------------------------------------------------ each small kernel alone

CHANNEL_CASES = [  # (x shape, ranges, ties and NaN)
    ((2, 13, 5, 7), 3, "random"), ((3, 13, 4, 5), 4, "ties"), ((2, 6, 5, 3), 3, "nan"),
    ((1, 13, 1, 2), 2, "random")]


def channel_input(shape, kind):
    """x for a small kernel test: distinct maxima ("random"), N(0, 1) values ("normal": 1x1
    maps, whose spikes of distinct_max_input would leave the BatchNorm almost no variance to
    normalise), or ties and NaN (:func:`tie_input`)."""
    if kind == "random":
        return distinct_max_input(shape, F32, "cpu")
    if kind == "normal":
        return torch.randn(shape, generator=torch.Generator().manual_seed(4))
    return tie_input(shape, nan=kind == "nan")


@pytest.mark.parametrize("shape,ranges,kind", CHANNEL_CASES, ids=str)
@pytest.mark.parametrize("pools", [(True, True), (True, False), (False, True)], ids=str)
@pytest.mark.parametrize("mlp", ["linear-bias", "conv-nobias"])
@pytest.mark.parametrize("act,gate", [("relu", "sigmoid"), ("silu", "hardsigmoid")])
def test_channel_mlp(shape, ranges, kind, pools, mlp, act, gate):
    """ca, pooled, hidden and pstar from split partials as the specification computes them
    from x; pstar the first arg-max over H*W (the earliest range among equal maxima, the first
    NaN)."""
    x = channel_input(shape, kind)
    n, c = shape[:2]
    w1, b1, w2, b2 = mlp_params(c, 4, mlp.startswith("conv"), mlp.endswith("-bias"))
    cfg = GateConfig(*pools, act, gate)
    part = hw_partials(x, ranges, with_max=pools[1])
    assert part.sum.shape[0] == ranges > 1
    got = small.channel_mlp(part, w1, b1, w2, b2, *pools, act, gate)
    _, want, _ = spec.forward(x, None, GateParams(w1, b1, w2, b2), cfg, BatchNormState())
    assert isinstance(got, ChannelSaved)
    k = sum(pools)
    assert got.pooled.shape == (k, n, c) and got.hidden.shape == (k, n, 4)
    for name in ("ca", "pooled", "hidden"):
        check_close(getattr(got, name), getattr(want, name))
    if pools[1]:
        check_close(got.pstar, want.pstar)
    else:
        assert got.pstar is None


@pytest.mark.parametrize("pools", [(True, True), (True, False), (False, True)], ids=str)
@pytest.mark.parametrize("mlp", ["linear-bias", "conv-nobias"])
@pytest.mark.parametrize("act,gate", [("relu", "sigmoid"), ("silu", "hardsigmoid")])
def test_mlp_backward(pools, mlp, act, gate):
    """ga / gm as the specification's backward gives them; gz and ghidden such that the
    grad-input tail's sums (gW1 = sum ghidden (x) pooled, gb1 = sum ghidden,
    gW2 = sum gz (x) act(hidden), gb2 = K sum gz; csrc ParamTasks) are the specification's
    parameter gradients."""
    n, c, r, s = 3, 13, 4, 3
    x = distinct_max_input((n, c, 5, 7), F32, "cpu")
    w1, b1, w2, b2 = mlp_params(c, r, mlp.startswith("conv"), mlp.endswith("-bias"))
    saved = small.channel_mlp(hw_partials(x, 2, pools[1]), w1, b1, w2, b2, *pools, act, gate)
    grad = Partials(torch.randn(s, n, c))
    got = small.mlp_backward(grad, saved, w1, w2, *pools, act, gate)
    gz = grad.sum.sum(dim=0) * spec.gate_grad_from_output(saved.ca, gate)
    gpooled, (gw1, gb1, gw2, gb2) = spec.mlp_backward(gz, saved.pooled, saved.hidden, w1, b1,
                                                      w2, b2, act)
    check_close(got.gz, gz)
    assert (got.ga is None) != pools[0] and (got.gm is None) != pools[1]
    for g, want, used in ((got.ga, gpooled[0], pools[0]), (got.gm, gpooled[-1], pools[1])):
        if used:
            check_close(g, want)
    assert got.ghidden.shape == saved.hidden.shape and got.ghidden.dtype == F32
    k = sum(pools)
    tail = {"gw1": torch.einsum("knr,knc->rc", got.ghidden, saved.pooled),
            "gw2": torch.einsum("nc,knr->cr", got.gz, spec.activation(saved.hidden, act)),
            "gb1": got.ghidden.sum(dim=(0, 1)), "gb2": k * got.gz.sum(dim=0)}
    for name, want in (("gw1", gw1), ("gw2", gw2), ("gb1", gb1), ("gb2", gb2)):
        if want is not None:
            torch.testing.assert_close(tail[name], want.reshape(tail[name].shape), rtol=1e-5,
                                       atol=1e-5)


SPATIAL_CASES = [((2, 40, 5, 7), 3, "random"), ((3, 24, 4, 4), 4, "ties"),
                 ((2, 12, 3, 5), 2, "nan"), ((12, 9, 1, 1), 3, "normal")]


@pytest.mark.parametrize("shape,ranges,kind", SPATIAL_CASES, ids=str)
@pytest.mark.parametrize("max_first", [True, False], ids=["max_first", "mean_first"])
@pytest.mark.parametrize("batch_stats,momentum", [(True, 0.1), (True, None), (False, 0.1)],
                         ids=["train", "train-cumulative", "eval"])
def test_spatial_gate(shape, ranges, kind, max_first, batch_stats, momentum):
    """sa, p, cstar, xhat and stats from split partials as the specification computes them
    from x (the spatial gate alone), and the running statistics after the step (in training:
    momentum and cumulative average, num_batches_tracked counted)."""
    x = channel_input(shape, kind)
    n, _, h, w = shape
    conv_w, bn_w, bn_b = spatial_params(5)
    bn_ours = batch_norm(batch_stats, momentum)
    bn_spec = clone_bn(bn_ours)
    part = c_partials(x, ranges)
    assert part.sum.shape[0] == ranges > 1
    got = small.spatial_gate(part, conv_w, bn_w, bn_b, bn_ours, max_first, h, w)
    cfg = GateConfig(max_first=max_first)
    _, _, want = spec.forward(x, None, GateParams(conv_w=conv_w, bn_w=bn_w, bn_b=bn_b), cfg,
                              bn_spec)
    assert isinstance(got, SpatialSaved)
    for name in SpatialSaved._fields:
        check_close(getattr(got, name), getattr(want, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn_ours, name), getattr(bn_spec, name), rtol=1e-6,
                                   atol=1e-7, equal_nan=True)
    assert int(bn_ours.num_batches_tracked) == 3 + batch_stats


def test_spatial_gate_low_precision_state_and_no_tracking():
    """float16 conv weight, affine terms and running statistics (read and written in float16);
    without num_batches_tracked nothing is updated."""
    shape = (2, 16, 4, 6)
    h, w = shape[2:]
    x = distinct_max_input(shape, F32, "cpu")
    conv_w, bn_w, bn_b = spatial_params(3, dtype=torch.float16, channels_last=True)
    bn_ours = batch_norm(True, 0.1, torch.float16)
    bn_spec = clone_bn(bn_ours)
    got = small.spatial_gate(c_partials(x, 2), conv_w, bn_w, bn_b, bn_ours, True, h, w)
    _, _, want = spec.forward(x, None, GateParams(conv_w=conv_w, bn_w=bn_w, bn_b=bn_b),
                              GateConfig(), bn_spec)
    for name in SpatialSaved._fields:
        check_close(getattr(got, name), getattr(want, name))
    assert bn_ours.running_mean.dtype == torch.float16
    torch.testing.assert_close(bn_ours.running_mean, bn_spec.running_mean)
    torch.testing.assert_close(bn_ours.running_var, bn_spec.running_var)
    untracked = batch_norm(True)._replace(num_batches_tracked=None)
    before = untracked.running_mean.clone(), untracked.running_var.clone()
    small.spatial_gate(c_partials(x, 2), conv_w, bn_w, bn_b, untracked, True, h, w)
    assert torch.equal(untracked.running_mean, before[0])
    assert torch.equal(untracked.running_var, before[1])


@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("param_dtype", [F32, torch.float16], ids=str)
def test_spatial_backward(batch_stats, affine, param_dtype):
    """gp as the specification's backward gives it; wpart and bn_part such that the
    grad-input tail's sums over their rows (csrc ParamTasks: gconv = sum wpart, gbn_w =
    sum bn_part[:, 1], gbn_b = sum bn_part[:, 0]) are the specification's parameter gradients,
    unrounded (float32) whatever the parameters' dtype; bn_part holds [sum gv, sum gv * xhat]
    also without affine terms."""
    n, c, h, w, k = 3, 10, 5, 6, 5
    x = distinct_max_input((n, c, h, w), F32, "cpu")
    conv_w, bn_w, bn_b = spatial_params(k, affine, param_dtype)
    bn = batch_norm(batch_stats)
    saved = small.spatial_gate(c_partials(x, 2), conv_w, bn_w, bn_b, bn, True, h, w)
    grad = Partials(torch.randn(3, n, h * w))
    got = small.spatial_backward(grad, saved, conv_w, bn_w, bn, h, w)
    gsa = grad.sum.sum(dim=0)
    f32 = [None if t is None else t.float() for t in (conv_w, bn_w, bn_b)]
    gp, (gconv, gbn_w, gbn_b) = spec.spatial_backward(gsa, saved, *f32, bn, h, w)
    check_close(got.gp, gp)
    assert got.wpart.shape == (1, 2 * k * k) and got.bn_part.shape == (1, 2)
    assert got.wpart.dtype == got.bn_part.dtype == F32
    assert got.wpart.is_contiguous() and got.bn_part.is_contiguous()
    torch.testing.assert_close(got.wpart.sum(dim=0).view(1, 2, k, k), gconv, rtol=1e-5,
                               atol=1e-5)
    gv = gsa * saved.sa * (1 - saved.sa)
    torch.testing.assert_close(got.bn_part.sum(dim=0),
                               torch.stack([gv.sum(), (gv * saved.xhat).sum()]), rtol=1e-5,
                               atol=1e-5)
    if affine:
        torch.testing.assert_close(got.bn_part[0], torch.cat([gbn_b, gbn_w]), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.triton
@pytest.mark.skipif(not INTERPRET, reason="the Triton small kernels run here under "
                                          "TRITON_INTERPRET=1 only")
@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pools", [(True, True), (True, False)], ids=str)
def test_same_results_as_the_triton_small_kernels(batch_stats, pools):
    """On the same split partials, every result of the PyTorch small kernels equals the Triton
    kernels' (same shapes, dtypes, contiguity; the tail's partials by their sums over rows),
    and so do the running statistics after the step."""
    from cbam_kernels.ops.triton import channel_mlp as tri_channel, spatial as tri_spatial
    n, c, h, w, r = 3, 24, 5, 7, 4
    x = distinct_max_input((n, c, h, w), F32, "cpu")
    w1, b1, w2, b2 = mlp_params(c, r, False, True)
    conv_w, bn_w, bn_b = spatial_params(7)
    hw_part, gca = hw_partials(x, 3, pools[1]), Partials(torch.randn(2, n, c))
    got = small.channel_mlp(hw_part, w1, b1, w2, b2, *pools, "relu", "sigmoid")
    want = tri_channel.channel_mlp(hw_part, w1, b1, w2, b2, *pools, "relu", "sigmoid")
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            (check_small if a.dtype == F32 else check_close)(a, b)
    grads = small.mlp_backward(gca, want, w1, w2, *pools, "relu", "sigmoid")
    for a, b in zip(grads, tri_channel.mlp_backward(gca, want, w1, w2, *pools, "relu",
                                                    "sigmoid")):
        assert (a is None) == (b is None)
        if a is not None:
            check_small(a, b)
    bn_ours = batch_norm(batch_stats)
    bn_tri = clone_bn(bn_ours)
    c_part, gsa = c_partials(x * want.ca.view(n, c, 1, 1), 3), Partials(torch.randn(2, n, h * w))
    got = small.spatial_gate(c_part, conv_w, bn_w, bn_b, bn_ours, False, h, w)
    want = tri_spatial.spatial_gate(c_part, conv_w, bn_w, bn_b, bn_tri, False, h, w)
    for a, b in zip(got, want):
        (check_small if a.dtype == F32 else check_close)(a, b)
    for a, b in zip(bn_ours, bn_tri):
        if torch.is_tensor(a):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ours = small.spatial_backward(gsa, want, conv_w, bn_w, bn_ours, h, w)
    theirs = tri_spatial.spatial_backward(gsa, want, conv_w, bn_w, bn_tri, h, w)
    check_small(ours.gp, theirs.gp)
    for a, b in ((ours.wpart, theirs.wpart), (ours.bn_part, theirs.bn_part)):
        assert a.shape[1:] == b.shape[1:] and a.dtype == b.dtype
        torch.testing.assert_close(a.sum(dim=0), b.sum(dim=0), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------- the whole gate, C++ passes emulated

@pytest.fixture(scope="module")
def emulated():
    """``KernelPipeline`` over the emulated C++ passes and the PyTorch small kernels, with the
    emulation's memory checks on (a kernel's unwritten output element reads as NaN)."""
    if not HAS_COMPILER:
        pytest.skip("the CUDA emulation needs a host C++ compiler (c++)")
    import cuda_emulation
    with cuda_emulation.memory_checks():
        yield KernelPipeline(cuda_emulation.passes, small)


@pytest.fixture
def routed(emulated, monkeypatch):
    """The fused modules run on ``emulated`` (the backend choice patched to it, as conftest's
    ``kernel_pipeline`` fixture routes its pipelines)."""
    monkeypatch.setattr(backend, "backend_for", lambda x: "cuda")
    monkeypatch.setattr(backend, "pipeline_named", lambda name, device=None: emulated)
    return emulated


# (N, C, H, W): those of test_gate_op (odd H*W, N=1, 1x1 maps, split reductions) and C = 13.
SHAPES = PIPELINE_SHAPES + [(2, 13, 5, 7), (1, 13, 1, 1)]
# (gates, (use_avg, use_max)): CBAM, CBAM with one pool, the channel gate, SE (the channel
# gate with the average pool), the spatial gate (max_first for even C, else mean first).
CONFIGS = [("cbam", (True, True)), ("cbam", (True, False)), ("cbam", (False, True)),
           ("channel", (True, True)), ("channel", (True, False)), ("spatial", (True, True))]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("gates,pools", CONFIGS, ids=str)
def test_pipeline_matches_spec(emulated, shape, dtype, layout, gates, pools):
    """test_gate_op's comparison of a kernel pipeline with the float64 specification (y, every
    saved tensor, running statistics, every gradient, the residual epilogue; training and
    eval), on the CUDA backend as it runs on sm_75."""
    check_pipeline(emulated, shape, dtype, layout, gates, pools)


def test_pipeline_splits_its_reductions(emulated):
    """Some SHAPES split pool_hw and some channel_pool (S > 1) in the emulated passes, so the
    comparisons above cover the small kernels' finishing of split partials."""
    splits = {"pool_hw": 1, "channel_pool": 1}
    for shape in SHAPES:
        for layout in ("nchw", "cl"):
            x = to_layout(torch.randn(shape), layout)
            splits["pool_hw"] = max(splits["pool_hw"],
                                    emulated.passes.pool_hw(x, True).sum.shape[0])
            splits["channel_pool"] = max(splits["channel_pool"],
                                         emulated.passes.channel_pool(x, None).sum.shape[0])
    assert min(splits.values()) > 1, splits


def check_case(pipeline, x, residual, gy, params, cfg, bn, dtypes):
    """Forward + backward of ``pipeline`` against the specification (``references``), with the
    BatchNorm state ``bn`` (a copy per run)."""
    truth, specs = references(x, residual, gy, params, cfg, bn)
    y, channel, spatial = pipeline.forward(x, residual, params, cfg, bn)
    grads = pipeline.backward(gy, x, y if residual is not None else None, params, cfg, bn,
                              channel, spatial)
    check_against_spec(results(y, channel, spatial, bn, grads), truth, specs, dtypes)
    for p, g in zip(params, grads.params):
        assert (g is None) == (p is None) and (p is None or g.stride() == p.stride())
    return grads


@pytest.mark.parametrize("shape", [(2, 33, 9, 11), (1, 3, 32, 65), (2, 13, 5, 7), (3, 13, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
def test_timm_cbam_pipeline(emulated, shape, dtype, layout, residual):
    """timm's parameterisation: the map [mean, max], the MLP as 1x1 convs without biases (their
    gradients in the kernels' layout), BatchNorm momentum 0.1."""
    n, c, h, w = shape
    r = max(1, round(c / 16))
    t = {k: v.detach() for k, v in gate_inputs(n, c, h, w, r=r, k=7, dtype=dtype,
                                                param_dtype=F32).items()}
    params = GateParams(t["w1"].view(r, c, 1, 1), None, t["w2"].view(c, r, 1, 1), None,
                        t["conv_w"], t["bn_w"], t["bn_b"])
    x = to_layout(t["x"], layout)
    res = to_layout(torch.randn(shape).to(dtype), layout) if residual else None
    gy = to_layout(torch.randn(shape).to(dtype), layout)
    cfg = GateConfig(max_first=False)
    dtypes = dict(y=dtype, gx=dtype, gres=dtype)
    for batch_stats in (True, False):
        if not ill_conditioned(shape, batch_stats):
            mean, var = running_stats(F32, "cpu")
            bn = BatchNormState(mean, var, torch.tensor(3), 1e-5, 0.1, batch_stats)
            check_case(emulated, x, res, gy, params, cfg, bn, dtypes)


@pytest.mark.parametrize("dtype,act,gate", [(torch.float16, "silu", "sigmoid"),
                                            (torch.bfloat16, "relu", "sigmoid"),
                                            (torch.float32, "silu", "hardsigmoid")],
                         ids=["float16-silu", "bfloat16-relu", "float32-hardsigmoid"])
def test_low_precision_and_odd_parameters(emulated, dtype, act, gate):
    """Parameters and running statistics in x's low-precision dtype (read and written in it), a
    channels_last conv weight (its gradient with the same strides), no MLP biases, cumulative
    BatchNorm momentum (num_batches_tracked counted), either activation and gate."""
    shape = (2, 12, 5, 6)
    t = {k: v.detach() for k, v in gate_inputs(*shape, r=4, k=3, dtype=dtype).items()}
    params = GateParams(t["w1"], None, t["w2"], None,
                        t["conv_w"].to(memory_format=torch.channels_last), t["bn_w"], t["bn_b"])
    gy = torch.randn(shape).to(dtype)
    mean, var = running_stats(dtype, "cpu")
    bn = BatchNormState(mean, var, torch.tensor(0), 1e-5, None, True)
    dtypes = {f"g{k}": dtype for k in GateParams._fields}
    dtypes.update(y=dtype, gx=dtype, running_mean=dtype, running_var=dtype)
    grads = check_case(emulated, t["x"], None, gy, params, GateConfig(act=act, gate=gate), bn,
                       dtypes)
    assert int(bn.num_batches_tracked) == 1
    assert grads.params.conv_w.stride() == params.conv_w.stride()


@pytest.mark.parametrize("make", [lambda: CBAM(16, 4), lambda: SE(16, 4)], ids=["cbam", "se"])
def test_the_full_size_work_is_the_cpp_passes(routed, make):
    """With the PyTorch small kernels the full-size work is still the C++ passes, one launch
    each (the parameter gradients in grad-input's), with or without the residual epilogue; the
    small kernels add ATen ops on per-(n, c) and per-(n, h, w) tensors only."""
    from benchmarks.launches import module_launches
    module = make()
    x = distinct_max_input((2, 16, 6, 5), F32, "cpu")
    spatial = isinstance(module, CBAM)
    forward = ["pool_hw", "channel_pool", "apply_gates"] if spatial else ["pool_hw",
                                                                          "apply_gates"]
    backward = ["grad_spatial", "grad_channel", "grad_input"] if spatial else ["grad_channel",
                                                                               "grad_input"]
    for residual in (None, torch.randn_like(x)):
        train = module_launches(module, x, True, True, residual)
        for launches, expected in ((module_launches(module, x, False, False, residual)["forward"],
                                    forward), (train["forward"], forward),
                                   (train["backward"], backward)):
            assert [n.split("::")[1] for n in launches.extension] == expected
            assert launches.triton == []


# -------------------------------------------------------- the fused modules routed through it

MODULE_SHAPES = [(2, 24, 5, 7, 4), (1, 17, 3, 3, 16), (3, 8, 1, 1, 2), (2, 33, 9, 11, 8)]


@pytest.mark.parametrize("shape", MODULE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("style", ["official", "timm"])
def test_cbam_modules(routed, shape, dtype, fmt, train, style):
    """CBAM (official and timm) on the emulated CUDA backend with the PyTorch small kernels
    against the eager reference (gate_testing's rule: output, every gradient, the BatchNorm
    buffers after the step)."""
    *xshape, r = shape
    skip_ill_conditioned(xshape, train)
    c = xshape[1]
    if style == "official":
        ours, ref = CBAM(c, r), OfficialCBAM(c, r)
    else:
        ours, ref = CBAM(c, r, style="timm"), TimmCBAM(c, rd_ratio=1 / r)
    check_module(ours, ref, xshape, dtype, fmt, train, "cpu")


@pytest.mark.parametrize("shape", MODULE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("module", ["se", "se-nobias", "channel-official", "channel-timm"])
def test_channel_modules(routed, shape, dtype, fmt, module):
    """SE (with and without biases) and the channel gate alone (both parameterisations)."""
    *xshape, r = shape
    c = xshape[1]
    ours, ref = {
        "se": lambda: (SE(c, r), SEModule(c, r)),
        "se-nobias": lambda: (SE(c, r, bias=False), SEModule(c, r, bias=False)),
        "channel-official": lambda: (ChannelGate(c, r), OfficialChannelGate(c, r)),
        "channel-timm": lambda: (ChannelGate(c, r, style="timm"), TimmChannelAttn(c, 1 / r)),
    }[module]()
    check_module(ours, ref, xshape, dtype, fmt, True, "cpu")


@pytest.mark.parametrize("shape", [(2, 24, 5, 7), (2, 1, 6, 5), (1, 17, 3, 3), (3, 8, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("style", ["official", "timm"])
def test_spatial_gate_modules(routed, shape, dtype, fmt, train, style):
    """The spatial gate alone, both parameterisations."""
    skip_ill_conditioned(shape, train)
    ours = SpatialGate(7, style=style)
    ref = OfficialSpatialGate(7) if style == "official" else TimmSpatialAttn(7)
    check_module(ours, ref, shape, dtype, fmt, train, "cpu")


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_running_stats_follow_batchnorm(routed, momentum):
    """Several training steps of CBAM: running_mean/var/num_batches_tracked as the reference's
    nn.BatchNorm2d (the cumulative average too)."""
    ours, ref = CBAM(12, 4), OfficialCBAM(12, 4)
    for m in (ours.spatial_gate.block.bn, ref.SpatialGate.spatial.bn):
        m.momentum = momentum
    ours.load_state_dict(ref.state_dict())
    for step in range(3):
        x = distinct_max_input((3, 12, 5, 4), F32, "cpu")
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------ without Triton

@needs_emulation
def test_the_cuda_pipeline_runs_without_triton():
    """With Triton not importable: the kernel pipeline module imports, the emulated CUDA
    pipeline with the PyTorch small kernels runs a CBAM training step equal to the torch
    backend's, and the Triton small kernels (the default) are what would fail."""
    code = """
import sys
sys.modules["triton"] = None
import torch
from cbam_kernels import CBAM
from cbam_kernels.ops import backend
from cbam_kernels.ops.kernel_pipeline import KernelPipeline, small_kernels
import cuda_emulation
pipeline = KernelPipeline(cuda_emulation.passes, small_kernels("torch"))
checks = cuda_emulation.memory_checks()
checks.__enter__()
torch.manual_seed(0)
module = CBAM(16, 4).train()
x = torch.randn(2, 16, 5, 6, requires_grad=True)
ref = CBAM(16, 4).train()
ref.load_state_dict(module.state_dict())
chosen = backend.backend_for, backend.pipeline_named
backend.backend_for, backend.pipeline_named = lambda x: "cuda", lambda *a: pipeline
module(x).square().sum().backward()
gx, x.grad = x.grad, None
backend.backend_for, backend.pipeline_named = chosen
with backend.forced("torch"):
    ref(x).square().sum().backward()
torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
for (k, a), (_, b) in zip(module.named_parameters(), ref.named_parameters()):
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=k)
torch.testing.assert_close(module.state_dict(), ref.state_dict())
try:
    KernelPipeline(cuda_emulation.passes)
except ImportError:
    print("ok: no triton")
"""
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests), str(tests.parent)]))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tests)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok: no triton" in out.stdout
