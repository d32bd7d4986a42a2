"""The CUDA C++ backend: the extension ``cbam_kernels._C``, its ops and the backend switch.

Without a GPU: the built extension imports, every op is registered for CUDA with its intended
schema, the package works without the extension, and the backend report and
``CBAM_KERNELS_BACKEND`` validation behave. The extension is optional, so its tests skip when it
was not built, unless ``CBAM_KERNELS_BUILD_CUDA=1`` says that it must have been (then they fail).

With a GPU (skipped otherwise): every pass of ``passes_cuda`` against its specification
``passes_torch`` on awkward shapes, in float32/float16/bfloat16, NCHW and channels_last, gy in
another format, odd strides, ties, NaN and empty tensors; bitwise determinism; CUDA graph capture
and replay of a CBAM forward+backward; a non-default stream; a tensor of more than 2**31
elements. Both sides of a comparison get the same inputs and accumulate in float32, so float32
results agree to ~1e-5 and full-size low-precision outputs to one ulp of their dtype.
"""

import inspect
import os
import subprocess
import sys

import pytest
import torch

import cbam_kernels
from cbam_kernels import backend
from cbam_kernels import passes_torch as ref

try:
    import cbam_kernels._C  # noqa: F401
    BUILD_ERROR = ""
except ImportError as err:
    BUILD_ERROR = str(err)
BUILD_REQUIRED = os.environ.get("CBAM_KERNELS_BUILD_CUDA") == "1"
needs_ext = pytest.mark.skipif(
    bool(BUILD_ERROR) and not BUILD_REQUIRED,
    reason=f"cbam_kernels._C was not built ({BUILD_ERROR}); CBAM_KERNELS_BUILD_CUDA=1 makes "
           "this a failure")
GPU_REASON = backend.cuda_unavailable_reason()
GPU = not GPU_REASON
needs_gpu = pytest.mark.skipif(not GPU, reason=f"CUDA backend unusable here: {GPU_REASON}")
if GPU:
    from cbam_kernels import passes_cuda as cu

DEVICE = "cuda"
PASSES = ("pool_hw", "channel_pool", "apply_gates", "grad_spatial", "grad_channel", "grad_input")
SCHEMAS = {
    "pool_hw": "pool_hw(Tensor x, bool with_max) -> (Tensor, Tensor, Tensor)",
    "channel_pool": "channel_pool(Tensor x, Tensor? ca, bool max_first) -> (Tensor, Tensor)",
    "apply_gates": "apply_gates(Tensor x, Tensor? ca, Tensor? sa, Tensor? residual=None) "
                   "-> Tensor",
    "grad_spatial": "grad_spatial(Tensor gy, Tensor x, Tensor? ca) -> Tensor",
    "grad_channel": "grad_channel(Tensor gy, Tensor x, Tensor? sa, Tensor? gp, Tensor? cstar, "
                    "bool max_first) -> Tensor",
    "grad_input": "grad_input(Tensor gy, Tensor x, Tensor? ca, Tensor? sa, Tensor? gp, "
                  "Tensor? cstar, bool max_first, Tensor? ga, Tensor? gm, Tensor? pstar) "
                  "-> Tensor",
    "has_kernel_image": "has_kernel_image(int device) -> bool",
}


# ------------------------------------------------------------------ extension, no GPU needed


@needs_ext
def test_extension_imports():
    assert not BUILD_ERROR, f"CBAM_KERNELS_BUILD_CUDA=1 but cbam_kernels._C: {BUILD_ERROR}"


@needs_ext
def test_every_op_has_its_schema():
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("cbam_kernels_cuda::")}
    assert registered == set(SCHEMAS)
    for name, schema in SCHEMAS.items():
        op = getattr(torch.ops.cbam_kernels_cuda, name).default
        assert str(op._schema) == f"cbam_kernels_cuda::{schema}"


