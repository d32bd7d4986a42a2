"""Bad input gets a clear error; edge cases (N=0, NaN, Inf, ties) behave as documented."""

import warnings

import pytest
import torch

from cbam_kernels import CBAM, SE, ChannelGate, SpatialGate, attention_gate
from cbam_kernels.ops.types import GateConfig, GateParams
from cbam_kernels.reference import OfficialCBAM

MODULES = {"cbam": lambda: CBAM(8, 2), "se": lambda: SE(8, 2),
           "channel": lambda: ChannelGate(8, 2), "spatial": lambda: SpatialGate()}


@pytest.fixture(params=sorted(MODULES))
def module(request):
    return MODULES[request.param]()


def test_not_4d(module):
    with pytest.raises(ValueError, match=f"{type(module).__name__} expects a 4-D input"):
        module(torch.randn(2, 8, 5))


def test_the_op_checks_its_input_for_every_caller():
    """attention_gate itself refuses what the modules refuse, naming itself."""
    params = SE(8, 2).gate_params()
    with pytest.raises(ValueError, match="attention_gate expects a 4-D input"):
        attention_gate(torch.randn(2, 8, 5), None, params)
    with pytest.raises(ValueError, match="built for 8 channels.*got an input with 6"):
        attention_gate(torch.randn(2, 6, 3, 3), None, params)
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        attention_gate([1.0], None, params)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64])
def test_non_float_dtype(module, dtype):
    with pytest.raises(TypeError, match="floating-point"):
        module(torch.zeros(2, 8, 3, 3, dtype=dtype))


@pytest.mark.parametrize("name", ["cbam", "se", "channel"])
def test_channel_mismatch(name):
    with pytest.raises(ValueError, match="built for 8 channels.*got an input with 6"):
        MODULES[name]()(torch.randn(2, 6, 3, 3))


def test_device_mismatch(module):
    with pytest.raises(RuntimeError, match="input is on meta but parameter"):
        module(torch.randn(2, 8, 3, 3, device="meta"))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
def test_meta_tensors_give_meta_results(module, train, memory_format):
    """Shape propagation, FLOP counters and deferred initialisation run modules on meta
    tensors: a meta result of x's shape and layout, with and without a residual."""
    module = module.to("meta").train(train)
    x = torch.randn(2, 8, 5, 5, device="meta").to(memory_format=memory_format)
    for residual in (None, torch.randn_like(x)):
        y = module(x, residual=residual)
        assert y.is_meta and y.shape == x.shape
        assert y.is_contiguous(memory_format=memory_format)


def test_constructor_errors():
    with pytest.raises(ValueError, match="width 0"):
        CBAM(8, 16)
    with pytest.raises(ValueError, match="style"):
        CBAM(8, 2, style="keras")
    with pytest.raises(ValueError, match="lp and lse"):
        ChannelGate(8, 2, pool_types=("avg", "lp"))
    with pytest.raises(ValueError, match="odd"):
        SpatialGate(4)
    with pytest.raises(ValueError, match="act must be one of"):
        SE(8, 2, act="gelu")


def test_train_on_single_value_fails_like_batchnorm():
    with pytest.raises(ValueError, match="more than 1 value"):
        SpatialGate().train()(torch.randn(1, 3, 1, 1))


def test_residual_must_match():
    with pytest.raises(ValueError, match="residual must match"):
        CBAM(8, 2)(torch.randn(2, 8, 3, 3), residual=torch.randn(2, 8, 3, 4))


@pytest.mark.parametrize("x_shape,shape", [((2, 8, 4, 4), (1, 8, 1, 1)),
                                           ((2, 8, 4, 4), (2, 8, 4, 1)),
                                           ((0, 8, 4, 4), (1, 8, 1, 1))], ids=str)
def test_residual_never_broadcasts_through_the_op(x_shape, shape):
    """The public op checks the residual too: a (1, C, 1, 1) residual must not silently
    broadcast into a (2, C, 4, 4) result (nor into an empty batch's)."""
    x = torch.randn(x_shape)
    se = SE(8, 2)
    with pytest.raises(ValueError, match="residual must match"):
        attention_gate(x, torch.randn(shape), se.gate_params(), GateConfig())


@pytest.mark.parametrize("shape", [(0, 8, 5, 5), (2, 8, 0, 0)], ids=str)
def test_empty_batch(device_backend, module, shape):
    """An empty batch (the tail of a sampler) keeps x's layout (where an empty tensor has one)
    and backpropagates zero gradients to x and every parameter, as nn.Conv2d does."""
    x = torch.randn(shape, device=device_backend).to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    module = module.to(device_backend).train()
    y = module(x)
    assert y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last) or shape[2] == 0
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters())


@pytest.mark.parametrize("shape", [(0, 8, 5, 5), (2, 8, 0, 5)], ids=str)
def test_empty_batch_through_the_op(device_backend, shape):
    """N=0 or H=0 straight through the fused op (no module short-cut): an empty result still
    connected to autograd, zero gradients for x and every parameter (as nn.Conv2d gives)."""
    x = torch.randn(shape, device=device_backend, requires_grad=True)
    gate = CBAM(8, 2).to(device_backend).train()
    spatial = gate.spatial_gate
    params = spatial.gate_params(gate.channel_gate.gate_params())
    y = attention_gate(x, None, params, GateConfig(), spatial.bn_state())
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in gate.parameters())
    assert int(spatial.spatial.bn.num_batches_tracked) == 1  # counted, as nn.BatchNorm2d does


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_propagate_as_reference(device_backend, value):
    ref = OfficialCBAM(8, 2).eval()
    ours = CBAM(8, 2).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 5, 5)
    x[1, 3, 2, 2] = value
    want = ref(x)
    got = ours.to(device_backend)(x.to(device_backend)).cpu()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)


def test_max_ties_pick_first_index(device_backend):
    """All-equal maps: the max gradient goes to one element, the first, every time."""
    gate = ChannelGate(4, 2, pool_types=("max",)).to(device_backend)
    x = torch.ones(1, 4, 3, 3, device=device_backend, requires_grad=True)
    grads = []
    for _ in range(2):
        x.grad = None
        gate(x).sum().backward()
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])
    # The gradient reaching the pooled max lands on hw = 0 only: it differs from the rest.
    g = grads[0].flatten(2)
    assert (g[:, :, 1:] == g[:, :, 1:2]).all() and not torch.equal(g[:, :, 0], g[:, :, 1])


def test_jit_script_points_to_compile_and_export(module):
    """torch.jit.script of a model holding a fused module fails with a message that names the
    module and the supported alternatives (not an attribute error from inside it)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        with pytest.raises(RuntimeError, match=f"cannot compile {type(module).__name__} .*"
                                               "torch.compile.*torch.export"):
            torch.jit.script(model)
