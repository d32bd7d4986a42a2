"""CBAM's channel gate: y = x * sigmoid(MLP(avg_hw(x)) + MLP(max_hw(x)))."""

from typing import Optional, Sequence, Tuple

from torch import Tensor, nn

from ..ops.types import ACTIVATIONS, GATES, GateConfig, GateParams
from ..ops.gate import attention_gate
from .checks import check_input, refuse_scripting
from .mlp_layers import add_layers, get_layer, layer_paths

STYLES = ("official", "timm")
POOL_TYPES = ("avg", "max")
LAYERS = {"official": (("mlp.1", "mlp.3"), True), "timm": (("fc1", "fc2"), False)}


def hidden_width(channels: int, reduction: float, style: str) -> int:
    """MLP width: C // r for the official CBAM (and SE); for timm C / r rounded half up, at
    least 1 (timm's ``make_divisible(C / r, 1, round_limit=0)``)."""
    if style == "timm":
        width = max(1, int(channels / reduction + 0.5))
    else:
        width = int(channels // reduction)
    if width < 1:
        raise ValueError(f"channels={channels} with reduction={reduction} gives an MLP of width "
                         f"{width}; use a smaller reduction or pass hidden_channels")
    return width


def check_style(style: str) -> str:
    """Validate a parameterisation name."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    return style


class ChannelGate(nn.Module):
    """Channel attention of CBAM (Woo et al., 2018), fused forward and backward.

    Args:
        channels: C, the input's channel count.
        reduction: r; the MLP's hidden width is C // r (official) or max(1, round(C / r)) (timm).
        pool_types: any non-empty subset of ("avg", "max"); the MLP outputs are summed.
        style: "official" -- ``mlp`` = Sequential(Flatten, Linear(C, R), ReLU, Linear(R, C)),
            state_dict keys ``mlp.1.{weight,bias}``, ``mlp.3.{weight,bias}``; "timm" -- 1x1 convs
            ``fc1.weight`` (R, C, 1, 1) and ``fc2.weight`` (C, R, 1, 1).
        hidden_channels: R, overriding the width rule.
        bias: MLP biases; default True for "official", False for "timm".
        act: the MLP's hidden activation, "relu" (CBAM, SE) or "silu" (EfficientNet's SE).
        gate: "sigmoid", or "hardsigmoid" (MobileNetV3's SE).
        layers: the names of the MLP's two layers, overriding the style's: two attributes
            (``("conv_reduce", "conv_expand")``) or two indices into one Sequential
            (``("fc.0", "fc.2")``), see :mod:`cbam_kernels.mlp_layers`.
        linear: ``nn.Linear`` layers (weights (R, C) and (C, R)) rather than 1x1 convs;
            default: the style's.
    """

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, channels: int, reduction: float = 16,
                 pool_types: Sequence[str] = POOL_TYPES, style: str = "official",
                 hidden_channels: Optional[int] = None, bias: Optional[bool] = None,
                 act: str = "relu", gate: str = "sigmoid",
                 layers: Optional[Sequence[str]] = None, linear: Optional[bool] = None):
        super().__init__()
        self.style = check_style(style)
        if act not in ACTIVATIONS or gate not in GATES:
            raise ValueError(f"act must be one of {ACTIVATIONS} and gate one of {GATES}, got "
                             f"act={act!r}, gate={gate!r}")
        self.channels = channels
        self.pool_types = tuple(pool_types)
        unknown = [p for p in self.pool_types if p not in POOL_TYPES]
        if unknown or not self.pool_types or len(set(self.pool_types)) != len(self.pool_types):
            raise ValueError(f"pool_types must be a non-empty subset of {POOL_TYPES} without "
                             f"repeats, got {pool_types!r} (lp and lse pooling run only in "
                             "cbam_kernels.reference)")
        config = GateConfig("avg" in self.pool_types, "max" in self.pool_types, act, gate)
        self._configs = {True: config, False: config._replace(max_first=False)}
        hidden = hidden_channels or hidden_width(channels, reduction, style)
        bias = style == "official" if bias is None else bias
        default_layers, default_linear = LAYERS[style]
        self._paths = layer_paths(default_layers if layers is None else layers)
        self.linear = default_linear if linear is None else bool(linear)
        if self.linear:
            first, second = nn.Linear(channels, hidden, bias), nn.Linear(hidden, channels, bias)
        else:
            first = nn.Conv2d(channels, hidden, 1, bias=bias)
            second = nn.Conv2d(hidden, channels, 1, bias=bias)
        add_layers(self, self._paths, first, second, act)

    @property
    def hidden_channels(self) -> int:
        """The MLP's hidden width R."""
        return self.gate_params().w1.shape[0]

    @property
    def layers(self) -> Tuple[str, str]:
        """The names of the MLP's two layers (their state_dict key prefixes)."""
        first, second = self._paths
        return ".".join(first), ".".join(second)

    def _layers(self) -> Tuple[nn.Module, nn.Module]:
        """The MLP's two layers (plain dictionary lookups: this runs on every call)."""
        first, second = self._paths
        return get_layer(self, first), get_layer(self, second)

    def gate_params(self) -> GateParams:
        """The MLP's tensors as :class:`~cbam_kernels.ops.torch.small_math.GateParams` (the Linear
        layers' (R, C) and (C, R) weights, or the 1x1 convs' (R, C, 1, 1) and (C, R, 1, 1))."""
        first, second = self._layers()
        first, second = first._parameters, second._parameters
        return GateParams(first["weight"], first["bias"], second["weight"], second["bias"])

    @property
    def act(self) -> str:
        """The MLP's hidden activation ("relu" or "silu"), fixed at construction."""
        return self._configs[True].act

    @property
    def gate(self) -> str:
        """The gate function ("sigmoid" or "hardsigmoid"), fixed at construction."""
        return self._configs[True].gate

    def gate_config(self, max_first: bool = True) -> GateConfig:
        """The gate's :class:`~cbam_kernels.ops.torch.small_math.GateConfig` (``max_first``: the order of
        a spatial gate's map that runs in the same call)."""
        return self._configs[max_first]

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """x (N, C, H, W) -> x * channel attention, same dtype and memory format.

        With ``residual``: relu(gated x + residual), the ResNet block epilogue, in the same pass.
        """
        params = self.gate_params()
        check_input(x, self.channels, self, params.w1)
        return attention_gate(x, residual, params, self.gate_config())

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, hidden_channels={self.hidden_channels}, "
                f"pool_types={self.pool_types}, style={self.style!r}"
                + ("" if (self.act, self.gate) == ("relu", "sigmoid")
                   else f", act={self.act!r}, gate={self.gate!r}")
                + ("" if (self.layers, self.linear) == LAYERS[self.style]
                   else f", layers={self.layers}, linear={self.linear}"))
