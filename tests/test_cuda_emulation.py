"""The CUDA kernels of ``csrc/`` on the CPU, through the emulation in ``tests/cuda_emulation``,
against their specification ``cbam_kernels.ops.torch.passes``.

No GPU needed: the kernels and ops are compiled with the host compiler (once per content of the
sources) and run with every block's threads as fibers. The memory checks are on throughout:
every kernel access is checked for bounds and alignment, and fresh tensors are filled with 0xff
bytes, so an output element a kernel does not write reads as NaN. Shapes are small (up to
tens of thousands of threads a launch) but make the reductions split (S > 1, asserted), leave
warps partly idle (inner lengths 1, 3, 33), and take the 16-byte, 8-byte and one-element paths
and the elementwise passes' flat view of NCHW samples (asserted from the names of the launched
kernels). The self-test kernels show that each kind of
bug the emulation exists to catch is caught.
"""

import re
import shutil

import pytest
import torch

from cbam_kernels.ops.torch import passes as ref
from pass_testing import (DTYPES, GATES, check_full, check_masked_gy, check_partials,
                          grad_channel_args, grad_input_args, odd_layout, rand_full, rand_small,
                          relu_masked, to_layout)

if shutil.which("c++") is None:
    pytest.skip("the CUDA emulation needs a host C++ compiler (c++)", allow_module_level=True)

import cuda_emulation  # noqa: E402  (after the check: importing it needs nothing, using it does)

emu = cuda_emulation.passes
LAYOUT_PAIRS = [("nchw", "nchw"), ("cl", "cl"), ("nchw", "cl"), ("cl", "nchw")]
# (2, 16, 7, 7) and (3, 4, 2, 1): the elementwise passes' flat view in NCHW, vectors crossing the
# ends of rows of H*W (once, or several times: H*W below the vector).
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 17, 3, 3), (3, 20, 1, 1), (2, 33, 9, 11),
          (2, 8, 4, 4), (1, 12, 2, 3), (2, 12, 16, 16), (2, 16, 7, 7), (3, 4, 2, 1)]
# Shapes whose reductions split (S > 1), per layout: over H*W ("hw") and/or over C ("c"). In
# NCHW a reduction over H*W is an inner one and over C an outer one, in channels_last the reverse.
SPLIT = {(1, 3, 32, 65): {"nchw": "hw", "cl": "hw"}, (2, 8, 64, 64): {"nchw": "hw", "cl": "hw"},
         (1, 2056, 1, 2): {"nchw": "c", "cl": "c"}, (1, 4096, 2, 2): {"nchw": "c", "cl": "c"},
         (1, 520, 1, 3): {"nchw": "c", "cl": ""}}
SPLIT_SHAPES = list(SPLIT)


@pytest.fixture(scope="module", autouse=True)
def _memory_checks():
    """The library built and loaded, and its memory checks on for every test of this module."""
    with cuda_emulation.memory_checks():
        yield


def full(shape, dtype, layout="nchw", seed=0):
    """A random full-size CPU tensor (x, gy, residual, out)."""
    return rand_full(shape, dtype, layout, seed).cpu()


def small(shape, names, seed=1):
    """The small inputs named in ``names`` (see ``rand_small``), on the CPU."""
    return {k: None if v is None else v.cpu() for k, v in rand_small(shape, names, seed).items()}


def sum_atol(terms):
    """The absolute tolerance of a float32 sum of ``terms`` products of O(1) values, added in
    another order than the reference's: rounding errors grow like a random walk."""
    return 1e-5 * max(1.0, terms ** 0.5)


def check_pool_hw(x):
    """pool_hw with and without the max against the specification; returns S."""
    avg, mx, arg = ref.pool_hw(x, True)
    check_partials(emu.pool_hw(x, False), avg)
    return check_partials(emu.pool_hw(x, True), avg, mx, arg)


def check_channel_pool(x, ca):
    """channel_pool against the specification's map p and channel arg-max; returns S."""
    p, cstar = ref.channel_pool(x, ca, True)
    return check_partials(emu.channel_pool(x, ca), p[:, 1].flatten(1), p[:, 0].flatten(1),
                          cstar.flatten(1))


def check_grad_spatial(gy, x, ca, out=None):
    """grad_spatial (with the epilogue's ReLU when out is given) and its masked gy; returns S."""
    partials, gres = emu.grad_spatial(gy, x, ca, out)
    g = check_epilogue(gres, gy, out, x)
    expected = ref.grad_spatial(g, x, ca).flatten(1)
    return check_partials(partials, expected, atol=sum_atol(x.shape[1]))


