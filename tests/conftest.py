"""Shared fixtures: which (device, backend) pairs the correctness suite runs on.

* A plain run tests the PyTorch backend on the CPU and, when a GPU is present, every backend
  that is available for CUDA tensors.
* ``TRITON_INTERPRET=1 python -m pytest tests -m triton`` runs the Triton kernels on CPU tensors
  through Triton's interpreter (tiny shapes only); tests that use the Triton backend carry the
  ``triton`` marker.
* The ``kernel_pipeline`` fixture gives each whole kernel pipeline that can run here and routes
  the modules through it: on a GPU the ``triton`` and ``cuda`` backends; on the CPU, under
  ``TRITON_INTERPRET=1``, the Triton one and ``cuda-emulated``, the CUDA backend's C++ kernels
  through their CPU emulation (``tests/cuda_emulation``) with the Triton small kernels
  interpreted.
"""

import contextlib
import os
import shutil
from typing import NamedTuple

import pytest
import torch

from cbam_kernels.ops import backend
from cbam_kernels.ops.backend import ENV_VAR, available_backends

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def device_backends():
    """(device, backend) pairs to test here."""
    if INTERPRET:
        return [("cpu", "triton")]
    pairs = [("cpu", "torch")]
    if torch.cuda.is_available():
        pairs += [("cuda", name) for name, state in available_backends().items()
                  if state == "available"]
    return pairs


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: exercises the Triton kernels")


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and "triton" in str(params.params.get("device_backend", "")):
            item.add_marker(pytest.mark.triton)


@pytest.fixture(params=device_backends(), ids=lambda p: f"{p[0]}-{p[1]}")
def device_backend(request, monkeypatch):
    """Selects the backend through CBAM_KERNELS_BACKEND and yields the device to use."""
    device, backend = request.param
    monkeypatch.setenv(ENV_VAR, backend)
    return device


@pytest.fixture(autouse=True, scope="session")
def _float32_without_tf32():
    """float32 references stay float32 on a GPU: PyTorch lets cuDNN convolutions use TF32 by
    default, which would put the eager float32 error, and with it every float32 tolerance that
    follows from it, near 1e-3 instead of near 1e-6."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_backend_choices():
    """Each test chooses backends anew (CBAM_KERNELS_BACKEND is read when a choice is made and
    tests set it)."""
    backend.forget_choices()
    yield
    backend.forget_choices()


class KernelPipeline(NamedTuple):
    """A kernel pipeline under test: its name and ``ops.kernel_pipeline.KernelPipeline``."""

    name: str
    pipeline: object


def kernel_pipeline_names():
    """The kernel pipelines that can run here, as pytest params (marked ``triton``)."""
    if INTERPRET:
        names = ["triton"] + (["cuda-emulated"] if shutil.which("c++") else [])
    elif torch.cuda.is_available():
        names = [b for b in ("triton", "cuda") if available_backends()[b] == "available"]
    else:
        names = []
    return [pytest.param(n, marks=pytest.mark.triton) for n in names]


@pytest.fixture(params=kernel_pipeline_names())
def kernel_pipeline(request, monkeypatch):
    """A :class:`KernelPipeline` that the fused modules run on meanwhile (the backend choice
    is patched to it), with the emulation's memory checks on for ``cuda-emulated``."""
    name = request.param
    with contextlib.ExitStack() as stack:
        if name == "cuda-emulated":
            import cuda_emulation
            from cbam_kernels.ops.kernel_pipeline import KernelPipeline as Pipeline
            stack.enter_context(cuda_emulation.memory_checks())
            pipeline = Pipeline(cuda_emulation.passes)
            monkeypatch.setattr(backend, "backend_for", lambda x: "cuda")
            monkeypatch.setattr(backend, "pipeline_named", lambda name, device=None: pipeline)
        else:
            monkeypatch.setenv(ENV_VAR, name)
            pipeline = backend.pipeline_named(name)
        yield KernelPipeline(name, pipeline)