@needs_ext
@pytest.mark.parametrize("name", PASSES)
def test_passes_are_cuda_kernels(name):
    qualified = f"cbam_kernels_cuda::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU")


@needs_ext
def test_cpu_tensors_are_refused():
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.cbam_kernels_cuda.pool_hw(torch.randn(1, 2, 3, 3), True)


@needs_ext
def test_passes_cuda_has_the_spec_signatures():
    from cbam_kernels import passes_cuda
    for name in PASSES:
        assert inspect.signature(getattr(passes_cuda, name)) == \
            inspect.signature(getattr(ref, name)), name


# ------------------------------------------------------------------------ backend selection


def test_available_backends_reports_reasons():
    report = backend.available_backends()
    assert set(report) == {"cuda", "triton", "torch"}
    assert report["torch"] == "available"
    if BUILD_ERROR:
        assert "not built" in report["cuda"]
    elif not torch.cuda.is_available():
        assert report["cuda"] == "no CUDA device"
    assert report["cuda"] == (GPU_REASON or "available")


def test_cuda_backend_without_extension(monkeypatch):
    monkeypatch.setattr(backend, "_extension_error", lambda: "No module named 'cbam_kernels._C'")
    assert "cbam_kernels._C is not built" in backend.available_backends()["cuda"]
    with pytest.raises(RuntimeError, match="CBAM_KERNELS_BACKEND=cuda, but the cuda backend is "
                                           "unavailable: the extension cbam_kernels._C is not"):
        backend._choose("cuda", torch.device("cuda", 0), torch.float16)


