"""The Triton passes (cbam_kernels.passes_triton) against their specification, passes_torch.

Runs on a CUDA device, or on the CPU through the Triton interpreter: set TRITON_INTERPRET=1
before the kernels are imported, i.e. run this file in its own process:

    TRITON_INTERPRET=1 python -m pytest -q tests/test_passes_triton.py

Both sides get the same (possibly low-precision) inputs and accumulate in float32, so float32
results agree to ~1e-5 and full-size low-precision outputs to one ulp of their dtype. Returned
tensors cannot be pre-filled with poison, so every comparison also fails on a NaN the reference
does not have (``assert_close`` with ``equal_nan=False``) and checks shape, dtype and strides.
"""

import os

import pytest
import torch

from cbam_kernels import passes_torch as ref

RUNNABLE = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not RUNNABLE, reason="needs a CUDA device or TRITON_INTERPRET=1")
if RUNNABLE:
    from cbam_kernels import passes_triton as tri

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 17, 3, 3), (3, 20, 1, 1), (2, 33, 9, 11)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPLITS = [1, 4]
RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # ~1 ulp
# (x layout, gy layout)
LAYOUT_PAIRS = [("nchw", "nchw"), ("cl", "cl"), ("nchw", "cl"), ("cl", "nchw")]
# Optional inputs of the backward passes per gate: SE has a channel gate fed by the average
# pool only, the CBAM channel gate adds the max pool; the spatial gate brings sa, gp, cstar.
GATES = {
    "se": ("ca", "ga"),
    "channel": ("ca", "ga", "gm"),
    "channel_max_only": ("ca", "gm"),
    "spatial": ("sa", "gp"),
    "cbam": ("ca", "sa", "gp", "ga", "gm"),
}


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "cl" else t.contiguous()


def _x(shape, dtype, layout="nchw", seed=0):
    g = torch.Generator().manual_seed(seed)
    return _layout(torch.randn(shape, generator=g).to(dtype).to(DEVICE), layout)


def _small(shape, names, seed=1):
    """The small optional inputs named in ``names`` (others None); cstar/pstar come with gp/gm."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    make = {
        "ca": lambda: torch.rand(n, c, generator=g),
        "sa": lambda: torch.rand(n, h, w, generator=g),
        "gp": lambda: torch.randn(n, 2, h, w, generator=g),
        "cstar": lambda: torch.randint(0, max(c, 1), (n, h, w), generator=g, dtype=torch.int32),
        "ga": lambda: torch.randn(n, c, generator=g),
        "gm": lambda: torch.randn(n, c, generator=g),
        "pstar": lambda: torch.randint(0, h * w, (n, c), generator=g, dtype=torch.int32),
    }
    partner = {"gp": "cstar", "gm": "pstar"}
    wanted = set(names) | {partner[k] for k in names if k in partner}
    return {k: make[k]().to(DEVICE) if k in wanted else None for k in make}


def _check_small(out, expected):
    """A float32/int32 result: same shape and dtype, contiguous, equal to ~1e-5."""
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _check_full(out, expected, x, equal_nan=False):
    """A full-size result: x's dtype and empty_like(x) strides, equal to about one ulp."""
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(out, expected, rtol=RTOL[x.dtype], atol=1e-5, equal_nan=equal_nan)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pool_hw(shape, dtype, layout, split):
    x = _x(shape, dtype, layout)
    avg, mx, arg = tri.pool_hw(x, True, split=split)
    ravg, rmx, rarg = ref.pool_hw(x, True)
    _check_small(avg, ravg)
    _check_small(mx, rmx)
    assert torch.equal(arg, rarg)
    avg, mx, arg = tri.pool_hw(x, False, split=split)
    _check_small(avg, ravg)
    assert mx.numel() == 0 and arg.numel() == 0 and arg.dtype == torch.int32


@pytest.mark.parametrize("with_ca", [False, True])
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_pool(shape, dtype, layout, split, with_ca):
    x = _x(shape, dtype, layout)
    ca = _small(shape, ["ca"] if with_ca else [])["ca"]
    for max_first in (True, False):
        p, cstar = tri.channel_pool(x, ca, max_first, split=split)
        rp, rcstar = ref.channel_pool(x, ca, max_first)
        _check_small(p, rp)
        assert torch.equal(cstar, rcstar)


