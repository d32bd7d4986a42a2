"""Glue shared by every module: input checks, the fused call, BatchNorm running statistics.

:func:`apply_attention` is the single place where a channel gate and/or a spatial gate meet the
fused op, so SE, ChannelGate, SpatialGate and CBAM all run the same code.
"""

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from .gate_op import attention_gate

if TYPE_CHECKING:
    from .channel_gate import ChannelGate
    from .spatial_gate import SpatialGate


def check_input(x: Tensor, channels: Optional[int], module: nn.Module) -> None:
    """Raise a clear error for an input the fused gates cannot take."""
    name = type(module).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point input, got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} was built for {channels} channels, got an input with "
                         f"{x.shape[1]} channels (shape {tuple(x.shape)})")
    for pname, p in module.named_parameters():
        if p.device != x.device:
            raise RuntimeError(f"{name}: input is on {x.device} but parameter {pname!r} is on "
                               f"{p.device}; move the module with .to({str(x.device)!r})")


def check_residual(x: Tensor, residual: Tensor) -> None:
    """Raise a clear error for a residual that cannot be added to the gated x."""
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual must match the input: got {tuple(residual.shape)} "
                         f"{residual.dtype} on {residual.device} for an input "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")


def apply_attention(x: Tensor, channel: Optional["ChannelGate"] = None,
                    spatial: Optional["SpatialGate"] = None,
                    residual: Optional[Tensor] = None) -> Tensor:
    """y = x * channel_gate(x) * spatial_gate(x * channel_gate(x)), fused where possible.

    Either gate may be None. With ``residual`` (x's shape and dtype), returns the ResNet block
    epilogue relu(y + residual) instead, fused into the same pass. A spatial gate whose
    BatchNorm cannot be fused (a SyncBatchNorm or another norm in training mode) runs its small
    part eagerly after a fused channel gate.
    """
    if residual is not None:
        check_residual(x, residual)
    if x.numel() == 0:
        return torch.empty_like(x)
    if spatial is not None and not spatial.fusable():
        x1 = apply_attention(x, channel) if channel is not None else x
        y = spatial.forward_eager(x1)
        return y if residual is None else torch.relu(y + residual)
    kwargs = {}
    if channel is not None:
        kwargs.update(channel.gate_args())
    if spatial is not None:
        kwargs.update(spatial.gate_args(x))
    y, stats = attention_gate(x, residual, **kwargs)
    if spatial is not None:
        spatial.update_running_stats(stats, x.shape[0] * x.shape[2] * x.shape[3])
    return y
