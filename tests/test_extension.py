"""The CUDA C++ backend: the extension ``cbam_kernels._C`` and its ops (the choice of backend is
``test_backend_choice.py``'s).

Without a GPU: the built extension imports, every op is registered for CUDA with its intended
schema, and the package works without the extension. The extension is optional, so its tests skip when it
was not built, unless ``CBAM_KERNELS_BUILD_CUDA=1`` says that it must have been (then they fail).

With a GPU (skipped otherwise): the ops name bad arguments; bitwise determinism; CUDA graph
capture and replay of a CBAM forward+backward and torch.compile(mode="reduce-overhead"), on both
kernel backends; a non-default stream; a tensor of more than 2**31 elements. The results of every pass against its specification ``ops.torch.passes`` are tested in
``test_passes.py``, for this backend and the Triton one.
"""

import inspect
import os
import subprocess
import sys

import pytest
import torch

import cbam_kernels
from cbam_kernels.ops import backend
from cbam_kernels.ops.torch import passes as ref
from pass_testing import (DEVICE, GATES, grad_channel_args, grad_input_args, poison_free_memory,
                          rand_full, rand_small, to_layout)

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
    from cbam_kernels.ops.cuda import passes as cu

PASSES = ("pool_hw", "channel_pool", "apply_gates", "grad_spatial", "grad_channel", "grad_input")
SCHEMAS = {
    "pool_hw": "pool_hw(Tensor x, bool with_max) -> (Tensor, Tensor?, Tensor?)",
    "channel_pool": "channel_pool(Tensor x, Tensor? ca) -> (Tensor, Tensor?, Tensor?)",
    "apply_gates": "apply_gates(Tensor x, Tensor? ca, Tensor? sa, Tensor? residual=None) "
                   "-> Tensor",
    "grad_spatial": "grad_spatial(Tensor gy, Tensor x, Tensor? ca, Tensor? out=None) "
                    "-> (Tensor, Tensor?)",
    "grad_channel": "grad_channel(Tensor gy, Tensor x, Tensor? sa, Tensor? gp, Tensor? cstar, "
                    "bool max_first, Tensor? out=None) -> (Tensor, Tensor?)",
    "grad_input": "grad_input(Tensor gy, Tensor x, Tensor? ca, Tensor? sa, Tensor? gp, "
                  "Tensor? cstar, bool max_first, Tensor? ga, Tensor? gm, Tensor? pstar, "
                  "Tensor?[] tail, Tensor?(a!)[] grads, bool silu) -> Tensor",
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


def test_passes_cuda_has_the_spec_parameters():
    """The parameters of the specification's passes, but for pool_hw's keepdim (a shape the
    specification's own pipeline wants), channel_pool's max_first (the consumer of its
    partials orders the map), the epilogue's out of grad_spatial and grad_channel and
    grad_input's tail (the parameter gradients its launch computes too). Importing
    ops.cuda.passes does not need the extension."""
    from cbam_kernels.ops.cuda import passes as passes_cuda
    changed = {"pool_hw": ["x", "with_max"], "channel_pool": ["x", "ca"],
               "grad_spatial": ["gy", "x", "ca", "out"],
               "grad_channel": ["gy", "x", "sa", "gp", "cstar", "max_first", "out"],
               "grad_input": [*inspect.signature(ref.grad_input).parameters, "tail"]}
    for name in PASSES:
        parameters = list(inspect.signature(getattr(passes_cuda, name)).parameters)
        assert parameters == changed.get(name, list(inspect.signature(getattr(ref, name))
                                                    .parameters)), name


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
            "from cbam_kernels.ops.backend import available_backends, describe_backends\n"
            "assert 'not built' in available_backends()['cuda'], available_backends()\n"
            "x = torch.randn(2, 8, 5, 5, requires_grad=True)\n"
            "cbam_kernels.CBAM(8, reduction=2)(x).sum().backward()\n"
            "assert x.grad is not None\n"
            "print(describe_backends())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "cpu float32: torch" in out.stdout


# ------------------------------------------------------------------------- passes on a GPU
# The passes' results against ops.torch.passes are in test_passes.py, for both kernel backends.


@pytest.fixture(autouse=True)
def _poison():
    """NaN in the free GPU memory before each test (see ``poison_free_memory``)."""
    poison_free_memory()


@needs_gpu
def test_bad_arguments_are_named():
    """The ops check their arguments and name the one that is wrong."""
    x = rand_full((2, 4, 3, 3), torch.float16)
    with pytest.raises(RuntimeError, match="ca must have shape"):
        cu.apply_gates(x, torch.rand(2, 5, device=DEVICE), None)
    with pytest.raises(RuntimeError, match="sa must be Float"):
        cu.apply_gates(x, None, torch.rand(2, 3, 3, device=DEVICE, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="gy is Float, x is Half"):
        cu.grad_spatial(x.float(), x, None)
    with pytest.raises(RuntimeError, match="residual has shape"):
        cu.apply_gates(x, None, None, x[:, :3])
    with pytest.raises(RuntimeError, match="gp needs cstar"):
        cu.grad_channel(x, x, None, torch.rand(2, 2, 3, 3, device=DEVICE), None, True)
    with pytest.raises(RuntimeError, match="out is on cpu"):
        cu.grad_spatial(x, x, None, x.cpu())


# -------------------------------------------------------------- whole ops on the CUDA backend


def _cbam(channels, dtype):
    torch.manual_seed(0)
    return cbam_kernels.CBAM(channels, reduction=4).to(DEVICE, dtype).train()


def _every_pass(x, gy, s):
    """Every tensor that the six CUDA passes return for x and gy (the epilogue's out: relu(gy)),
    with the CBAM small inputs ``s``; the reductions' partials as they come."""
    out = torch.relu(gy)
    results = [*cu.pool_hw(x, True), *cu.channel_pool(x, s["ca"]),
               cu.apply_gates(x, s["ca"], s["sa"]), *cu.grad_spatial(gy, x, s["ca"], out)[0],
               *cu.grad_channel(*grad_channel_args(gy, x, s, True), out)[0],
               cu.grad_input(*grad_input_args(gy, x, s, True))]
    return [t for t in results if t is not None]


def _finished_passes(x, gy, s):
    """The six CUDA passes on x and gy (CBAM's small inputs ``s``), reductions combined, and the
    same results from the specification: two lists of tensors."""
    total = ref.combine_partials
    p, cstar = ref.channel_pool(x, s["ca"], True)
    got = [*total(cu.pool_hw(x, True)), *total(cu.channel_pool(x, s["ca"])),
           cu.apply_gates(x, s["ca"], s["sa"]), total(cu.grad_spatial(gy, x, s["ca"])[0])[0],
           total(cu.grad_channel(*grad_channel_args(gy, x, s, True))[0])[0],
           cu.grad_input(*grad_input_args(gy, x, s, True))]
    expected = [*ref.pool_hw(x, True), p[:, 1].flatten(1), p[:, 0].flatten(1), cstar.flatten(1),
                ref.apply_gates(x, s["ca"], s["sa"]), ref.grad_spatial(gy, x, s["ca"]).flatten(1),
                ref.grad_channel(*grad_channel_args(gy, x, s, True)),
                ref.grad_input(*grad_input_args(gy, x, s, True))]
    return got, expected


def _grads(module, x, gy):
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(gy)
    return [y, x.grad] + [p.grad for p in module.parameters()]


@needs_gpu
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_passes_are_deterministic(layout):
    """Split reductions (and the other passes) give bitwise-equal results run after run."""
    shape = (4, 256, 28, 28)
    x = rand_full(shape, torch.float16, layout)
    gy = rand_full(shape, torch.float16, layout, seed=2)
    s = rand_small(shape, GATES["cbam"])
    runs = [_every_pass(x, gy, s) for _ in range(3)]
    for again in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], again))


