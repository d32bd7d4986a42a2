"""The fused gate itself: gradcheck of the hand-written backward, each kernel pipeline against the
specification pipeline (forward, saved tensors, running statistics and every gradient),
opcheck of the custom ops, torch.compile, and what autograd saves."""

import copy

import pytest
import torch

import cbam_kernels
from cbam_kernels import CBAM, SE
from cbam_kernels.ops.torch import pipeline as pipeline_torch
from cbam_kernels.ops.types import BatchNormState, GateConfig, GateParams
from cbam_kernels.ops.gate import _pack
from gate_testing import EAGER_FACTOR, TOL_FLOOR, distinct_max_input, rel_err
from pass_testing import DEVICE, to_layout

F64 = torch.float64
PARAMS = GateParams._fields
CHANNEL, SPATIAL = PARAMS[:4], PARAMS[4:]
# (gates, (use_avg, use_max))
GATE_CONFIGS = [("cbam", (True, True)), ("cbam", (True, False)), ("cbam", (False, True)),
                ("channel", (True, True)), ("spatial", (True, True))]


def gate_inputs(n=3, c=6, h=4, w=5, r=3, k=3, dtype=F64, device="cpu", param_dtype=None):
    """x and every parameter (leaves requiring grad), random."""
    def param(*shape):
        return torch.randn(*shape, dtype=param_dtype or dtype, device=device,
                           requires_grad=True)
    x = distinct_max_input((n, c, h, w), dtype, device).requires_grad_(True)
    return dict(x=x, w1=param(r, c), b1=param(r), w2=param(c, r), b2=param(c),
                conv_w=param(1, 2, k, k), bn_w=param(1), bn_b=param(1))


def params_of(t, gates):
    """The GateParams of the gates named ("cbam", "channel", "spatial") from ``gate_inputs``."""
    names = (CHANNEL if gates != "spatial" else ()) + (SPATIAL if gates != "channel" else ())
    return GateParams(**{k: t[k] for k in names})


def running_stats(dtype=F64, device="cpu"):
    """Non-trivial running statistics of the spatial gate's BatchNorm."""
    return (torch.randn(1, dtype=dtype, device=device),
            torch.rand(1, dtype=dtype, device=device) + 0.5)


