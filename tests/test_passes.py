"""The kernel backends' six passes against their specification, ``cbam_kernels.ops.torch.passes``.

The reductions return unfinished partials (``ops.types.Partials``), checked once combined
as ``ops/torch/passes.combine_partials`` specifies; the first backward reduction also applies the
ResNet epilogue's ReLU mask and returns the masked gy.

Every test runs once per kernel backend (the ``kernels`` fixture yields its passes module);
a backend that cannot run here is skipped with the reason:

* ``triton`` (``ops/triton/passes.py``; tests marked ``triton``) on a CUDA device, or on CPU tensors
  through Triton's interpreter. The interpreter must be enabled before the kernels are imported,
  so run it in its own process::

      TRITON_INTERPRET=1 python -m pytest -q tests/test_passes.py -m triton

  Its reductions also take ``split=`` (the number of ranges of the reduced axis that separate
  programs reduce); the tests of reductions run with one range and with several.
* ``cuda`` (``ops/cuda/passes.py``) when the extension ``cbam_kernels._C`` is built and a GPU is present.

Awkward shapes (larger ones only on a GPU: too slow for the interpreter), float32/float16/bfloat16,
NCHW and channels_last, gy and residual in the other layout, odd strides, ties, NaN and empty
tensors. Tolerances are in ``pass_testing``; results also fail on a NaN the reference does not
have, and on a GPU the free memory is poisoned with NaN first, so unwritten elements show up.
"""

import importlib

import pytest
import torch

from cbam_kernels.ops import backend
from cbam_kernels.ops.torch import passes as ref
from cbam_kernels.ops.torch.passes import combine_partials
from pass_testing import (DEVICE, DTYPES, GATES, check_full, check_masked_gy, check_partials,
                          grad_channel_args, grad_input_args, odd_layout, poison_free_memory,
                          rand_full, rand_small, relu_masked, to_layout)

UNAVAILABLE = {"triton": backend.triton_unavailable_reason(),
               "cuda": backend.cuda_unavailable_reason()}


def gpu_only(shapes):
    """``shapes`` on a GPU, none on the CPU (too slow for Triton's interpreter)."""
    return shapes if DEVICE == "cuda" else []


SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 17, 3, 3), (3, 20, 1, 1), (2, 33, 9, 11)] + \
    gpu_only([(2, 12, 16, 16), (2, 8, 64, 64), (2, 512, 4, 4), (1, 4096, 2, 2)])
SPLITS = [1, 4]
# (x layout, gy or residual layout)
LAYOUT_PAIRS = [("nchw", "nchw"), ("cl", "cl"), ("nchw", "cl"), ("cl", "nchw")]
# What each backend raises: Triton asserts on its arguments, the CUDA ops raise c10::Error.
FLOAT64_ERROR = {"triton": (AssertionError, "float16/bfloat16/float32"),
                 "cuda": (RuntimeError, "x must be float16, bfloat16 or float32")}
EMPTY_MAX_ERROR = {"triton": dict.fromkeys(("pool_hw", "channel_pool"), "zero-size axis"),
                   "cuda": {"pool_hw": r"empty H\*W", "channel_pool": "empty C"}}


def _param(name, *values, test_id):
    """A parameter set for the backend ``name``: marked ``triton`` for Triton, skipped with the
    reason where the backend cannot run."""
    reason = UNAVAILABLE[name]
    marks = [pytest.mark.skipif(bool(reason), reason=f"{name} kernels cannot run here: {reason}")]
    marks += [pytest.mark.triton] if name == "triton" else []
    return pytest.param(name, *values, marks=marks, id=test_id)


def over_backends(splits=None):
    """Parametrize a test over the backends (the ``kernels`` fixture). With ``splits`` the test
    also takes ``split_kw``, keywords for the reductions: ``split=s`` for each s in ``splits`` on
    Triton, nothing on CUDA (its kernels choose their own splits)."""
    if splits is None:
        return pytest.mark.parametrize("kernels", [_param(n, test_id=n) for n in UNAVAILABLE],
                                       indirect=True)
    params = [_param("triton", {"split": s}, test_id=f"triton-split{s}") for s in splits]
    params.append(_param("cuda", {}, test_id="cuda"))
    return pytest.mark.parametrize(("kernels", "split_kw"), params, indirect=["kernels"])