def kernel_backends_on_gpu():
    """Both kernel backends as parameters, each skipped unless it runs on this machine's GPU."""
    reasons = {"cuda": GPU_REASON,
               "triton": "" if torch.cuda.is_available() and
               not backend.triton_unavailable_reason() else "no GPU for the Triton kernels"}
    return [pytest.param(name, marks=pytest.mark.skipif(bool(reason), reason=reason or ""))
            for name, reason in reasons.items()]


@pytest.mark.parametrize("name", kernel_backends_on_gpu())
def test_cbam_backward_is_deterministic(monkeypatch, name):
    monkeypatch.setenv(backend.ENV_VAR, name)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    module = _cbam(64, torch.float16).to(memory_format=torch.channels_last)
    x = rand_full((8, 64, 28, 28), torch.float16, "cl")
    gy = rand_full((8, 64, 28, 28), torch.float16, "cl", seed=2)
    first = _grads(module, x, gy)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_grads(module, x, gy) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for run in runs:
        assert all(torch.equal(a, b) for a, b in zip(first, run))


@pytest.mark.parametrize("name", kernel_backends_on_gpu())
def test_cuda_graph_capture_and_replay(monkeypatch, name):
    """A training step of CBAM (BatchNorm statistics updated in-kernel) captured in a CUDA graph
    and replayed on new inputs: nothing in the op path reads a value back to the host."""
    monkeypatch.setenv(backend.ENV_VAR, name)
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


