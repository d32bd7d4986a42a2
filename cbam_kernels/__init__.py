"""Fused CBAM and Squeeze-and-Excitation attention for CNNs, forward and backward.

Drop-in ``nn.Module``s whose full-size work runs as a few memory-bound passes (Triton or CUDA C++
kernels on CUDA, plain PyTorch elsewhere), registered as ``torch.library`` custom ops so that
``torch.compile(fullgraph=True)`` runs them without graph breaks. ``convert`` swaps them into
existing timm / torchvision / official-CBAM models, ``revert`` back; ``models`` builds ResNet and
VGG with them.
Models holding them export (``torch.export``, ONNX) to standard operators;
``capture_attention`` records the maps each attention module applies, ``plot_spatial_maps``
draws them.
"""

from . import finetune, models
from .attention_maps import AttentionMaps, capture_attention
from .ops.backend import available_backends, backend_for, describe_backends
from .modules.cbam import CBAM, ChannelGate, SpatialGate
from .conversion.convert import ConversionSummary, convert
from .finetune import param_groups, unfreeze
from .ops.gate import attention_gate
from .models import add_attention
from .plotting import plot_spatial_maps
from .conversion.revert import revert
from .modules.se import SE

__all__ = ["CBAM", "ChannelGate", "SpatialGate", "SE", "attention_gate", "convert",
           "ConversionSummary", "revert", "add_attention", "models", "finetune", "param_groups",
           "unfreeze",
           "available_backends", "backend_for", "describe_backends", "capture_attention",
           "AttentionMaps", "plot_spatial_maps"]
__version__ = "0.1.0"
