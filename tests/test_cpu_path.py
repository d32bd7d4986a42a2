"""Converted models on the CPU: the plain-PyTorch path against the original modules, in eager
mode and under ``torch.compile(fullgraph=True)`` (which must see through it: no opaque op, no
graph break), in float32: outputs, input and parameter gradients, and the BatchNorm running
statistics after a training step."""

import copy

import pytest
import torch
from torch import nn

from cbam_kernels import convert, reference
from model_testing import check_same, randomize


def small_model() -> nn.Module:
    """Convolutions with the official CBAM and an SE module between them (random weights and
    BatchNorm statistics), and its converted copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                          reference.OfficialCBAM(24, 4), nn.Conv2d(24, 24, 3, stride=2),
                          reference.SEModule(24, 4), nn.Conv2d(24, 5, 1))
    return randomize(model)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_converted_model_matches_original(train, compiled):
    torch._dynamo.reset()
    original = small_model()
    converted, summary = convert(copy.deepcopy(original))
    assert len(summary.replaced) == 2, str(summary)
    ours = _Compiled(converted) if compiled else converted
    x = torch.randn(4, 3, 15, 13).to(memory_format=torch.channels_last)
    check_same(ours, original, x, train)


class _Compiled(nn.Module):
    """``torch.compile(module, fullgraph=True)``, seen with the module's own parameter and
    buffer names."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.compiled = torch.compile(module, fullgraph=True, dynamic=False)

    def forward(self, x):
        return self.compiled(x)

    def named_parameters(self, *args, **kwargs):
        return self.module.named_parameters(*args, **kwargs)

    def named_buffers(self, *args, **kwargs):
        return self.module.named_buffers(*args, **kwargs)