def check_grad_channel(gy, x, s, max_first, out=None):
    """grad_channel (with the epilogue's ReLU when out is given) and its masked gy; returns S."""
    partials, gres = emu.grad_channel(*grad_channel_args(gy, x, s, max_first), out)
    g = check_epilogue(gres, gy, out, x)
    expected = ref.grad_channel(*grad_channel_args(g, x, s, max_first))
    return check_partials(partials, expected, atol=sum_atol(x.shape[2] * x.shape[3]))


def check_epilogue(gres, gy, out, x):
    """No masked gy without ``out``, else the exact one; returns the gy that the reduction
    sees."""
    if out is None:
        assert gres is None
        return gy
    check_masked_gy(gres, gy, out, x)
    return relu_masked(gy, out)


def epilogue_output(shape, dtype, layout):
    """An ``out`` of relu(... + residual): positive, zero (masks gy) and one NaN (passes gy)."""
    out = torch.relu(full(shape, dtype, layout, seed=5))
    out[0, 0, 0, 0] = float("nan")
    return out


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + SPLIT_SHAPES)
def test_pool_hw(shape, dtype, layout):
    """Mean partials, and max and first h*w arg-max partials (None without with_max)."""
    check_pool_hw(full(shape, dtype, layout))


@pytest.mark.parametrize("with_ca", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + SPLIT_SHAPES)
def test_channel_pool(shape, dtype, layout, with_ca):
    """Mean, max and first channel arg-max partials of x * ca over C."""
    check_channel_pool(full(shape, dtype, layout), small(shape, ["ca"] if with_ca else [])["ca"])


@pytest.mark.parametrize("gates", [(), ("ca", "sa")])
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_apply_gates(shape, dtype, layouts, gates):
    """x * ca * sa, and relu(x * ca * sa + residual) with the residual in either layout."""
    x, residual = full(shape, dtype, layouts[0]), full(shape, dtype, layouts[1], seed=2)
    s = small(shape, gates)
    check_full(emu.apply_gates(x, s["ca"], s["sa"]), ref.apply_gates(x, s["ca"], s["sa"]), x)
    check_full(emu.apply_gates(x, s["ca"], s["sa"], residual),
               ref.apply_gates(x, s["ca"], s["sa"], residual), x)


@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("with_ca", [False, True])
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + SPLIT_SHAPES)
def test_grad_spatial(shape, dtype, layouts, with_ca, with_out):
    """Partial sums over C of g * x * ca, g = gy or gy through the epilogue's ReLU (out in x's
    layout), gy in x's layout or the other one."""
    x, gy = full(shape, dtype, layouts[0]), full(shape, dtype, layouts[1], seed=2)
    out = epilogue_output(shape, dtype, layouts[0]) if with_out else None
    check_grad_spatial(gy, x, small(shape, ["ca"] if with_ca else [])["ca"], out)


@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("terms", [(), ("sa", "gp")])
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + SPLIT_SHAPES)
def test_grad_channel(shape, dtype, layouts, terms, with_out):
    """Partial sums over H*W of gx1(g) * x with and without the terms sa and gp of gx1."""
    x, gy = full(shape, dtype, layouts[0]), full(shape, dtype, layouts[1], seed=2)
    out = epilogue_output(shape, dtype, layouts[0]) if with_out else None
    s = small(shape, terms)
    for max_first in (True, False):
        check_grad_channel(gy, x, s, max_first, out)