def test_package_works_without_extension():
    code = ("import sys; sys.modules['cbam_kernels._C'] = None\n"
            "import torch, cbam_kernels\n"
            "from cbam_kernels.backend import available_backends, describe_backends\n"
            "assert 'not built' in available_backends()['cuda'], available_backends()\n"
            "x = torch.randn(2, 8, 5, 5, requires_grad=True)\n"
            "cbam_kernels.CBAM(8, reduction=2)(x).sum().backward()\n"
            "assert x.grad is not None\n"
            "print(describe_backends())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "cpu float32: torch" in out.stdout


@pytest.mark.parametrize("value", ["cdua", "gpu", "Triton2"])
def test_bad_backend_name_is_an_error(monkeypatch, value):
    monkeypatch.setenv(backend.ENV_VAR, value)
    with pytest.raises(ValueError, match="CBAM_KERNELS_BACKEND=.* is not one of auto, cuda, "
                                         "triton, torch"):
        backend.backend_for(torch.randn(1, 2, 3, 3))
    with pytest.raises(ValueError):
        backend.describe_backends()


@pytest.mark.parametrize("name", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forced_kernel_backend_needs_a_cuda_tensor(monkeypatch, name, dtype):
    monkeypatch.setenv(backend.ENV_VAR, f" {name.upper()} ")
    with pytest.raises(RuntimeError, match=f"{name} kernels need a CUDA tensor .* got a cpu"):
        backend.passes_for(torch.randn(1, 2, 3, 3, dtype=dtype))


def test_cuda_backend_without_gpu_is_an_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setattr(backend, "_extension_error", lambda: "")
    with pytest.raises(RuntimeError, match="cuda backend is unavailable: no CUDA device"):
        backend._choose("cuda", torch.device("cuda", 0), torch.float32)


@pytest.mark.parametrize("requested", ["auto", "torch"])
def test_cpu_and_float64_take_torch(monkeypatch, requested):
    monkeypatch.setenv(backend.ENV_VAR, requested)
    for dtype in backend.KERNEL_DTYPES + (torch.float64,):
        assert backend.backend_for(torch.randn(1, 2, 3, 3, dtype=dtype)) == "torch"
    assert backend._choose(requested, torch.device("cuda", 0), torch.float64)[0] == "torch"


def test_auto_takes_the_first_available_of_the_table(monkeypatch):
    """auto follows AUTO_ORDER (fastest measured first), skipping unavailable backends."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    state = {"cuda": "", "triton": ""}
    monkeypatch.setattr(backend, "cuda_unavailable_reason", lambda device=None: state["cuda"])
    monkeypatch.setattr(backend, "triton_unavailable_reason", lambda: state["triton"])
    gpu = torch.device("cuda", 0)
    assert backend._choose("auto", gpu, torch.float16)[0] == backend.AUTO_ORDER[(9, 0)][0]
    monkeypatch.setitem(backend.AUTO_ORDER, (9, 0), ("cuda", "triton"))
    assert backend._choose("auto", gpu, torch.bfloat16)[0] == "cuda"
    state["cuda"] = "no kernel"
    name, why = backend._choose("auto", gpu, torch.float32)
    assert name == "triton" and "cuda unavailable: no kernel" in why
    state["triton"] = "no triton"
    assert backend._choose("auto", gpu, torch.float32)[0] == "torch"


def test_auto_table_names_known_backends():
    for row in backend.AUTO_ORDER.values():
        assert set(row) == {"cuda", "triton"}


def test_describe_backends(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    text = backend.describe_backends()
    assert "CBAM_KERNELS_BACKEND=auto" in text
    for name in ("cuda", "triton", "torch"):
        assert f"  {name} " in text
    assert "cpu float16: torch (the kernels take CUDA tensors" in text
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    assert "cpu float32: error: CBAM_KERNELS_BACKEND=cuda, but the cuda kernels need a CUDA" \
        in backend.describe_backends()


# ----------------------------------------------------------------------- passes on a GPU

SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 17, 3, 3), (3, 20, 1, 1), (2, 33, 9, 11),
          (2, 12, 16, 16), (2, 8, 64, 64), (2, 512, 4, 4), (1, 4096, 2, 2)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # ~1 ulp
LAYOUT_PAIRS = [("nchw", "nchw"), ("cl", "cl"), ("nchw", "cl"), ("cl", "nchw")]
# Optional inputs of the backward passes per gate (cstar comes with gp, pstar with gm).
GATES = {
    "se": ("ca", "ga"),
    "channel": ("ca", "ga", "gm"),
    "channel_max_only": ("ca", "gm"),
    "spatial": ("sa", "gp"),
    "cbam": ("ca", "sa", "gp", "ga", "gm"),
}


@pytest.fixture(autouse=True)
def _poison():
    """Fill the caching allocator's free blocks with NaN, so that an output element a kernel
    does not write shows up."""
    if GPU:
        poison = [torch.full((1 << 24,), float("nan"), device=DEVICE)]  # large-block pool
        poison += [torch.full((1 << 17,), float("nan"), device=DEVICE) for _ in range(16)]
        poison.clear()


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "cl" else t.contiguous()


def _x(shape, dtype, layout="nchw", seed=0):
    g = torch.Generator().manual_seed(seed)
    return _layout(torch.randn(shape, generator=g).to(dtype).to(DEVICE), layout)


def _small(shape, names, seed=1):
    """The small inputs named in ``names`` (others None); cstar/pstar come with gp/gm."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    make = {
        "ca": lambda: torch.rand(n, c, generator=g),
        "sa": lambda: torch.rand(n, h, w, generator=g),
        "gp": lambda: torch.randn(n, 2, h, w, generator=g),
        "cstar": lambda: torch.randint(0, max(c, 1), (n, h, w), generator=g, dtype=torch.int32),
        "ga": lambda: torch.randn(n, c, generator=g),
        "gm": lambda: torch.randn(n, c, generator=g),
        "pstar": lambda: torch.randint(0, max(h * w, 1), (n, c), generator=g, dtype=torch.int32),
    }
    partner = {"gp": "cstar", "gm": "pstar"}
    wanted = set(names) | {partner[k] for k in names if k in partner}
    return {k: make[k]().to(DEVICE) if k in wanted else None for k in make}


def _check_small(out, expected):
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _check_full(out, expected, x):
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(out, expected, rtol=RTOL[x.dtype], atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pool_hw(shape, dtype, layout):
    x = _x(shape, dtype, layout)
    avg, mx, arg = cu.pool_hw(x, True)
    ravg, rmx, rarg = ref.pool_hw(x, True)
    _check_small(avg, ravg)
    _check_small(mx, rmx)
    assert torch.equal(arg, rarg)
    avg, mx, arg = cu.pool_hw(x, False)
    _check_small(avg, ravg)
    assert mx.shape == (0,) and mx.dtype == torch.float32
    assert arg.shape == (0,) and arg.dtype == torch.int32


@needs_gpu
@pytest.mark.parametrize("with_ca", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_pool(shape, dtype, layout, with_ca):
    x = _x(shape, dtype, layout)
    ca = _small(shape, ["ca"] if with_ca else [])["ca"]
    for max_first in (True, False):
        p, cstar = cu.channel_pool(x, ca, max_first)
        rp, rcstar = ref.channel_pool(x, ca, max_first)
        _check_small(p, rp)
        assert torch.equal(cstar, rcstar)


@needs_gpu
@pytest.mark.parametrize("gates", [(), ("ca",), ("sa",), ("ca", "sa")])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_apply_gates(shape, dtype, layout, gates):
    x = _x(shape, dtype, layout)
    s = _small(shape, gates)
    _check_full(cu.apply_gates(x, s["ca"], s["sa"]), ref.apply_gates(x, s["ca"], s["sa"]), x)


@needs_gpu
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_apply_gates_residual_epilogue(shape, dtype, layouts):
    """relu(x * ca * sa + residual), the residual in x's layout or the other one; NaN kept."""
    x = _x(shape, dtype, layouts[0])
    residual = _x(shape, dtype, layouts[1], seed=2)
    residual[0, 0, 0, 0] = float("nan")
    s = _small(shape, ("ca", "sa"))
    out = cu.apply_gates(x, s["ca"], s["sa"], residual)
    expected = ref.apply_gates(x, s["ca"], s["sa"], residual)
    assert out.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(out, expected, rtol=RTOL[dtype], atol=1e-5, equal_nan=True)
    assert out.isnan().sum() == 1 and (out >= 0).sum() == out.numel() - 1


@needs_gpu
@pytest.mark.parametrize("with_ca", [False, True])
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_spatial(shape, dtype, layouts, with_ca):
    x, gy = _x(shape, dtype, layouts[0]), _x(shape, dtype, layouts[1], seed=2)
    ca = _small(shape, ["ca"] if with_ca else [])["ca"]
    _check_small(cu.grad_spatial(gy, x, ca), ref.grad_spatial(gy, x, ca))


@needs_gpu
@pytest.mark.parametrize("terms", [(), ("sa",), ("gp",), ("sa", "gp")])
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_channel(shape, dtype, layouts, terms):
    x, gy = _x(shape, dtype, layouts[0]), _x(shape, dtype, layouts[1], seed=2)
    s = _small(shape, terms)
    for max_first in (True, False):
        args = (gy, x, s["sa"], s["gp"], s["cstar"], max_first)
        _check_small(cu.grad_channel(*args), ref.grad_channel(*args))


@needs_gpu
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
        _check_full(cu.grad_input(*args), ref.grad_input(*args), x)


def _odd_layout(name, shape, seed=0):
    """A float32 tensor of ``shape`` in the layout ``name`` (neither NCHW nor channels_last)."""
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


@needs_gpu
@pytest.mark.parametrize("name", ["sliced", "sliced_odd_w", "h_is_1", "w_is_1",
                                  "permuted_dense", "expanded"])
def test_odd_layouts(name):
    shape = {"h_is_1": (2, 6, 1, 5), "w_is_1": (2, 6, 3, 1)}.get(name, (2, 6, 3, 5))
    x = _odd_layout(name, shape)
    gy = _odd_layout("sliced" if name == "permuted_dense" else "permuted_dense", shape, seed=1)
    s = _small(shape, GATES["cbam"])
    for out, expected in zip(cu.pool_hw(x, True), ref.pool_hw(x, True)):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for out, expected in zip(cu.channel_pool(x, s["ca"], False),
                             ref.channel_pool(x, s["ca"], False)):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    _check_full(cu.apply_gates(x, s["ca"], s["sa"]), ref.apply_gates(x, s["ca"], s["sa"]), x)
    _check_full(cu.apply_gates(x, s["ca"], s["sa"], gy), ref.apply_gates(x, s["ca"], s["sa"], gy),
                x)
    _check_small(cu.grad_spatial(gy, x, s["ca"]), ref.grad_spatial(gy, x, s["ca"]))
    args = (gy, x, s["sa"], s["gp"], s["cstar"], True)
    _check_small(cu.grad_channel(*args), ref.grad_channel(*args))
    args = (gy, x, s["ca"], s["sa"], s["gp"], s["cstar"], True, s["ga"], s["gm"], s["pstar"])
    _check_full(cu.grad_input(*args), ref.grad_input(*args), x)


@needs_gpu
@pytest.mark.parametrize("shape", [(2, 33, 9, 11), (1, 4096, 2, 2), (2, 8, 64, 64)])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_pick_first_index(dtype, layout, shape):
    n, c, h, w = shape
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 2, shape, generator=g).float()
    x[0, c // 2] = float("-inf")                  # a channel that is -inf everywhere
    x[-1, :, h // 2, w // 2] = float("-inf")      # a position that is -inf in every channel
    x = _layout(x.to(dtype).to(DEVICE), layout)
    ca = torch.randint(1, 3, (n, c), generator=g).float().to(DEVICE)
    _, mx, arg = cu.pool_hw(x, True)
    _, rmx, rarg = ref.pool_hw(x, True)
    assert torch.equal(mx, rmx) and torch.equal(arg, rarg)
    for ca_ in (None, ca):
        p, cstar = cu.channel_pool(x, ca_, True)
        rp, rcstar = ref.channel_pool(x, ca_, True)
        assert torch.equal(p[:, 0], rp[:, 0]) and torch.equal(cstar, rcstar)


@needs_gpu
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_nan_propagates_to_max(layout):
    n, c, h, w = shape = (2, 33, 9, 11)
    x = torch.randn(shape)
    x[0, 3, 4, 5] = x[0, 3, 8, 10] = float("nan")  # two NaNs in one (n, c) row / one position
    x[0, 20, 8, 10] = float("nan")
    x[1, :, 0, 0] = float("nan")                   # a whole position, so every channel row
    x = _layout(x.to(DEVICE), layout)
    _, mx, arg = cu.pool_hw(x, True)
    _, rmx, rarg = ref.pool_hw(x, True)
    torch.testing.assert_close(mx, rmx, equal_nan=True)
    assert torch.equal(arg, rarg)
    p, cstar = cu.channel_pool(x, None, False)
    rp, rcstar = ref.channel_pool(x, None, False)
    torch.testing.assert_close(p, rp, equal_nan=True)
    assert torch.equal(cstar, rcstar)


@needs_gpu
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5)])
def test_zero_size(shape):
    """Correctly shaped results; an empty sum is zero; max over an empty axis is an error."""
    n, c, h, w = shape
    x = gy = torch.randn(shape, device=DEVICE)
    s = _small(shape, GATES["cbam"])
    cbam_args = [s[k] for k in ("ca", "sa", "gp", "cstar")] + [True] + \
        [s[k] for k in ("ga", "gm", "pstar")]
    assert cu.apply_gates(x, s["ca"], s["sa"]).shape == shape
    assert cu.grad_input(gy, x, *cbam_args).shape == shape
    torch.testing.assert_close(cu.grad_spatial(gy, x, s["ca"]), torch.zeros(n, h, w, device=DEVICE))
    torch.testing.assert_close(cu.grad_channel(gy, x, s["sa"], s["gp"], s["cstar"], True),
                               torch.zeros(n, c, device=DEVICE))
    if h * w > 0 or n * c == 0:
        assert [t.shape for t in cu.pool_hw(x, True)] == [(n, c)] * 3
    else:
        with pytest.raises(RuntimeError, match="H\\*W"):
            cu.pool_hw(x, True)
    if c > 0 or n * h * w == 0:
        p, cstar = cu.channel_pool(x, s["ca"], True)
        assert p.shape == (n, 2, h, w) and cstar.shape == (n, h, w)
    else:
        with pytest.raises(RuntimeError, match="C"):
            cu.channel_pool(x, s["ca"], True)


@needs_gpu
def test_bad_arguments_are_named():
    x = _x((2, 4, 3, 3), torch.float16)
    with pytest.raises(RuntimeError, match="ca must have shape"):
        cu.apply_gates(x, torch.rand(2, 5, device=DEVICE), None)
    with pytest.raises(RuntimeError, match="sa must be Float"):
        cu.apply_gates(x, None, torch.rand(2, 3, 3, device=DEVICE, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="gy is Float, x is Half"):
        cu.grad_spatial(x.float(), x, None)
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16 or float32"):
        cu.pool_hw(x.double(), True)
    with pytest.raises(RuntimeError, match="residual has shape"):
        cu.apply_gates(x, None, None, x[:, :3])
    with pytest.raises(RuntimeError, match="gp needs cstar"):
        cu.grad_channel(x, x, None, torch.rand(2, 2, 3, 3, device=DEVICE), None, True)


# -------------------------------------------------------------- whole ops on the CUDA backend


def _cbam(channels, dtype):
    torch.manual_seed(0)
    return cbam_kernels.CBAM(channels, reduction=4).to(DEVICE, dtype).train()


def _grads(module, x, gy):
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(gy)
    return [y, x.grad] + [p.grad for p in module.parameters()]


@needs_gpu
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_passes_are_deterministic(layout):
    """Split reductions give bitwise-equal results run after run."""
    shape = (4, 256, 28, 28)
    x, gy = _x(shape, torch.float16, layout), _x(shape, torch.float16, layout, seed=2)
    s = _small(shape, GATES["cbam"])
    runs = [[*cu.pool_hw(x, True), *cu.channel_pool(x, s["ca"], True),
             cu.grad_spatial(gy, x, s["ca"]),
             cu.grad_channel(gy, x, s["sa"], s["gp"], s["cstar"], True)] for _ in range(3)]
    for again in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], again))