@pytest.mark.parametrize("gates,pools", GATE_CONFIGS, ids=str)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("max_first", [True, False], ids=["max_first", "mean_first"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_gradcheck(gates, pools, batch_stats, max_first, residual):
    """Finite differences in float64 against the hand-written backward (the custom op on the
    CPU runs the specification pipeline, backward included)."""
    t = gate_inputs()
    params = params_of(t, gates)
    names = [k for k, v in params._asdict().items() if v is not None]
    mean, var = running_stats() if not batch_stats else (None, None)
    res = torch.randn_like(t["x"]).requires_grad_(True)
    cfg = GateConfig(*pools, "relu", "sigmoid", max_first)

    def f(x, r, *values):
        p = GateParams(**dict(zip(names, values)))
        return torch.ops.cbam_kernels.gate_forward(x, r if residual else None, *_pack(p), mean,
                                                   var, 1e-5, batch_stats, *cfg)[0]

    assert torch.autograd.gradcheck(f, [t["x"], res] + [t[k] for k in names], fast_mode=True)


@pytest.mark.parametrize("shape", [(3, 5, 1, 1), (2, 1, 2, 1)], ids=str)
def test_gradcheck_tiny_batchnorm(shape):
    """1x1 maps and C=1 in training mode: BatchNorm over 3 or 4 values (too ill-conditioned
    for the float32 module comparisons, exact here)."""
    n, c, h, w = shape
    t = gate_inputs(n, c, h, w, r=1)

    def f(x, *values):
        return torch.ops.cbam_kernels.gate_forward(x, None, list(values), [True] * 7, None,
                                                   None, 1e-5, True, *GateConfig())[0]

    assert torch.autograd.gradcheck(f, [t["x"]] + [t[k] for k in PARAMS], fast_mode=True)


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
def test_gradcheck_activations(act, gate):
    t = gate_inputs()

    def f(x, *values):
        return torch.ops.cbam_kernels.gate_forward(x, None, list(values), [True] * 4 + [False] * 3,
                                                   None, None, 1e-5, True, True, False, act, gate,
                                                   True)[0]

    assert torch.autograd.gradcheck(f, [t["x"]] + [t[k] for k in CHANNEL], fast_mode=True)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_plain_path_matches_hand_written_backward(device):
    """The torch backend runs the specification forward under autograd; its gradients equal
    the hand-written backward that the kernels implement (float64, exact up to rounding), on
    each device: the kernels are checked against this backward on the GPU, so it must not
    depend on the device's convolution algorithms."""
    t = gate_inputs(2, 7, 5, 3, r=2, k=5, device=device)
    params = params_of(t, "cbam")
    res = torch.randn_like(t["x"])
    gy = torch.randn_like(t["x"])
    bn = BatchNormState(batch_stats=True)
    y, channel, spatial = pipeline_torch.forward(t["x"], res, params, GateConfig(), bn)
    auto = torch.autograd.grad(y, [t["x"], *params], gy)
    hand = pipeline_torch.backward(gy, t["x"].detach(), y.detach(), params, GateConfig(), bn,
                                   channel, spatial)
    for got, want in zip([hand.x, *hand.params], auto):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------- kernel pipelines vs the spec

# (N, C, H, W): odd H*W, C not a multiple of anything, N=1, 1x1 maps; the last two make
# pool_hw and channel_pool split their reductions (S > 1) on every kernel backend.
PIPELINE_SHAPES = [(2, 5, 3, 3), (24, 3, 1, 1), (2, 33, 9, 11), (1, 3, 32, 65), (2, 1040, 3, 3)]


def ill_conditioned(shape, batch_stats):
    """Training-mode BatchNorm cases too ill-conditioned for a float32 comparison (float64
    gradcheck covers them): fewer than 8 values, or 1x1 maps, where BatchNorm makes the conv
    output's gradient sum to zero over the batch, so the conv weight gradient
    sum_n p_n * gu_n cancels to a tiny fraction of its terms."""
    n, _, h, w = shape
    return batch_stats and (n * h * w < 8 or h * w == 1)


def run_spec(x, res, gy, params, cfg, bn, dtype=None, jitter=0.0):
    """ops.torch.pipeline forward + backward, everything cast to ``dtype`` (float64: the truth;
    None: as given, the specification at the kernels' precision) and, with ``jitter``, each
    input value moved by that relative amount at random. Returns every result by name."""
    g = torch.Generator(device=x.device).manual_seed(7)

    def cast(t):
        if t is None or dtype is None:
            return t
        t = t.to(dtype)
        return t * (1 + jitter * torch.randn(t.shape, generator=g, device=t.device,
                                            dtype=dtype)) if jitter else t

    params = GateParams(*map(cast, params))
    bn = bn._replace(running_mean=cast(bn.running_mean.clone()),
                     running_var=cast(bn.running_var.clone()),
                     num_batches_tracked=bn.num_batches_tracked.clone())
    y, channel, spatial = pipeline_torch.forward(cast(x), cast(res), params, cfg, bn)
    grads = pipeline_torch.backward(cast(gy), cast(x), y if res is not None else None, params,
                                    cfg, bn, channel, spatial)
    return results(y, channel, spatial, bn, grads)


def results(y, channel, spatial, bn, grads):
    """Every result of a forward + backward by name."""
    named = {}
    for group in (channel, spatial):
        if group is not None:
            named.update((k, v) for k, v in group._asdict().items() if v is not None)
    named.update(y=y, running_mean=bn.running_mean, running_var=bn.running_var,
                 tracked=bn.num_batches_tracked, gx=grads.x, gres=grads.residual)
    named.update((f"g{k}", g) for k, g in grads.params._asdict().items())
    return named


# The BatchNorm affine gradients are single sums over the batch whose cancellation (condition
# numbers above 100 with random gradients) amplifies the float32 rounding of their terms: they are
# compared as part of the spatial gate's parameter gradients (a wrong value still moves that
# vector by its own size).
GROUPS = dict.fromkeys(("gbn_w", "gbn_b"), ("gconv_w", "gbn_w", "gbn_b"))


def _grouped(named, name):
    if name not in GROUPS:
        return named[name]
    return torch.cat([named[k].flatten().double() for k in GROUPS[name] if named[k] is not None])


def references(x, res, gy, params, cfg, bn):
    """The float64 truth, and runs whose distance from it measures the float32 error to expect
    of each result: the specification at the kernels' precision in two memory layouts (two
    summation orders), in float32 with every input moved by a few float32 roundings (another
    realisation of the rounding), and the truth with every input moved by one float32 rounding
    (how much the result's conditioning amplifies rounding)."""
    truth = run_spec(x, res, gy, params, cfg, bn, F64)
    specs = [run_spec(*(None if t is None else to_layout(t, fmt) for t in (x, res, gy)), params,
                      cfg, bn) for fmt in ("nchw", "cl")]
    specs.append(run_spec(x, res, gy, params, cfg, bn, torch.float32, jitter=2.0**-22))
    return truth, specs + [run_spec(x, res, gy, params, cfg, bn, F64, jitter=2.0**-24)]


def check_against_spec(got, truth, specs, dtypes):
    """Each result of the kernels within EAGER_FACTOR times the largest error of ``specs`` (see
    :func:`references`) from the float64 truth, or within TOL_FLOOR of its dtype (the module
    tests' rule, gate_testing); arg-max indices equal to the specification's at the kernels'
    precision (float64 may order near-ties differently); dtypes as ``dtypes`` says (float32
    for the rest)."""
    assert got.keys() == truth.keys(), (sorted(got), sorted(truth))
    for name, value in got.items():
        want = truth[name]
        if value is None:
            assert want is None, name
        elif not value.is_floating_point():  # arg-maxes: of the same rounded values
            assert torch.equal(value.long().cpu(), specs[0][name].long().cpu()), name
        else:
            assert value.dtype == dtypes.get(name, torch.float32), name
            want = _grouped(truth, name)
            spec_errs = [rel_err(_grouped(spec, name), want) for spec in specs]
            tol = max(EAGER_FACTOR * max(spec_errs), TOL_FLOOR[value.dtype])
            err = rel_err(_grouped(got, name), want)
            assert err <= tol, (f"{name}: relative error {err:.3g} > {tol:.3g} (the references' "
                                f"errors: {', '.join(f'{e:.2g}' for e in spec_errs)})")


@pytest.mark.parametrize("shape", PIPELINE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("gates,pools", GATE_CONFIGS[:1] + GATE_CONFIGS[3:], ids=str)
def test_kernel_pipeline_matches_spec(kernel_pipeline, shape, dtype, layout, gates, pools):
    """Every kernel of a pipeline against the specification on the same (rounded) inputs: y,
    every saved tensor, the running statistics after the step, every gradient (residual
    epilogue), in training and in eval; full-size results in x's dtype and empty_like(x)'s
    strides, parameter gradients in their parameter's."""
    check_pipeline(kernel_pipeline.pipeline, shape, dtype, layout, gates, pools)


@pytest.mark.parametrize("gates,pools", GATE_CONFIGS[:1] + GATE_CONFIGS[3:], ids=str)
def test_kernel_pipeline_layout_whose_h_and_w_do_not_merge(kernel_pipeline, gates, pools):
    """x, the residual and gy dense with H and W apart (copied once for the kernels): results
    as the specification's, laid out like empty_like(x)."""
    check_pipeline(kernel_pipeline.pipeline, (2, 33, 9, 11), torch.float16, "hw_apart", gates,
                   pools)


def check_pipeline(pipeline, shape, dtype, layout, gates, pools):
    """The comparison of :func:`test_kernel_pipeline_matches_spec` for one case."""
    n, c, h, w = shape
    t = gate_inputs(n, c, h, w, r=max(1, c // 16), k=5, dtype=dtype, device=DEVICE,
                    param_dtype=torch.float32)
    x = to_layout(t["x"].detach(), layout)
    res = to_layout(torch.randn(shape, device=DEVICE).to(dtype), layout)
    gy = to_layout(torch.randn(shape, device=DEVICE).to(dtype), layout)
    params = params_of({k: v.detach() for k, v in t.items()}, gates)
    cfg = GateConfig(*pools, "relu", "sigmoid", gates != "spatial" or c % 2 == 0)
    for batch_stats in (True, False):
        if ill_conditioned(shape, batch_stats):
            continue
        mean, var = running_stats(torch.float32, DEVICE)
        bn = BatchNormState(mean, var, torch.tensor(3, device=DEVICE), 1e-5, 0.1, batch_stats)
        truth, specs = references(x, res, gy, params, cfg, bn)
        y, channel, spatial = pipeline.forward(x, res, params, cfg, bn)
        grads = pipeline.backward(gy, x, y, params, cfg, bn, channel, spatial)
        check_against_spec(results(y, channel, spatial, bn, grads), truth, specs,
                           dict(y=dtype, gx=dtype, gres=dtype))
        for full in (y, grads.x, grads.residual):
            assert full.stride() == torch.empty_like(x).stride()
        for p, g in zip(params, grads.params):
            assert (g is None) == (p is None) and (p is None or g.stride() == p.stride())


def test_kernel_pipeline_splits_its_reductions(kernel_pipeline):
    """Some PIPELINE_SHAPES split pool_hw and some channel_pool (partials with S > 1) on this
    backend, so the comparisons above cover the small kernels' finishing of split partials."""
    passes = kernel_pipeline.pipeline.passes
    splits = {"pool_hw": 1, "channel_pool": 1}
    for shape in PIPELINE_SHAPES:
        for layout in ("nchw", "cl"):
            x = to_layout(torch.randn(shape, device=DEVICE), layout)
            splits["pool_hw"] = max(splits["pool_hw"], passes.pool_hw(x, True).sum.shape[0])
            splits["channel_pool"] = max(splits["channel_pool"],
                                         passes.channel_pool(x, None).sum.shape[0])
    assert min(splits.values()) > 1, splits


@pytest.mark.parametrize("dtype,act", [(torch.float16, "silu"), (torch.bfloat16, "relu")],
                         ids=["float16-silu", "bfloat16-relu"])
def test_kernel_pipeline_low_precision_and_odd_parameters(kernel_pipeline, dtype, act):
    """Low-precision parameters and running statistics (read and written in their dtype), a
    channels_last conv weight (its gradient with the same strides), no biases, cumulative
    BatchNorm momentum (num_batches_tracked counted in-kernel), either MLP activation."""
    pipeline = kernel_pipeline.pipeline
    shape = (2, 12, 5, 6)
    t = {k: v.detach() for k, v in gate_inputs(*shape, r=4, k=3, dtype=dtype,
                                                device=DEVICE).items()}
    params = GateParams(t["w1"], None, t["w2"], None,
                        t["conv_w"].to(memory_format=torch.channels_last), t["bn_w"], t["bn_b"])
    gy = torch.randn(shape, device=DEVICE).to(dtype)
    mean, var = running_stats(dtype, DEVICE)
    bn = BatchNormState(mean, var, torch.tensor(0, device=DEVICE), 1e-5, None, True)
    cfg = GateConfig(act=act)
    truth, specs = references(t["x"], None, gy, params, cfg, bn)
    y, channel, spatial = pipeline.forward(t["x"], None, params, cfg, bn)
    grads = pipeline.backward(gy, t["x"], None, params, cfg, bn, channel, spatial)
    dtypes = {f"g{k}": dtype for k in PARAMS}
    dtypes.update(y=dtype, gx=dtype, running_mean=dtype, running_var=dtype)
    check_against_spec(results(y, channel, spatial, bn, grads), truth, specs, dtypes)
    assert int(bn.num_batches_tracked) == 1
    assert grads.params.conv_w.stride() == params.conv_w.stride()


# ----------------------------------------------------------------- custom ops and compile

@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("gates", ["cbam", "channel", "spatial"])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
def test_opcheck(device_backend, gates, residual, batch_stats):
    """Schema, fake tensors, autograd registration and AOT dispatch of both ops."""
    t = gate_inputs(dtype=torch.float32, device=device_backend)
    params, present = _pack(params_of(t, gates))
    mean, var = running_stats(torch.float32, device_backend) if not batch_stats else (None, None)
    x = t["x"]
    args = (x, torch.randn_like(x) if residual else None, params, present, mean, var, 1e-5,
            batch_stats, *GateConfig())
    torch.library.opcheck(torch.ops.cbam_kernels.gate_forward.default, args)

    plain = [a.detach() if torch.is_tensor(a) else a for a in args]
    plain[2] = [p.detach() for p in params]
    out = torch.ops.cbam_kernels.gate_forward(*plain)
    bwd = (torch.randn_like(x), x.detach(), out[0] if residual else None, plain[2], present,
           out[1:], 1e-5, batch_stats, *GateConfig())
    torch.library.opcheck(torch.ops.cbam_kernels.gate_backward.default, bwd)


@pytest.mark.parametrize("module, dynamic", [("cbam", False), ("se", False), ("cbam", True)],
                         ids=["cbam", "se", "cbam-dynamic"])
def test_compile_fullgraph_matches_eager(device_backend, module, dynamic):
    """torch.compile(fullgraph=True): no graph break; output, gradients and BN stats equal up
    to float32 rounding (on the torch backend the compiler fuses the ops and sums in another
    order; on a kernel backend it calls the same kernels). With dynamic=True, one graph for
    symbolic N, H, W, square maps included (a stacked-then-viewed spatial map once defeated
    inductor's stride ordering there); SE is left out there: in torch 2.14 the backward of a
    dynamic-shape SE, timm's reference included, trips an inductor stride assertion."""
    torch._dynamo.reset()
    make = (lambda: CBAM(32, 4)) if module == "cbam" else (lambda: SE(32, 4))
    eager = make().to(device_backend).train()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, dynamic=dynamic)
    shapes = [(2, 32, 9, 9), (3, 32, 6, 6), (2, 32, 5, 7)] if dynamic else [(2, 32, 7, 5)] * 2
    for shape in shapes:
        x = distinct_max_input(shape, torch.float32, device_backend)
        x = x.to(memory_format=torch.channels_last)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        ys = [eager(xs[0]), compiled(xs[1])]
        torch.testing.assert_close(ys[1], ys[0])
        for y in ys:
            y.square().sum().backward()
        torch.testing.assert_close(xs[1].grad, xs[0].grad)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_module.named_parameters()):
        assert rel_err(b.grad, a.grad) < 1e-5, name
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled_module.named_buffers()):
        torch.testing.assert_close(b, a, msg=name)


def test_public_api():
    assert {"CBAM", "ChannelGate", "SpatialGate", "SE"} <= set(cbam_kernels.__all__)


@pytest.mark.parametrize("module", ["cbam", "se"])
def test_autograd_saves_only_x_full_size(kernel_pipeline, module):
    """On a kernel backend, everything autograd keeps besides x is a per-(n, c) or
    per-(n, h, w) tensor (with the residual epilogue, also the block output, which the next
    layer keeps anyway)."""
    gate = (CBAM(16, 4) if module == "cbam" else SE(16, 4)).to(DEVICE)
    x = torch.randn(2, 16, 6, 5, device=DEVICE, requires_grad=True)
    n, c, h, w = x.shape
    for residual, full_size in ((None, 1), (torch.randn_like(x), 2)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            gate(x, residual=residual)
        big = [t for t in saved if t.numel() >= x.numel()]
        assert len(big) == full_size, [tuple(t.shape) for t in saved]
        small = [t for t in saved if t.numel() < x.numel()]
        assert all(t.numel() <= 2 * n * max(c, h * w) for t in small)  # (K, N, C), (N, 2, HW)


# ----------------------------------------------------------------------- double backward

@pytest.mark.parametrize("module", ["cbam", "se"])
def test_double_backward_is_a_clear_error_on_kernels(kernel_pipeline, module):
    """create_graph=True works for first-order use; differentiating the gradient through the
    kernels raises an error that names the limitation and the alternative (never a silently
    missing second-order term)."""
    gate = (CBAM(8, 2) if module == "cbam" else SE(8, 2)).to(DEVICE)
    x = torch.randn(2, 8, 5, 5, device=DEVICE, requires_grad=True)
    gx, = torch.autograd.grad(gate(x).sum(), x, create_graph=True)
    assert gx.requires_grad
    with pytest.raises(RuntimeError, match="double backward .* not supported.*"
                                           "CBAM_KERNELS_BACKEND=torch"):
        gx.square().sum().backward()


@pytest.mark.parametrize("module", ["cbam", "se"])
def test_double_backward_on_the_torch_backend(module):
    """The plain-PyTorch path is twice differentiable (gradgradcheck in float64)."""
    gate = (CBAM(4, 2) if module == "cbam" else SE(4, 2)).double().train()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(gate, (x,))