@pytest.mark.parametrize("gates", [(), ("ca",), ("sa",), ("ca", "sa")])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_apply_gates(shape, dtype, layout, gates):
    x = _x(shape, dtype, layout)
    s = _small(shape, gates)
    _check_full(tri.apply_gates(x, s["ca"], s["sa"]), ref.apply_gates(x, s["ca"], s["sa"]), x)


@pytest.mark.parametrize("layouts", LAYOUT_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_apply_gates_residual_epilogue(shape, dtype, layouts):
    """relu(x * ca * sa + residual), the residual in x's layout or the other one; NaN kept."""
    x = _x(shape, dtype, layouts[0])
    residual = _x(shape, dtype, layouts[1], seed=2)
    residual[0, 0, 0, 0] = float("nan")
    s = _small(shape, ("ca", "sa"))
    out = tri.apply_gates(x, s["ca"], s["sa"], residual)
    _check_full(out, ref.apply_gates(x, s["ca"], s["sa"], residual), x, equal_nan=True)
    assert (out[~out.isnan()] >= 0).all() and out.isnan().sum() == 1


@pytest.mark.parametrize("with_ca", [False, True])
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_spatial(shape, dtype, layouts, split, with_ca):
    x, gy = _x(shape, dtype, layouts[0]), _x(shape, dtype, layouts[1], seed=2)
    ca = _small(shape, ["ca"] if with_ca else [])["ca"]
    _check_small(tri.grad_spatial(gy, x, ca, split=split), ref.grad_spatial(gy, x, ca))


@pytest.mark.parametrize("terms", [(), ("sa", "gp")])  # SE, CBAM
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_channel(shape, dtype, layouts, split, terms):
    x, gy = _x(shape, dtype, layouts[0]), _x(shape, dtype, layouts[1], seed=2)
    s = _small(shape, terms)
    for max_first in (True, False):
        args = (gy, x, s["sa"], s["gp"], s["cstar"], max_first)
        _check_small(tri.grad_channel(*args, split=split), ref.grad_channel(*args))


@pytest.mark.parametrize("gate", sorted(GATES))
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_input(shape, dtype, layouts, gate):
    x, gy = _x(shape, dtype, layouts[0]), _x(shape, dtype, layouts[1], seed=2)
    s = _small(shape, GATES[gate])
    for max_first in (True, False):
        args = (gy, x, s["ca"], s["sa"], s["gp"], s["cstar"], max_first, s["ga"], s["gm"],
                s["pstar"])
        _check_full(tri.grad_input(*args), ref.grad_input(*args), x)


ODD_LAYOUTS = ["sliced", "sliced_odd_w", "h_is_1", "w_is_1", "permuted_dense", "expanded"]


def _odd_layout(name, shape, seed=0):
    """An fp32 tensor of ``shape`` in the layout ``name`` (neither NCHW nor channels_last)."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 2 * c, h + 2, 2 * w + 1, generator=g).to(DEVICE)
    x = {
        "sliced": lambda: base[:, ::2, :h, :-1].contiguous()[..., ::2],  # H, W merge, sHW = 2
        "sliced_odd_w": lambda: base[:, :c, :h, 1::2],          # H, W do not merge: copied
        "h_is_1": lambda: base[:, :c, 1:2, :w],                 # H == 1, unrelated H stride
        "w_is_1": lambda: base[:, :c, :h, 2:3],                 # W == 1, unrelated W stride
        "permuted_dense": lambda: base[:, :c, :h, :w].permute(0, 2, 1, 3).contiguous()
                                                     .permute(0, 2, 1, 3),  # copied, out too
        "expanded": lambda: base[:, :c, :1, :1].expand(shape),  # H*W stride 0
    }[name]()
    assert x.shape == shape
    return x


@pytest.mark.parametrize("name", ODD_LAYOUTS)
def test_odd_layouts(name):
    shape = {"h_is_1": (2, 6, 1, 5), "w_is_1": (2, 6, 3, 1)}.get(name, (2, 6, 3, 5))
    x = _odd_layout(name, shape)
    gy = _odd_layout("sliced" if name == "permuted_dense" else "permuted_dense", shape, seed=1)
    s = _small(shape, GATES["cbam"])
    for out, expected in zip(tri.pool_hw(x, True, split=2), ref.pool_hw(x, True)):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for out, expected in zip(tri.channel_pool(x, s["ca"], False, split=2),
                             ref.channel_pool(x, s["ca"], False)):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    _check_full(tri.apply_gates(x, s["ca"], s["sa"]), ref.apply_gates(x, s["ca"], s["sa"]), x)
    _check_small(tri.grad_spatial(gy, x, s["ca"]), ref.grad_spatial(gy, x, s["ca"]))
    args = (gy, x, s["sa"], s["gp"], s["cstar"], True)
    _check_small(tri.grad_channel(*args, split=2), ref.grad_channel(*args))
    args = (gy, x, s["ca"], s["sa"], s["gp"], s["cstar"], True, s["ga"], s["gm"], s["pstar"])
    _check_full(tri.grad_input(*args), ref.grad_input(*args), x)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_pick_first_index(dtype, layout, split):
    shape = (2, 33, 9, 11)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 2, shape, generator=g).float()
    x[0, 5] = float("-inf")       # a channel that is -inf everywhere
    x[1, :, 2, 3] = float("-inf")  # a position that is -inf in every channel
    x = _layout(x.to(dtype).to(DEVICE), layout)
    ca = torch.randint(1, 3, (2, 33), generator=g).float().to(DEVICE)
    _, mx, arg = tri.pool_hw(x, True, split=split)
    _, rmx, rarg = ref.pool_hw(x, True)
    assert torch.equal(mx, rmx) and torch.equal(arg, rarg)
    for ca_ in (None, ca):
        p, cstar = tri.channel_pool(x, ca_, True, split=split)
        rp, rcstar = ref.channel_pool(x, ca_, True)
        assert torch.equal(p[:, 0], rp[:, 0]) and torch.equal(cstar, rcstar)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_nan_propagates_to_max(layout, split):
    n, c, h, w = shape = (2, 33, 9, 11)
    x = torch.randn(shape)
    x[0, 3, 4, 5] = x[0, 3, 8, 10] = float("nan")  # two NaNs in one (n, c) row / one position
    x[0, 20, 8, 10] = float("nan")
    x[1, :, 0, 0] = float("nan")                   # a whole position, so every channel row
    x = _layout(x.to(DEVICE), layout)
    _, mx, arg = tri.pool_hw(x, True, split=split)
    _, rmx, rarg = ref.pool_hw(x, True)
    torch.testing.assert_close(mx, rmx, equal_nan=True)
    assert torch.equal(mx.isnan(), x.flatten(2).isnan().any(dim=2))
    assert torch.equal(arg, rarg) and 0 <= arg.min() and arg.max() < h * w
    p, cstar = tri.channel_pool(x, None, False, split=split)
    rp, rcstar = ref.channel_pool(x, None, False)
    torch.testing.assert_close(p, rp, equal_nan=True)
    assert torch.equal(p[:, 1].isnan(), x.isnan().any(dim=1))
    assert torch.equal(cstar, rcstar) and 0 <= cstar.min() and cstar.max() < c


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5)])
def test_zero_size(shape):
    """Correctly shaped results without a launch; an empty sum over C is zero."""
    n, c, h, w = shape
    x = gy = torch.randn(shape, device=DEVICE)
    s = _small(shape, GATES["cbam"])
    f32, i32 = torch.float32, torch.int32
    results = [
        (tri.pool_hw(x, True), [((n, c), f32), ((n, c), f32), ((n, c), i32)]),
        (tri.apply_gates(x, s["ca"], s["sa"]), [(shape, f32)]),
        (tri.grad_spatial(gy, x, s["ca"]), [((n, h, w), f32)]),
        (tri.grad_channel(gy, x, s["sa"], s["gp"], s["cstar"], True), [((n, c), f32)]),
        (tri.grad_input(gy, x, *(s[k] for k in ("ca", "sa", "gp", "cstar")), True,
                        *(s[k] for k in ("ga", "gm", "pstar"))), [(shape, f32)]),
    ]
    if c > 0:
        results.append((tri.channel_pool(x, s["ca"], True),
                        [((n, 2, h, w), f32), ((n, h, w), i32)]))
    for out, expected in results:
        out = out if isinstance(out, tuple) else (out,)
        assert [(tuple(o.shape), o.dtype) for o in out] == expected
    torch.testing.assert_close(tri.grad_spatial(gy, x, s["ca"]), ref.grad_spatial(gy, x, s["ca"]))


def test_rejects_float64():
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(AssertionError, match="float16/bfloat16/float32"):
        tri.pool_hw(x, True)
    with pytest.raises(AssertionError, match="float16/bfloat16/float32"):
        tri.apply_gates(x, None, None)