@needs_gpu
def test_cbam_backward_is_deterministic(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    module = _cbam(64, torch.float16).to(memory_format=torch.channels_last)
    x = _x((8, 64, 28, 28), torch.float16, "cl")
    gy = _x((8, 64, 28, 28), torch.float16, "cl", seed=2)
    first = _grads(module, x, gy)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_grads(module, x, gy) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for run in runs:
        assert all(torch.equal(a, b) for a, b in zip(first, run))


@needs_gpu
def test_cuda_graph_capture_and_replay(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    shape = (4, 32, 14, 14)
    module = _cbam(32, torch.float32)
    eager = _cbam(32, torch.float32)
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    gy = torch.randn(shape, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up off the capture stream, as torch.cuda.graph asks
            module.zero_grad(set_to_none=True)
            module(x).backward(gy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    module.zero_grad(set_to_none=True)
    x.grad = None
    with torch.cuda.graph(graph):
        y = module(x)
        y.backward(gy)
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            x.copy_(torch.randn(shape, device=DEVICE))
            gy.copy_(torch.randn(shape, device=DEVICE))
        eager.load_state_dict(module.state_dict())
        graph.replay()
        expected = _grads(eager, x, gy)
        got = [y, x.grad] + [p.grad for p in module.parameters()]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_gpu
def test_non_default_stream():
    """Work goes to the current stream: a pass queued behind a slow kernel on a side stream
    must see that stream's writes."""
    shape = (8, 64, 56, 56)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = _x(shape, torch.float16, "cl")
        gy = _x(shape, torch.float16, "nchw", seed=2)
        s = _small(shape, GATES["cbam"])
        torch.cuda._sleep(100_000_000)
        x.mul_(2)
        got = [*cu.pool_hw(x, True), *cu.channel_pool(x, s["ca"], True),
               cu.apply_gates(x, s["ca"], s["sa"]), cu.grad_spatial(gy, x, s["ca"]),
               cu.grad_channel(gy, x, s["sa"], s["gp"], s["cstar"], True),
               cu.grad_input(gy, x, s["ca"], s["sa"], s["gp"], s["cstar"], True, s["ga"],
                             s["gm"], s["pstar"])]
        expected = [*ref.pool_hw(x, True), *ref.channel_pool(x, s["ca"], True),
                    ref.apply_gates(x, s["ca"], s["sa"]), ref.grad_spatial(gy, x, s["ca"]),
                    ref.grad_channel(gy, x, s["sa"], s["gp"], s["cstar"], True),
                    ref.grad_input(gy, x, s["ca"], s["sa"], s["gp"], s["cstar"], True, s["ga"],
                                   s["gm"], s["pstar"])]
    side.synchronize()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=2.0**-10, atol=1e-4)


BIG = (1, 46400, 216, 216)  # 2.17e9 elements: offsets of the last channel/pixel pass 2**31


@needs_gpu
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_more_than_2_pow_31_elements(layout):
    n, c, h, w = BIG
    need = 3 * n * c * h * w * 2 + (1 << 30)
    free = torch.cuda.mem_get_info()[0]
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} free")
    hw = h * w
    x = _layout(torch.zeros(BIG, dtype=torch.float16, device=DEVICE), layout)
    x[0, c - 1, h - 1, w - 1] = 2    # the last element in both layouts
    x[0, c - 1, 0, 0] = -1
    x[0, 0, h - 1, w - 1] = -1
    avg, mx, arg = cu.pool_hw(x, True)
    assert avg[0, c - 1].item() == pytest.approx(1 / hw)
    assert avg[0, 0].item() == pytest.approx(-1 / hw)
    assert avg[0, 1:-1].abs().max().item() == 0
    assert mx[0, c - 1].item() == 2 and arg[0, c - 1].item() == hw - 1
    assert mx[0, 0].item() == 0 and arg[0, 0].item() == 0
    p, cstar = cu.channel_pool(x, None, True)
    assert p[0, 0, h - 1, w - 1].item() == 2 and cstar[0, h - 1, w - 1].item() == c - 1
    assert p[0, 1, h - 1, w - 1].item() == pytest.approx(1 / c)
    assert p[0, 1, 0, 0].item() == pytest.approx(-1 / c) and cstar[0, 0, 0].item() == 0
    gy = torch.ones_like(x)
    gsa = cu.grad_spatial(gy, x, None)
    assert gsa[0, h - 1, w - 1].item() == 1 and gsa[0, 0, 0].item() == -1
    assert gsa.abs().sum().item() == 2
    gca = cu.grad_channel(gy, x, None, None, None, True)
    assert gca[0, c - 1].item() == 1 and gca[0, 0].item() == -1 and gca.abs().sum().item() == 2
    del gy
    ca = torch.full((n, c), 0.5, device=DEVICE)
    for y in (cu.apply_gates(x, ca, None),
              cu.grad_input(x, x, ca, None, None, None, True, None, None, None)):
        assert y.stride() == x.stride()
        assert y[0, c - 1, h - 1, w - 1].item() == 1 and y[0, c - 1, 0, 0].item() == -0.5
        assert y.sum(dtype=torch.float32).item() == 0
        del y