@pytest.mark.parametrize("gate", sorted(GATES))
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_input(shape, dtype, layouts, gate):
    """The input gradient with the optional inputs of each gate (SE, channel, spatial, CBAM)."""
    x, gy = full(shape, dtype, layouts[0]), full(shape, dtype, layouts[1], seed=2)
    s = small(shape, GATES[gate])
    args = grad_input_args(gy, x, s, gate != "spatial")
    check_full(emu.grad_input(*args), ref.grad_input(*args), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", SPLIT_SHAPES)
def test_reductions_split(shape, layout, dtype):
    """S depends on the shape and layout only (every pass reducing an axis splits it alike), and
    is > 1 where SPLIT says: what the consumers of partials depend on."""
    x, gy = full(shape, dtype, layout), full(shape, dtype, layout, seed=2)
    s = small(shape, GATES["cbam"])
    over_hw = {check_pool_hw(x), check_grad_channel(gy, x, s, True)}
    over_c = {check_channel_pool(x, s["ca"]), check_grad_spatial(gy, x, s["ca"])}
    assert len(over_hw) == len(over_c) == 1
    assert (over_hw.pop() > 1) == ("hw" in SPLIT[shape][layout])
    assert (over_c.pop() > 1) == ("c" in SPLIT[shape][layout])


def every_pass(x, gy, s, out):
    """Runs each of the six emulated passes once on x and gy (CBAM's small inputs ``s``)."""
    emu.pool_hw(x, True)
    emu.channel_pool(x, s["ca"])
    emu.apply_gates(x, s["ca"], s["sa"], gy)
    emu.grad_spatial(gy, x, s["ca"], out)
    emu.grad_channel(*grad_channel_args(gy, x, s, True), out)
    emu.grad_input(*grad_input_args(gy, x, s, True))


def vector_bytes(kernels, dtype):
    """The bytes per load (0: one element) of each launched kernel, from its template argument
    VEC."""
    size = torch.finfo(dtype).bits // 8
    widths = {int(re.search(r"_kernel<(?:(?:true|false), )?(\d+),", k).group(1)) for k in kernels}
    return {0 if vec == 1 else vec * size for vec in widths}


FLAT = 2  # the layout template argument of an elementwise pass over whole samples (kFlat)


def flat(kernels):
    """Whether each elementwise kernel (apply_gates, grad_input) takes the flat view."""
    return [int(re.search(r"(?:ApplyGates|GradInput)<[^,]+, \d+, (\d)>", k).group(1)) == FLAT
            for k in kernels]


@pytest.mark.parametrize(("shape", "dtype", "layouts", "reductions", "elementwise"), [
    ((2, 8, 4, 4), torch.float32, ("nchw", "nchw"), 16, 16),
    ((2, 8, 4, 4), torch.float16, ("cl", "cl"), 16, 16),
    ((2, 8, 4, 4), torch.bfloat16, ("nchw", "nchw"), 16, 16),
    ((1, 12, 2, 3), torch.float32, ("nchw", "nchw"), 8, 16),  # elementwise: the flat view
    ((1, 12, 2, 3), torch.bfloat16, ("cl", "cl"), 8, 8),
    ((2, 16, 7, 7), torch.float16, ("nchw", "nchw"), 0, 16),  # 7x7: rows of 98 bytes
    ((2, 8, 14, 14), torch.bfloat16, ("nchw", "nchw"), 8, 16),
    ((2, 3, 7, 7), torch.float16, ("nchw", "nchw"), 0, 0),    # C*H*W = 147: no vector fits
    ((2, 8, 4, 4), torch.float32, ("nchw", "cl"), 0, 0),      # gy and out in the other layout
    ((2, 3, 5, 7), torch.float16, ("cl", "cl"), 0, 0),        # C = 3: no vector fits
])
def test_vector_paths(shape, dtype, layouts, reductions, elementwise):
    """Every pass takes the 16-byte, 8-byte or one-element path that the layouts allow; the
    elementwise passes over NCHW tensors take the flat view of each sample (C*H*W contiguous)
    where it allows wider vectors than the rows of H*W do."""
    x, gy = full(shape, dtype, layouts[0]), full(shape, dtype, layouts[1], seed=2)
    cuda_emulation.launched_kernels()
    every_pass(x, gy, small(shape, GATES["cbam"]), epilogue_output(shape, dtype, layouts[1]))
    kernels = cuda_emulation.launched_kernels()
    assert len(kernels) == 6
    elementwise_kernels = [kernels[2], kernels[5]]  # apply_gates, grad_input
    reduction_kernels = [kernels[i] for i in (0, 1, 3, 4)]
    if layouts[0] != layouts[1]:  # pool_hw and channel_pool read x only
        reduction_kernels = reduction_kernels[2:]
    assert vector_bytes(reduction_kernels, dtype) == {reductions}
    assert vector_bytes(elementwise_kernels, dtype) == {elementwise}
    assert flat(elementwise_kernels) == [elementwise > reductions] * 2


@pytest.mark.parametrize("name", ["sliced", "sliced_odd_w", "h_is_1", "w_is_1",
                                  "permuted_dense", "expanded", "offset"])
def test_odd_layouts(name):
    """Every pass on x, gy and out in layouts that are neither NCHW nor channels_last, or not
    aligned for vector loads."""
    shape = {"h_is_1": (2, 6, 1, 5), "w_is_1": (2, 6, 3, 1), "offset": (2, 8, 4, 4)}.get(
        name, (2, 6, 3, 5))
    x = odd_layout(name, shape).cpu()
    gy = odd_layout("sliced" if name == "permuted_dense" else "permuted_dense", shape, 1).cpu()
    out = torch.relu(odd_layout(name, shape, 2).cpu())
    s = small(shape, GATES["cbam"])
    check_pool_hw(x)
    check_channel_pool(x, s["ca"])
    for residual in (None, gy):
        check_full(emu.apply_gates(x, s["ca"], s["sa"], residual),
                   ref.apply_gates(x, s["ca"], s["sa"], residual), x)
    check_grad_spatial(gy, x, s["ca"], out)
    check_grad_channel(gy, x, s, True, out)
    args = grad_input_args(gy, x, s, True)
    check_full(emu.grad_input(*args), ref.grad_input(*args), x)


@pytest.mark.parametrize("with_nan", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", [(2, 33, 3, 11), (1, 3, 32, 65), (1, 520, 1, 3)])
def test_ties_and_nan(shape, layout, with_nan):
    """Equal maxima (small integers; a channel and a position that are -inf throughout) go to
    the first index; a NaN is the max, at its first index, as in torch.max."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 2, shape, generator=g).float()
    x[0, c // 2] = float("-inf")
    x[-1, :, h // 2, w // 2] = float("-inf")
    if with_nan:
        x[0, 0, h - 1, w - 1] = x[0, 0, 0, 0] = float("nan")  # two in one (n, c) row
        x[-1, :, 0, 0] = float("nan")                         # a whole position
    x = to_layout(x, layout)
    check_pool_hw(x)
    check_channel_pool(x, None)
    check_channel_pool(x, torch.randint(1, 3, (n, c), generator=g).float())


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5)])
def test_zero_size(shape):
    """Nothing is launched; S = 1; sums over an empty axis are 0 (a mean NaN); a max over an
    empty axis is an error; full-size results have x's shape."""
    n, c, h, w = shape
    x = gy = out = torch.randn(shape)
    s = small(shape, GATES["cbam"])
    cuda_emulation.launched_kernels()
    assert emu.apply_gates(x, s["ca"], s["sa"], gy).shape == shape
    assert emu.grad_input(*grad_input_args(gy, x, s, True)).shape == shape
    check_grad_spatial(gy, x, s["ca"], out)
    check_grad_channel(gy, x, s, True, out)
    check_partials(emu.pool_hw(x, False), x.float().flatten(2).mean(dim=2))
    if h * w > 0 or n * c == 0:
        check_pool_hw(x)
    else:
        with pytest.raises(RuntimeError, match=r"max over an empty H\*W"):
            emu.pool_hw(x, True)
    if c > 0 or n * h * w == 0:
        check_channel_pool(x, s["ca"])
    else:
        with pytest.raises(RuntimeError, match="max over an empty C"):
            emu.channel_pool(x, s["ca"])
    assert cuda_emulation.launched_kernels() == []


def test_bad_arguments_are_named():
    """The ops check their arguments and name the one that is wrong."""
    x = full((2, 4, 3, 3), torch.float16)
    with pytest.raises(RuntimeError, match="ca must have shape"):
        emu.apply_gates(x, torch.rand(2, 5), None)
    with pytest.raises(RuntimeError, match="sa must be Float"):
        emu.apply_gates(x, None, torch.rand(2, 3, 3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="gy is Float, x is Half"):
        emu.grad_spatial(x.float(), x, None)
    with pytest.raises(RuntimeError, match="out has shape"):
        emu.grad_spatial(x, x, None, x[:, :3])
    with pytest.raises(RuntimeError, match="residual has shape"):
        emu.apply_gates(x, None, None, x[:, :3])
    with pytest.raises(RuntimeError, match="gp needs cstar"):
        emu.grad_channel(x, x, None, torch.rand(2, 2, 3, 3), None, True)
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16 or float32"):
        emu.pool_hw(x.double(), True)


@pytest.mark.parametrize(("kernel", "message"), [
    ("missing_barrier", r"reads shared s\[1\] before any thread of the block wrote it"),
    ("divergent_barrier", "a barrier must be reached by every thread of the block"),
    ("inactive_lanes", r"an inactive lane in the mask"),
    ("out_of_bounds", "out-of-bounds 4-byte access at byte 1024 of a 1024-byte allocation"),
    ("misaligned", "misaligned 16-byte access at byte 4 .* needs 16-byte alignment"),
])
def test_the_emulation_catches(kernel, message):
    """Each kind of bug, in a small kernel of its own, is an error naming kernel and thread."""
    with pytest.raises(RuntimeError, match=rf"in emulation::self_test::{kernel}\(.*\), block "
                                           rf"\(0,0,0\) thread \(.*{message}"):
        cuda_emulation.ops().run_self_test(kernel, torch.zeros(4, 64))


def test_warp_collectives_follow_cuda():
    """Shuffles within 16-lane segments (a later segment gives the lane its own value), a
    ballot, any and all, and shared memory across a barrier give what CUDA gives."""
    out = torch.zeros(4, 64)
    cuda_emulation.ops().run_self_test("warp_semantics", out)
    lane = torch.arange(64) % 32
    segment_sum = torch.where(lane < 16, 120.0, 376.0)
    torch.testing.assert_close(out[0], segment_sum.flip(0))
    torch.testing.assert_close(out[1], torch.where(lane < 16, lane, lane - 16).float())
    torch.testing.assert_close(out[2], (lane % 3 == 0).float())
    torch.testing.assert_close(out[3], torch.ones(64))