@pytest.fixture(scope="module")
def kernels(request):
    """The passes module of the backend named by the parameter, imported only here: importing
    ops/triton fixes whether it interprets, ops/cuda needs the extension."""
    return importlib.import_module(f"cbam_kernels.ops.{request.param}.passes")


def _errors(table, kernels):
    """The entry of ``table`` (keyed by backend name) for the passes module ``kernels``."""
    return table[kernels.__name__.split(".")[-2]]


@pytest.fixture(autouse=True)
def _poison():
    """NaN in the free GPU memory before each test (see ``poison_free_memory``)."""
    poison_free_memory()


@over_backends(SPLITS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pool_hw(kernels, split_kw, shape, dtype, layout):
    """Mean, max and first arg-max over H*W as partials; no max and arg-max without with_max."""
    x = rand_full(shape, dtype, layout)
    ravg, rmx, rarg = ref.pool_hw(x, True)
    check_partials(kernels.pool_hw(x, True, **split_kw), ravg, rmx, rarg)
    check_partials(kernels.pool_hw(x, False, **split_kw), ravg)


@over_backends(SPLITS)
@pytest.mark.parametrize("with_ca", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_pool(kernels, split_kw, shape, dtype, layout, with_ca):
    """Mean, max and first channel arg-max of x * ca over C as partials."""
    x = rand_full(shape, dtype, layout)
    ca = rand_small(shape, ["ca"] if with_ca else [])["ca"]
    check_partials(kernels.channel_pool(x, ca, **split_kw), *_channel_pool_ref(x, ca))


def _channel_pool_ref(x, ca):
    """The specification's channel pool as (mean, max, arg), each (N, H*W)."""
    p, cstar = ref.channel_pool(x, ca, True)
    return p[:, 1].flatten(1), p[:, 0].flatten(1), cstar.flatten(1)


@over_backends()
@pytest.mark.parametrize("gates", [(), ("ca",), ("sa",), ("ca", "sa")])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_apply_gates(kernels, shape, dtype, layout, gates):
    """x * ca * sa, each gate optional, in x's dtype and memory format."""
    x = rand_full(shape, dtype, layout)
    s = rand_small(shape, gates)
    check_full(kernels.apply_gates(x, s["ca"], s["sa"]), ref.apply_gates(x, s["ca"], s["sa"]), x)


@over_backends()
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_apply_gates_residual_epilogue(kernels, shape, dtype, layouts):
    """relu(x * ca * sa + residual), the residual in x's layout or the other one; NaN kept."""
    x = rand_full(shape, dtype, layouts[0])
    residual = rand_full(shape, dtype, layouts[1], seed=2)
    residual[0, 0, 0, 0] = float("nan")
    s = rand_small(shape, ("ca", "sa"))
    out = kernels.apply_gates(x, s["ca"], s["sa"], residual)
    check_full(out, ref.apply_gates(x, s["ca"], s["sa"], residual), x, equal_nan=True)
    assert out.isnan().sum() == 1 and (out >= 0).sum() == out.numel() - 1


def _epilogue_output(shape, dtype, layout):
    """A forward output of the ResNet epilogue: relu'd values, zeros, and one NaN."""
    out = torch.relu(rand_full(shape, dtype, layout, seed=5))
    out[0, 0, 0, 0] = float("nan")
    return out


@over_backends(SPLITS)
@pytest.mark.parametrize("with_ca", [False, True])
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "epilogue"])
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_spatial(kernels, split_kw, shape, dtype, layouts, epilogue, with_ca):
    """Partials of sum over C of gy * x * ca, gy in x's layout or the other one; with the
    epilogue's output, gy masked by its ReLU first and returned."""
    x, gy = rand_full(shape, dtype, layouts[0]), rand_full(shape, dtype, layouts[1], seed=2)
    ca = rand_small(shape, ["ca"] if with_ca else [])["ca"]
    out = _epilogue_output(shape, dtype, layouts[1]) if epilogue else None
    part, gres = kernels.grad_spatial(gy, x, ca, out, **split_kw)
    g = relu_masked(gy, out) if epilogue else gy
    check_partials(part, ref.grad_spatial(g, x, ca).flatten(1), atol=1e-4)
    if epilogue:
        check_masked_gy(gres, gy, out, x)
    else:
        assert gres is None


