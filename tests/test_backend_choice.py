"""The automatic backend choice on each GPU architecture our users have, with the GPU mocked,
and what ``_C`` holds for each architecture."""

import importlib.util
import sys

import pytest
import torch

from cbam_kernels import backend

# Turing (RTX 20xx, T4), A100, Ampere RTX / A-series, Ada (RTX 40xx, L4, L40), Hopper (H100,
# H200), B200, Blackwell RTX (RTX 50xx, RTX PRO) -> what auto takes with _C built and Triton
# installed: the measured order on sm_90, Triton first elsewhere, PyTorch where Triton does not
# compile (its small kernels serve the CUDA backend too).
EXPECTED = {(7, 5): "torch", (8, 0): "triton", (8, 6): "triton", (8, 9): "triton",
            (9, 0): "cuda", (10, 0): "triton", (12, 0): "triton"}


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


@pytest.mark.parametrize("capability", list(EXPECTED), ids=lambda c: f"sm_{c[0]}{c[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_auto_choice_per_architecture(mocked_gpu, capability, dtype):
    name, why = backend._choose("auto", mocked_gpu(capability), dtype)
    assert name == EXPECTED[capability], why
    if capability < backend.TRITON_MIN_CAPABILITY:
        assert "does not compile for sm_75" in why and "small kernels are Triton" in why


def test_without_the_extension_hopper_takes_triton_and_says_why(mocked_gpu):
    name, why = backend._choose("auto", mocked_gpu((9, 0), "no module named _C"), torch.float16)
    assert name == "triton" and "cuda unavailable" in why and "no module named _C" in why


def test_forcing_a_kernel_backend_on_turing_is_a_clear_error(mocked_gpu, monkeypatch):
    device = mocked_gpu((7, 5))
    for name in ("cuda", "triton"):
        monkeypatch.setenv(backend.ENV_VAR, name)
        with pytest.raises(RuntimeError, match="does not compile for sm_75"):
            backend._choose(name, device, torch.float16)


def test_cuda_backend_without_triton_falls_back_with_the_reason(mocked_gpu, monkeypatch):
    """The CUDA backend's small kernels are Triton's: without Triton installed auto must not
    pick it (and fail at its first call), but fall back to PyTorch and say why."""
    device = mocked_gpu((9, 0))
    find_spec = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else find_spec(name, *a))
    name, why = backend._choose("auto", device, torch.float16)
    assert name == "torch" and "small kernels are Triton kernels" in why
    assert "triton is not installed" in why


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
