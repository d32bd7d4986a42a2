"""The choice of backend: ``CBAM_KERNELS_BACKEND`` and its validation, the automatic choice (on
each GPU architecture our users have, with the GPU mocked), what ``_C`` holds for each
architecture, and the report of all of it (``describe_backends``, ``python -m cbam_kernels``)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cbam_kernels
from cbam_kernels.ops import backend
from cbam_kernels.ops.torch import small_kernels as torch_small_kernels

# Turing (RTX 20xx, T4), A100, Ampere RTX / A-series, Ada (RTX 40xx, L4, L40), Hopper (H100,
# H200), B200, Blackwell RTX (RTX 50xx, RTX PRO) -> what auto takes with _C built and Triton
# installed: the measured order on sm_90, Triton first elsewhere, the CUDA backend (with the
# PyTorch small kernels) where Triton does not compile.
EXPECTED = {(7, 5): "cuda", (8, 0): "triton", (8, 6): "triton", (8, 9): "triton",
            (9, 0): "cuda", (10, 0): "triton", (12, 0): "triton"}
TRITON_ON_TURING = "does not compile for sm_75"


@pytest.fixture
def mocked_gpu(monkeypatch, request):
    """``mocked_gpu(capability, extension_error="")``: the device of a mocked GPU of that
    capability, with _C loading (or failing with ``extension_error``) and holding code for it,
    Triton installed and compiling (not interpreting)."""
    backend.forget_choices()
    request.addfinalizer(backend.forget_choices)

    def make(capability, extension_error=""):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a mocked GPU")
        monkeypatch.setattr(backend, "_extension_error", lambda: extension_error)
        monkeypatch.setattr(backend, "_has_kernel_image", lambda index: True)
        monkeypatch.setattr(backend, "_interpreted", lambda: False)
        return torch.device("cuda", 0)

    return make


def small_kernels_of(name, device):
    """'triton' or 'torch': the small kernels of the pipeline that runs backend ``name`` on
    ``device`` (not built: which pair :func:`backend.pipeline_named` asks for)."""
    if name == "torch":
        return None
    built = []
    original = backend._kernel_pipeline
    backend._kernel_pipeline = lambda name, small: built.append(small) or small
    try:
        backend.forget_choices()
        backend.pipeline_named(name, device)
    finally:
        backend._kernel_pipeline = original
        backend.forget_choices()
    return built[0]


@pytest.mark.parametrize("capability", list(EXPECTED), ids=lambda c: f"sm_{c[0]}{c[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_auto_choice_per_architecture(mocked_gpu, capability, dtype):
    """What auto takes, and the small kernels of the pipeline that runs it: Triton's wherever
    Triton compiles, PyTorch's for the CUDA backend on sm_75 (bfloat16 included: the C++
    kernels convert it in software there), saying why."""
    device = mocked_gpu(capability)
    name, why = backend._choose("auto", device, dtype)
    assert name == EXPECTED[capability], why
    turing = capability < backend.TRITON_MIN_CAPABILITY
    assert small_kernels_of(name, device) == ("torch" if turing else "triton" if name != "torch"
                                              else None)
    if turing:
        assert f"triton unavailable: Triton {importlib.metadata.version('triton')} " \
               f"{TRITON_ON_TURING}" in why
        assert "small kernels in PyTorch: Triton " in why and why.endswith("older)")
    else:
        assert "small kernels" not in why


def test_turing_without_a_kernel_image_takes_torch_and_says_why(mocked_gpu, monkeypatch):
    """sm_75 with a _C that holds no code for it: neither kernel backend runs, each reason is
    given."""
    device = mocked_gpu((7, 5))
    monkeypatch.setattr(backend, "_has_kernel_image", lambda index: False)
    name, why = backend._choose("auto", device, torch.float16)
    assert name == "torch"
    assert f"triton unavailable: Triton {importlib.metadata.version('triton')} " \
           f"{TRITON_ON_TURING}" in why
    assert "cuda unavailable: cbam_kernels._C has no code for a mocked GPU (sm_75); rebuild " \
           "with TORCH_CUDA_ARCH_LIST including 7.5" in why


def test_without_the_extension_hopper_takes_triton_and_says_why(mocked_gpu):
    name, why = backend._choose("auto", mocked_gpu((9, 0), "no module named _C"), torch.float16)
    assert name == "triton" and "cuda unavailable" in why and "no module named _C" in why


def test_without_the_extension_turing_takes_torch_and_says_why(mocked_gpu):
    name, why = backend._choose("auto", mocked_gpu((7, 5), "no module named _C"), torch.float16)
    assert name == "torch" and TRITON_ON_TURING in why and "no module named _C" in why


def test_forcing_a_kernel_backend_on_turing(mocked_gpu, monkeypatch):
    """Forcing Triton on sm_75 is a clear error; forcing the CUDA backend runs it, with the
    PyTorch small kernels, and says so."""
    device = mocked_gpu((7, 5))
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match=TRITON_ON_TURING):
        backend._choose("triton", device, torch.float16)
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    name, why = backend._choose("cuda", device, torch.bfloat16)
    assert name == "cuda" and why.startswith("CBAM_KERNELS_BACKEND=cuda; small kernels in "
                                             "PyTorch: Triton")
    assert TRITON_ON_TURING in why and small_kernels_of(name, device) == "torch"


def _without_triton(monkeypatch):
    """Triton not installed (as far as the backend choice can tell)."""
    find_spec = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else find_spec(name, *a))


@pytest.mark.parametrize("capability", [(7, 5), (8, 6), (9, 0)], ids=lambda c: f"sm_{c[0]}{c[1]}")
def test_cuda_backend_without_triton_runs_with_the_pytorch_small_kernels(
        mocked_gpu, monkeypatch, capability):
    """_C built, Triton not installed: auto takes the CUDA backend, with the PyTorch small
    kernels, and says why (before, it fell back to the torch backend)."""
    device = mocked_gpu(capability)
    _without_triton(monkeypatch)
    name, why = backend._choose("auto", device, torch.float16)
    assert name == "cuda", why
    assert ("triton unavailable: triton is not installed" in why) == (capability != (9, 0))
    assert why.endswith("; small kernels in PyTorch: triton is not installed")
    assert small_kernels_of(name, device) == "torch"
    assert backend.available_backends()["cuda"] == \
        "available (small kernels in PyTorch: triton is not installed)"


def test_the_cuda_pipeline_with_pytorch_small_kernels_is_built(mocked_gpu, monkeypatch):
    """On sm_75 the CUDA backend's pipeline is the C++ passes with ops.torch.small_kernels (built
    without importing Triton), one pipeline object per (backend, small kernels)."""
    device = mocked_gpu((7, 5))
    _without_triton(monkeypatch)
    monkeypatch.setitem(sys.modules, "triton", None)  # an import of Triton would fail
    pipeline = backend.pipeline_named("cuda", device)
    assert pipeline.small is torch_small_kernels
    assert pipeline.passes is importlib.import_module("cbam_kernels.ops.cuda.passes")
    assert backend.pipeline_named("cuda") is pipeline  # no device: the current GPU's
    # pipeline_for reads the device and dtype only
    fake = type("FakeCudaTensor", (), {"device": device, "dtype": torch.bfloat16})()
    assert backend.pipeline_for(fake) is pipeline


def test_pipelines_per_device_on_a_mixed_machine(mocked_gpu, monkeypatch):
    """A machine with an sm_75 and an sm_86 GPU, the CUDA backend forced: each device's
    pipeline has its own small kernels (PyTorch's on the sm_75, Triton's on the sm_86); the
    pipeline for no particular device is the current GPU's (the sm_75's)."""
    mocked_gpu((7, 5))
    capabilities = {0: (7, 5), 1: (8, 6)}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: capabilities[backend._gpu_index(
                            None if device is None else torch.device(device))])
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    built = []
    monkeypatch.setattr(backend, "_kernel_pipeline",
                        lambda name, small: built.append((name, small)) or (name, small))
    backend.forget_choices()
    gpus = [torch.device("cuda", i) for i in (0, 1)]
    fakes = [type("FakeCudaTensor", (), {"device": d, "dtype": torch.float16})() for d in gpus]
    assert [backend.pipeline_for(t) for t in fakes] == [("cuda", "torch"), ("cuda", "triton")]
    assert [backend.pipeline_for(t) for t in fakes] == [("cuda", "torch"), ("cuda", "triton")]
    assert len(built) == 2  # made once per (backend, device)
    assert backend.pipeline_named("cuda") == ("cuda", "torch")
    assert [backend._choose("cuda", d, torch.float16)[1] for d in gpus] == [
        f"CBAM_KERNELS_BACKEND=cuda; small kernels in PyTorch: Triton "
        f"{importlib.metadata.version('triton')} {TRITON_ON_TURING} (Triton 3.3 dropped sm_75 "
        f"and older)", "CBAM_KERNELS_BACKEND=cuda"]
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    backend.forget_choices()
    assert [backend.pipeline_for(t) for t in fakes] == [("cuda", "torch"), ("triton", "triton")]


def test_report_on_turing(mocked_gpu, monkeypatch, tmp_path):
    """describe_backends() on an sm_75 with _C built for it: the CUDA backend available with
    the PyTorch small kernels and why, and it runs every kernel dtype."""
    mocked_gpu((7, 5))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    info = tmp_path / "build_info.json"
    info.write_text('{"built": true, "why": "cbam_kernels._C built", "arch_list": "7.5;8.0"}')
    monkeypatch.setattr(backend, "BUILD_INFO", str(info))
    triton = f"Triton {importlib.metadata.version('triton')} {TRITON_ON_TURING}"
    assert backend.available_backends()["cuda"] == \
        f"available (small kernels in PyTorch: {triton} (Triton 3.3 dropped sm_75 and older))"
    text = backend.describe_backends()
    assert f"  cuda    available (small kernels in PyTorch: {triton}" in text
    assert f"  triton  {triton}" in text
    assert "  _C for cuda:0 (a mocked GPU, sm_75): kernel image (sm_75)" in text
    for dtype in ("float16", "bfloat16", "float32"):
        assert f"  cuda:0 (a mocked GPU, sm_75) {dtype}: cuda (fastest available of triton, " \
               f"cuda on sm_75; triton unavailable: {triton}" in text
    assert "  cuda:0 (a mocked GPU, sm_75) float64: torch" in text


# What the default build (no GPU visible: torch's own architectures, the newest with PTX) and
# a one-architecture build hold for each GPU.
DEFAULT_BUILD = "7.5;8.0;8.6;9.0;10.0;12.0+PTX"


@pytest.mark.parametrize("arch_list, capability, expected", [
    (DEFAULT_BUILD, (7, 5), "kernel image (sm_75)"),
    (DEFAULT_BUILD, (8, 9), "kernel image (sm_86)"),   # sm_86 machine code runs on sm_89
    (DEFAULT_BUILD, (10, 3), "kernel image (sm_100)"),
    (DEFAULT_BUILD, (12, 1), "kernel image (sm_120)"),
    (DEFAULT_BUILD, (13, 0), "PTX of compute_120"),    # a later GPU: the driver compiles it
    (DEFAULT_BUILD, (7, 0), "no code"),
    ("9.0", (10, 0), "no code"),                        # no PTX, another major version
    ("9.0a", (9, 0), "kernel image (sm_90)"),
    ("9.0a", (9, 1), "no code"),                        # 9.0a runs on sm_90 alone
    ("8.0 8.6+PTX", (8, 9), "kernel image (sm_86)"),
])
def test_extension_code_per_architecture(arch_list, capability, expected):
    assert backend.extension_code(capability, arch_list).startswith(expected)


def test_interpreter_chosen_too_late_is_reported_unavailable():
    """TRITON_INTERPRET=1 set after triton was imported does not interpret (Triton decides at
    its first import): the report says so, and forcing Triton is a clear error, not a failure
    inside the kernels."""
    if torch.cuda.is_available():
        pytest.skip("with a CUDA device the Triton backend runs without the interpreter")
    code = ("import os, torch, triton, cbam_kernels\n"
            "from cbam_kernels.ops.backend import available_backends\n"
            "os.environ.pop('TRITON_INTERPRET', None)\n"
            "assert 'TRITON_INTERPRET is not set' in available_backends()['triton']\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "os.environ['CBAM_KERNELS_BACKEND'] = 'triton'\n"
            "print(available_backends()['triton'])\n"
            "try:\n"
            "    cbam_kernels.CBAM(8, 2)(torch.randn(2, 8, 5, 5))\n"
            "except RuntimeError as err:\n"
            "    print('error:', err)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1 was set after triton was imported" in out.stdout
    assert "error: CBAM_KERNELS_BACKEND=triton, but the triton kernels need a CUDA tensor" \
        in out.stdout


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
        backend.pipeline_for(torch.randn(1, 2, 3, 3, dtype=dtype))


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


def test_auto_takes_the_first_available_of_the_table(monkeypatch, request):
    """auto follows AUTO_ORDER (fastest measured first), skipping unavailable backends. The
    choices are cached, so the cache is cleared before, at each change of availability and
    after."""
    backend.forget_choices()
    request.addfinalizer(backend.forget_choices)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    state = {"cuda": "", "triton": ""}
    monkeypatch.setattr(backend, "cuda_unavailable_reason", lambda device=None: state["cuda"])
    monkeypatch.setattr(backend, "triton_unavailable_reason",
                        lambda device=None: state["triton"])
    gpu = torch.device("cuda", 0)
    assert backend._choose("auto", gpu, torch.float16)[0] == backend.AUTO_ORDER[(9, 0)][0]
    monkeypatch.setitem(backend.AUTO_ORDER, (9, 0), ("cuda", "triton"))
    assert backend._choose("auto", gpu, torch.bfloat16)[0] == "cuda"
    state["cuda"] = "no kernel"
    backend.forget_choices()
    name, why = backend._choose("auto", gpu, torch.float32)
    assert name == "triton" and "cuda unavailable: no kernel" in why
    state["triton"] = "no triton"
    backend.forget_choices()
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


def test_report_says_what_the_install_built(monkeypatch, tmp_path):
    """describe_backends() (and ``python -m cbam_kernels``) says whether setup.py built _C, for
    which architectures, or why not."""
    info = tmp_path / "build_info.json"
    monkeypatch.setattr(backend, "BUILD_INFO", str(info))
    assert "no record of an install" in backend.describe_backends()
    info.write_text('{"built": false, "why": "installed without cbam_kernels._C: nvcc not '
                    'found (set CUDA_HOME)", "arch_list": null}')
    assert "Extension: installed without cbam_kernels._C: nvcc not found" \
        in backend.describe_backends()
    info.write_text('{"built": true, "why": "cbam_kernels._C built with torch 2.14.1", '
                    '"arch_list": "8.0;9.0"}')
    assert "for TORCH_CUDA_ARCH_LIST=8.0;9.0" in backend.extension_build()
    out = subprocess.run([sys.executable, "-m", "cbam_kernels"], capture_output=True, text=True)
    assert out.returncode == 0 and "Extension: " in out.stdout, out.stderr


def test_the_report_reads_the_record_where_setup_py_writes_it():
    """setup.py writes build_info.json into the package's top folder (package data); the report
    reads it from there, whichever subpackage asks."""
    package = Path(cbam_kernels.__file__).parent
    assert Path(backend.BUILD_INFO) == package / "build_info.json"
    assert 'open(os.path.join("cbam_kernels", "build_info.json"), "w")' in \
        (package.parent / "setup.py").read_text()
