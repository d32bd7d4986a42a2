"""The attention modules the model builders insert: kinds, construction, the epilogue switch."""

from typing import Optional

from torch import nn

from .. import reference
from ..modules.cbam import CBAM, ChannelGate, SpatialGate
from ..modules.se import SE

KINDS = ("se", "cbam")


def check_kind(kind: Optional[str]) -> Optional[str]:
    """Validate an ``attention`` argument: None, "se" or "cbam"."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"attention must be None or one of {KINDS}, got {kind!r}")
    return kind


def make_attention(kind: str, channels: int, reduction: int = 16, reference_impl: bool = False,
                   like: Optional[nn.Module] = None) -> nn.Module:
    """A new attention module of ``kind`` for ``channels`` channels.

    "se": :class:`~cbam_kernels.SE` (keys ``fc1``/``fc2``, hidden width C // reduction);
    "cbam": :class:`~cbam_kernels.CBAM` in the official parameterisation (keys
    ``ChannelGate.mlp.1/3``, ``SpatialGate.spatial.conv/bn``). With ``reference_impl`` the eager
    oracles :class:`~cbam_kernels.reference.SEModule` /
    :class:`~cbam_kernels.reference.OfficialCBAM` with the same keys. With ``like``, the module
    takes the device, dtype and train/eval mode of ``like`` (its first parameter).
    """
    check_kind(kind)
    if kind == "se":
        module = reference.SEModule(channels, reduction) if reference_impl else SE(channels,
                                                                                    reduction)
    else:
        module = (reference.OfficialCBAM(channels, reduction) if reference_impl
                  else CBAM(channels, reduction, style="official"))
    if like is not None:
        template = next(like.parameters())
        module.to(device=template.device, dtype=template.dtype).train(like.training)
    return module


def accepts_residual(module: nn.Module) -> bool:
    """Whether ``module(x, residual=r)`` computes the fused epilogue relu(module(x) + r)."""
    return isinstance(module, (CBAM, ChannelGate, SpatialGate))