@over_backends(SPLITS)
@pytest.mark.parametrize("terms", [(), ("sa",), ("gp",), ("sa", "gp")])
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "epilogue"])
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_channel(kernels, split_kw, shape, dtype, layouts, epilogue, terms):
    """Partials of sum over H*W of gx1 * x with each term of gx1 (sa, gp) present or absent;
    with the epilogue's output, gy masked by its ReLU first and returned."""
    x, gy = rand_full(shape, dtype, layouts[0]), rand_full(shape, dtype, layouts[1], seed=2)
    s = rand_small(shape, terms)
    out = _epilogue_output(shape, dtype, layouts[0]) if epilogue else None
    g = relu_masked(gy, out) if epilogue else gy
    for max_first in (True, False):
        part, gres = kernels.grad_channel(*grad_channel_args(gy, x, s, max_first), out,
                                          **split_kw)
        check_partials(part, ref.grad_channel(*grad_channel_args(g, x, s, max_first)),
                       atol=1e-4)
        if epilogue:
            check_masked_gy(gres, gy, out, x)
        else:
            assert gres is None


@over_backends()
@pytest.mark.parametrize("gate", sorted(GATES))
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_input(kernels, shape, dtype, layouts, gate):
    """The input gradient with the optional inputs of each gate (SE, channel, spatial, CBAM)."""
    x, gy = rand_full(shape, dtype, layouts[0]), rand_full(shape, dtype, layouts[1], seed=2)
    s = rand_small(shape, GATES[gate])
    for max_first in (True, False):
        args = grad_input_args(gy, x, s, max_first)
        check_full(kernels.grad_input(*args), ref.grad_input(*args), x)


@over_backends(splits=[2])
@pytest.mark.parametrize("name", ["sliced", "sliced_odd_w", "h_is_1", "w_is_1",
                                  "permuted_dense", "expanded"])
def test_odd_layouts(kernels, split_kw, name):
    """Every pass on x (and gy, residual, out) in layouts that are neither NCHW nor
    channels_last."""
    shape = {"h_is_1": (2, 6, 1, 5), "w_is_1": (2, 6, 3, 1)}.get(name, (2, 6, 3, 5))
    x = odd_layout(name, shape)
    gy = odd_layout("sliced" if name == "permuted_dense" else "permuted_dense", shape, seed=1)
    out = torch.relu(odd_layout(name, shape, seed=2))
    s = rand_small(shape, GATES["cbam"])
    check_partials(kernels.pool_hw(x, True, **split_kw), *ref.pool_hw(x, True))
    check_partials(kernels.channel_pool(x, s["ca"], **split_kw), *_channel_pool_ref(x, s["ca"]))
    for residual in (None, gy):
        check_full(kernels.apply_gates(x, s["ca"], s["sa"], residual),
                   ref.apply_gates(x, s["ca"], s["sa"], residual), x)
    part, gres = kernels.grad_spatial(gy, x, s["ca"], out)
    check_partials(part, ref.grad_spatial(relu_masked(gy, out), x, s["ca"]).flatten(1))
    check_masked_gy(gres, gy, out, x)
    part, _ = kernels.grad_channel(*grad_channel_args(gy, x, s, True), **split_kw)
    check_partials(part, ref.grad_channel(*grad_channel_args(gy, x, s, True)))
    args = grad_input_args(gy, x, s, True)
    check_full(kernels.grad_input(*args), ref.grad_input(*args), x)


