"""The custom ops themselves: gradcheck of the hand-written backward, opcheck, torch.compile."""

import itertools

import pytest
import torch

import cbam_kernels
from cbam_kernels import CBAM, SE
from cbam_kernels.gate_op import attention_gate
from gate_testing import distinct_max_input

F64 = torch.float64


def gate_inputs(n=3, c=6, h=4, w=5, r=3, k=3, dtype=F64, device="cpu"):
    """Random inputs and parameters for the fused gate (leaves requiring grad)."""
    def param(*shape):
        return torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)
    x = distinct_max_input((n, c, h, w), dtype, device).requires_grad_(True)
    return dict(x=x, w1=param(r, c), b1=param(r), w2=param(c, r), b2=param(c),
                conv_w=param(1, 2, k, k), bn_w=param(1), bn_b=param(1))


CHANNEL = ("w1", "b1", "w2", "b2")
SPATIAL = ("conv_w", "bn_w", "bn_b")


GATE_CONFIGS = [("cbam", pools) for pools in ((True, True), (True, False), (False, True))] + [
    ("channel", (True, True)), ("spatial", (True, True))]


@pytest.mark.parametrize("gates,pools", GATE_CONFIGS, ids=str)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("max_first", [True, False], ids=["max_first", "mean_first"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_gradcheck(gates, pools, batch_stats, max_first, residual):
    """Finite differences in float64 against the hand-written backward (CPU backend)."""
    t = gate_inputs()
    t["residual"] = torch.randn_like(t["x"]).requires_grad_(True)
    names = ["x"] + list(CHANNEL if gates != "spatial" else ()) + list(
        SPATIAL if gates != "channel" else ()) + (["residual"] if residual else [])
    running = dict(bn_mean=torch.randn(1, dtype=F64), bn_var=torch.rand(1, dtype=F64) + 0.5)

    def f(*args):
        kw = dict(zip(names, args))
        if not batch_stats:
            kw.update(running)
        return attention_gate(use_avg=pools[0], use_max=pools[1], batch_stats=batch_stats,
                              max_first=max_first, **kw)[0]

    assert torch.autograd.gradcheck(f, [t[k] for k in names], fast_mode=True)


@pytest.mark.parametrize("shape", [(3, 5, 1, 1), (2, 1, 2, 1)], ids=str)
def test_gradcheck_tiny_batchnorm(shape):
    """1x1 maps and C=1 in training mode: BatchNorm over 3 or 4 values (too ill-conditioned
    for the float32 module comparisons, exact here)."""
    n, c, h, w = shape
    t = gate_inputs(n, c, h, w, r=1)
    names = ("x",) + CHANNEL + SPATIAL

    def f(*args):
        return attention_gate(**dict(zip(names, args)), batch_stats=True)[0]

    assert torch.autograd.gradcheck(f, [t[k] for k in names], fast_mode=True)


@pytest.mark.parametrize("act,gate", itertools.product(["relu", "silu"],
                                                       ["sigmoid", "hardsigmoid"]))
def test_gradcheck_activations(act, gate):
    t = gate_inputs()
    names = ("x",) + CHANNEL

    def f(*args):
        return attention_gate(**dict(zip(names, args)), use_max=False, act=act, gate=gate)[0]

    assert torch.autograd.gradcheck(f, [t[k] for k in names], fast_mode=True)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("gates", ["cbam", "channel", "spatial"])
def test_opcheck(device_backend, gates, residual):
    """Schema, fake tensors, autograd registration and AOT dispatch of both ops."""
    t = gate_inputs(dtype=torch.float32, device=device_backend)
    kw = dict(x=t["x"], residual=torch.randn_like(t["x"]) if residual else None,
              use_avg=True, use_max=True, act="relu", gate="sigmoid", bn_mean=None, bn_var=None,
              bn_eps=1e-5, batch_stats=True, max_first=True)
    kw.update({k: t[k] if gates != "spatial" else None for k in CHANNEL})
    kw.update({k: t[k] if gates != "channel" else None for k in SPATIAL})
    torch.library.opcheck(torch.ops.cbam_kernels.gate_forward.default, (), kw)

    plain = {k: v.detach() if torch.is_tensor(v) else v for k, v in kw.items()}
    out = torch.ops.cbam_kernels.gate_forward(**plain)
    saved = dict(zip(("ca", "pooled", "hidden", "pstar", "p", "cstar", "sa", "xhat", "stats"),
                     out[1:]))
    bwd = {k: v for k, v in plain.items() if k not in ("residual", "bn_mean", "bn_var")}
    bwd.update(saved, gy=torch.randn_like(t["x"]), out=out[0] if residual else None)
    torch.library.opcheck(torch.ops.cbam_kernels.gate_backward.default, (), bwd)


@pytest.mark.parametrize("module", ["cbam", "se"])
def test_compile_fullgraph_matches_eager(device_backend, module):
    """torch.compile(fullgraph=True): no graph break; output, gradients and BN stats equal."""
    torch._dynamo.reset()
    make = (lambda: CBAM(32, 4)) if module == "cbam" else (lambda: SE(32, 4))
    eager = make().to(device_backend).train()
    compiled_module = make().to(device_backend).train()
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True)
    for step in range(2):
        x = distinct_max_input((2, 32, 7, 5), torch.float32, device_backend)
        x = x.to(memory_format=torch.channels_last)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        ys = [eager(xs[0]), compiled(xs[1])]
        torch.testing.assert_close(ys[1], ys[0])
        for y in ys:
            y.square().sum().backward()
        torch.testing.assert_close(xs[1].grad, xs[0].grad)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_module.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled_module.named_buffers()):
        torch.testing.assert_close(b, a, msg=name)


def test_public_api():
    assert {"CBAM", "ChannelGate", "SpatialGate", "SE"} <= set(cbam_kernels.__all__)


@pytest.mark.parametrize("module", ["cbam", "se"])
def test_autograd_saves_only_x_full_size(device_backend, module):
    """Everything autograd keeps besides x is a per-(n, c) or per-(n, h, w) tensor (with the
    residual epilogue, also the block output, which the next layer keeps anyway)."""
    gate = (CBAM(16, 4) if module == "cbam" else SE(16, 4)).to(device_backend)
    x = torch.randn(2, 16, 6, 5, device=device_backend, requires_grad=True)
    n, c, h, w = x.shape
    for residual, full_size in ((None, 1), (torch.randn_like(x), 2)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            gate(x, residual=residual)
        big = [t for t in saved if t.numel() >= x.numel()]
        assert len(big) == full_size, [tuple(t.shape) for t in saved]
        small = [t for t in saved if t.numel() < x.numel()]
        assert all(t.numel() <= 2 * n * max(c, h * w) for t in small)  # (K, N, C), (N, 2, H, W)
