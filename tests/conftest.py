"""Shared fixtures: which (device, backend) pairs the correctness suite runs on.

* A plain run tests the PyTorch backend on the CPU and, when a GPU is present, every backend
  that is available for CUDA tensors.
* ``TRITON_INTERPRET=1 python -m pytest tests -m triton`` runs the Triton kernels on CPU tensors
  through Triton's interpreter (tiny shapes only); tests that use the Triton backend carry the
  ``triton`` marker.
"""

import os

import pytest
import torch

from cbam_kernels.backend import ENV_VAR, available_backends

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