@over_backends(splits=[1, 3])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 33, 9, 11)] +
                         gpu_only([(1, 4096, 2, 2), (2, 8, 64, 64)]))
def test_ties_pick_first_index(kernels, split_kw, shape, dtype, layout):
    """Equal maxima (a channel and a position that are -inf throughout) go to the first index,
    across the ranges of a split too."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 2, shape, generator=g).float()
    x[0, c // 2] = float("-inf")
    x[-1, :, h // 2, w // 2] = float("-inf")
    x = to_layout(x.to(dtype).to(DEVICE), layout)
    ca = torch.randint(1, 3, (n, c), generator=g).float().to(DEVICE)
    check_partials(kernels.pool_hw(x, True, **split_kw), *ref.pool_hw(x, True))
    for ca_ in (None, ca):
        check_partials(kernels.channel_pool(x, ca_, **split_kw), *_channel_pool_ref(x, ca_))


@over_backends(splits=[1, 3])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_nan_propagates_to_max(kernels, split_kw, layout):
    """A NaN is the max, at its first index, as in torch.max."""
    n, c, h, w = shape = (2, 33, 9, 11)
    x = torch.randn(shape)
    x[0, 3, 4, 5] = x[0, 3, 8, 10] = float("nan")  # two NaNs in one (n, c) row / one position
    x[0, 20, 8, 10] = float("nan")
    x[1, :, 0, 0] = float("nan")                   # a whole position, so every channel row
    x = to_layout(x.to(DEVICE), layout)
    part = kernels.pool_hw(x, True, **split_kw)
    check_partials(part, *ref.pool_hw(x, True))
    assert torch.equal(combine_partials(part)[1].isnan(), x.flatten(2).isnan().any(dim=2))
    part = kernels.channel_pool(x, None, **split_kw)
    check_partials(part, *_channel_pool_ref(x, None))
    assert torch.equal(combine_partials(part)[1].isnan(), x.isnan().any(dim=1).flatten(1))


@over_backends()
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5)])
def test_zero_size(kernels, shape):
    """Correctly shaped results; an empty sum is zero; a max over an empty axis is an error."""
    n, c, h, w = shape
    x = gy = torch.randn(shape, device=DEVICE)
    s = rand_small(shape, GATES["cbam"])
    full_size = [kernels.apply_gates(x, s["ca"], s["sa"]),
                 kernels.grad_input(*grad_input_args(gy, x, s, True))]
    assert [(o.shape, o.dtype) for o in full_size] == [(shape, torch.float32)] * 2
    check_partials(kernels.grad_spatial(gy, x, s["ca"])[0], torch.zeros(n, h * w, device=DEVICE))
    check_partials(kernels.grad_channel(*grad_channel_args(gy, x, s, True))[0],
                   torch.zeros(n, c, device=DEVICE))
    empty_max = _errors(EMPTY_MAX_ERROR, kernels)
    if h * w > 0 or n * c == 0:
        part = kernels.pool_hw(x, True)
        assert part.max.shape[1:] == (n, c) and part.arg.dtype == torch.int32
    else:
        with pytest.raises(RuntimeError, match=empty_max["pool_hw"]):
            kernels.pool_hw(x, True)
    if c > 0 or n * h * w == 0:
        part = kernels.channel_pool(x, s["ca"])
        assert part.max.shape[1:] == (n, h * w) and part.arg.dtype == torch.int32
    else:
        with pytest.raises(RuntimeError, match=empty_max["channel_pool"]):
            kernels.channel_pool(x, s["ca"])


@over_backends()
def test_rejects_float64(kernels):
    """float64 is for ops.torch.passes: the kernels refuse it with a clear error."""
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, device=DEVICE)
    error, message = _errors(FLOAT64_ERROR, kernels)
    with pytest.raises(error, match=message):
        kernels.pool_hw(x, True)
    with pytest.raises(error, match=message):
        kernels.apply_gates(x, None, None)