@pytest.mark.parametrize("name", kernel_backends_on_gpu())
def test_compile_reduce_overhead(monkeypatch, name):
    """torch.compile(mode="reduce-overhead") (CUDA graphs) of a CBAM training step and of its
    inference matches eager, BatchNorm running statistics included."""
    monkeypatch.setenv(backend.ENV_VAR, name)
    torch._dynamo.reset()
    eager, compiled_module = _cbam(32, torch.float32), _cbam(32, torch.float32)
    compiled = torch.compile(compiled_module, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        x = torch.randn(4, 32, 14, 14, device=DEVICE)
        gy = torch.randn_like(x)
        got = _grads_of(compiled, compiled_module, x, gy)
        for a, b in zip(got, _grads(eager, x, gy)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled_module.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b)
    for module in (eager, compiled_module):
        module.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


def _grads_of(fn, module, x, gy):
    """y and the gradients of x and of ``module``'s parameters, y = fn(x) (clones: a CUDA
    graph's outputs are overwritten by its next replay)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = fn(x)
    y.backward(gy)
    return [t.clone() for t in [y, x.grad] + [p.grad for p in module.parameters()]]


@needs_gpu
def test_non_default_stream():
    """Work goes to the current stream: a pass queued behind a slow kernel on a side stream
    must see that stream's writes."""
    shape = (8, 64, 56, 56)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = rand_full(shape, torch.float16, "cl")
        gy = rand_full(shape, torch.float16, "nchw", seed=2)
        s = rand_small(shape, GATES["cbam"])
        torch.cuda._sleep(100_000_000)
        x.mul_(2)
        got, expected = _finished_passes(x, gy, s)
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
    x = to_layout(torch.zeros(BIG, dtype=torch.float16, device=DEVICE), layout)
    x[0, c - 1, h - 1, w - 1] = 2    # the last element in both layouts
    x[0, c - 1, 0, 0] = -1
    x[0, 0, h - 1, w - 1] = -1
    avg, mx, arg = ref.combine_partials(cu.pool_hw(x, True))
    assert avg[0, c - 1].item() == pytest.approx(1 / hw)
    assert avg[0, 0].item() == pytest.approx(-1 / hw)
    assert avg[0, 1:-1].abs().max().item() == 0
    assert mx[0, c - 1].item() == 2 and arg[0, c - 1].item() == hw - 1
    assert mx[0, 0].item() == 0 and arg[0, 0].item() == 0
    mean, cmax, cstar = ref.combine_partials(cu.channel_pool(x, None))
    assert cmax[0, hw - 1].item() == 2 and cstar[0, hw - 1].item() == c - 1
    assert mean[0, hw - 1].item() == pytest.approx(1 / c)
    assert mean[0, 0].item() == pytest.approx(-1 / c) and cstar[0, 0].item() == 0
    gy = torch.ones_like(x)
    gsa = ref.combine_partials(cu.grad_spatial(gy, x, None)[0])[0]
    assert gsa[0, hw - 1].item() == 1 and gsa[0, 0].item() == -1
    assert gsa.abs().sum().item() == 2
    gca = ref.combine_partials(cu.grad_channel(gy, x, None, None, None, True)[0])[0]
    assert gca[0, c - 1].item() == 1 and gca[0, 0].item() == -1 and gca.abs().sum().item() == 2
    del gy
    ca = torch.full((n, c), 0.5, device=DEVICE)
    for y in (cu.apply_gates(x, ca, None),
              cu.grad_input(x, x, ca, None, None, None, True, None, None, None)):
        assert y.stride() == x.stride()
        assert y[0, c - 1, h - 1, w - 1].item() == 1 and y[0, c - 1, 0, 0].item() == -0.5
        assert y.sum(dtype=torch.float32).item() == 0
        del y
