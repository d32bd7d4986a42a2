"""CBAM (Woo et al., ECCV 2018): channel gate, then spatial gate, in one fused op."""

from typing import Optional, Sequence

from torch import Tensor, nn

from .channel_gate import POOL_TYPES, ChannelGate, check_style
from ..ops.types import GateParams
from ..ops.gate import attention_gate
from .checks import check_input, refuse_scripting
from .spatial_gate import SpatialGate


class CBAM(nn.Module):
    """Convolutional Block Attention Module, fused forward and backward.

    ``y = x1 * SpatialGate(x1)`` with ``x1 = x * ChannelGate(x)``; forward makes three passes
    over x and never materialises x1.

    Args:
        channels: C.
        reduction: r of the channel MLP (see :class:`ChannelGate` for the width rule per style).
        kernel_size: k of the spatial conv (odd).
        pool_types: subset of ("avg", "max") for the channel gate.
        no_spatial: channel gate only.
        style: "official" (authors' repository) or "timm" (``timm.layers.CbamModule``). The
            parameterisations differ in MLP biases, hidden width, map order and BN momentum.
        hidden_channels: MLP width R, overriding the rule.

    State_dict keys, official: ``ChannelGate.mlp.1.{weight,bias}``,
    ``ChannelGate.mlp.3.{weight,bias}``, ``SpatialGate.spatial.conv.weight``,
    ``SpatialGate.spatial.bn.{weight,bias,running_mean,running_var,num_batches_tracked}``;
    timm: ``channel.fc1.weight``, ``channel.fc2.weight``, ``spatial.conv.conv.weight``,
    ``spatial.conv.bn.*``.
    """

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, channels: int, reduction: float = 16, kernel_size: int = 7,
                 pool_types: Sequence[str] = POOL_TYPES, no_spatial: bool = False,
                 style: str = "official", hidden_channels: Optional[int] = None):
        super().__init__()
        self.style = check_style(style)
        channel = ChannelGate(channels, reduction, pool_types, style, hidden_channels)
        spatial = None if no_spatial else SpatialGate(kernel_size, style)
        if style == "official":
            self.ChannelGate, self.SpatialGate = channel, spatial
        else:
            self.channel, self.spatial = channel, spatial

    @property
    def channel_gate(self) -> ChannelGate:
        """The channel gate submodule (``ChannelGate`` or ``channel`` depending on the style)."""
        return self._modules["ChannelGate" if self.style == "official" else "channel"]

    @property
    def spatial_gate(self) -> Optional[SpatialGate]:
        """The spatial gate submodule, or None with ``no_spatial``."""
        return self._modules.get("SpatialGate" if self.style == "official" else "spatial")

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """x (N, C, H, W) -> CBAM(x), same dtype and memory format.

        With ``residual``: relu(CBAM(x) + residual), the ResNet block epilogue, in the same pass.
        """
        channel, spatial = self.channel_gate, self.spatial_gate
        params = channel.gate_params()
        check_input(x, channel.channels, self, params.w1)
        if spatial is None:
            return attention_gate(x, residual, params, channel.gate_config())
        if not spatial.fusable():
            return spatial(attention_gate(x, None, params, channel.gate_config()), residual)
        return attention_gate(x, residual, GateParams(*params[:4], *spatial.gate_params()[4:]),
                               channel.gate_config(spatial.max_first), spatial.bn_state(x))

    def extra_repr(self) -> str:
        return f"style={self.style!r}, no_spatial={self.spatial_gate is None}"
