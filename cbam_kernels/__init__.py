"""Fused CBAM and Squeeze-and-Excitation attention for CNNs, forward and backward.

Drop-in ``nn.Module``s whose full-size work runs as a few memory-bound passes (Triton or CUDA C++
kernels on CUDA, plain PyTorch elsewhere), registered as ``torch.library`` custom ops so that
``torch.compile(fullgraph=True)`` runs them without graph breaks. ``convert`` swaps them into
existing timm / torchvision / official-CBAM models; ``models`` builds ResNet and VGG with them.
"""

from . import finetune, models
from .backend import available_backends, backend_for, describe_backends
from .cbam import CBAM
from .channel_gate import ChannelGate
from .convert import ConversionSummary, convert
from .finetune import param_groups, unfreeze
from .gate_op import attention_gate
from .models import add_attention
from .se import SE
from .spatial_gate import SpatialGate

__all__ = ["CBAM", "ChannelGate", "SpatialGate", "SE", "attention_gate", "convert",
           "ConversionSummary", "add_attention", "models", "finetune", "param_groups", "unfreeze",
           "available_backends", "backend_for", "describe_backends"]
__version__ = "0.1.0"
