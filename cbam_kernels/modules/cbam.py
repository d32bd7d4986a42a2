"""CBAM (Woo et al., ECCV 2018) and its two gates, each one fused op.

:class:`ChannelGate` (also the base of :class:`~cbam_kernels.SE`), :class:`SpatialGate` and
:class:`CBAM` hold their parameters under the keys of the checkpoints they load and hand the op
(``ops.gate.attention_gate``) plain tensors and tuples: their
:class:`~cbam_kernels.ops.types.GateParams`, :class:`~cbam_kernels.ops.types.GateConfig` and
the :class:`~cbam_kernels.ops.types.BatchNormState` of their own BatchNorm. The op checks the
input and the residual, for every caller alike.
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..ops.gate import attention_gate, check_input, check_residual
from ..ops.types import ACTIVATIONS, GATES, BatchNormState, GateConfig, GateParams
from .mlp_layers import Path, add_layers, layer_paths

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


def refuse_scripting(module: object) -> None:
    """The fused modules' ``__prepare_scriptable__``: ``torch.jit.script`` cannot compile a
    call into the fused kernels, so say what to use instead."""
    raise RuntimeError(
        f"torch.jit.script cannot compile {type(module).__name__} (a fused cbam_kernels "
        "module) and is deprecated: use torch.compile(model) for speed, torch.export.export "
        "or torch.onnx.export to deploy")


def _submodule(module: nn.Module, path: Path) -> nn.Module:
    """The submodule of ``module`` at ``path`` (plain dictionary lookups: this runs on every
    call, where ``nn.Module.get_submodule`` would cost more than the lookups)."""
    for key in path:
        module = module._modules[key]
    return module


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
            (``("fc.0", "fc.2")``), see :mod:`cbam_kernels.modules.mlp_layers`.
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
        return _submodule(self, first), _submodule(self, second)

    def gate_params(self) -> GateParams:
        """The MLP's tensors as :class:`~cbam_kernels.ops.types.GateParams` (the Linear
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
        """The gate's :class:`~cbam_kernels.ops.types.GateConfig` (``max_first``: the order of
        a spatial gate's map that runs in the same call)."""
        return self._configs[max_first]

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """x (N, C, H, W) -> x * channel attention, same dtype and memory format.

        With ``residual``: relu(gated x + residual), the ResNet block epilogue, in the same pass.
        """
        return attention_gate(x, residual, self.gate_params(), self._configs[True],
                              name=type(self).__name__)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, hidden_channels={self.hidden_channels}, "
                f"pool_types={self.pool_types}, style={self.style!r}"
                + ("" if (self.act, self.gate) == ("relu", "sigmoid")
                   else f", act={self.act!r}, gate={self.gate!r}")
                + ("" if (self.layers, self.linear) == LAYERS[self.style]
                   else f", layers={self.layers}, linear={self.linear}"))


BN_MOMENTUM = {"official": 0.01, "timm": 0.1}


class ConvBN(nn.Module):
    """conv k x k (2 -> 1, 'same' padding, no bias) followed by BatchNorm2d(1).

    Holds the spatial gate's parameters under the keys ``conv.weight`` and ``bn.*``.
    """

    def __init__(self, kernel_size: int, momentum: float):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=momentum)

    def forward(self, p: Tensor) -> Tensor:
        """(N, 2, H, W) pooled map -> (N, 1, H, W) normalised logits."""
        return self.bn(self.conv(p))


class SpatialGate(nn.Module):
    """Spatial attention of CBAM (Woo et al., 2018), fused forward and backward.

    Args:
        kernel_size: k, odd (7 or 3 in the paper).
        style: "official" -- map order [max, mean], BatchNorm momentum 0.01, keys
            ``spatial.conv.weight``, ``spatial.bn.*``; "timm" -- map order [mean, max], momentum
            0.1, keys ``conv.conv.weight``, ``conv.bn.*``.

    The BatchNorm is a real ``nn.BatchNorm2d`` submodule: training mode normalises with batch
    statistics and updates ``running_mean``/``running_var``/``num_batches_tracked`` as
    ``nn.BatchNorm2d`` does; eval mode uses the running statistics. After
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` (or with any other norm) the gate's small part
    runs eagerly in training so the norm's own statistics logic applies.
    """

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, kernel_size: int = 7, style: str = "official"):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.style = check_style(style)
        self.kernel_size = kernel_size
        block = ConvBN(kernel_size, BN_MOMENTUM[style])
        if style == "official":
            self.spatial = block
        else:
            self.conv = block

    @property
    def block(self) -> ConvBN:
        """The conv + BatchNorm submodule (``spatial`` or ``conv`` depending on the style)."""
        return self._modules["spatial" if self.style == "official" else "conv"]

    @property
    def max_first(self) -> bool:
        """Whether the pooled map is ordered [max, mean] (official) rather than [mean, max]."""
        return self.style == "official"

    def fusable(self) -> bool:
        """True when the fused op can reproduce the norm exactly (a plain BatchNorm2d, or any
        BatchNorm in eval mode)."""
        bn = self.block.bn
        return type(bn) is nn.BatchNorm2d or (
            isinstance(bn, nn.modules.batchnorm._BatchNorm) and not bn.training
            and bn.running_mean is not None)

    def gate_params(self, channel: GateParams = GateParams()) -> GateParams:
        """The conv weight and BatchNorm affine terms as
        :class:`~cbam_kernels.ops.types.GateParams`, beside the MLP of ``channel`` (the
        channel gate's, when both run in one call)."""
        conv, bn = (self.block._modules[k]._parameters for k in ("conv", "bn"))
        return GateParams(channel.w1, channel.b1, channel.w2, channel.b2, conv["weight"],
                          bn["weight"], bn["bias"])

    def bn_state(self) -> BatchNormState:
        """This gate's BatchNorm: batch statistics (and their running update) in training or
        without running statistics, else the running ones."""
        bn = self.block._modules["bn"]
        buffers = bn._buffers
        tracked = bn.training and bn.track_running_stats
        return BatchNormState(buffers["running_mean"], buffers["running_var"],
                              buffers["num_batches_tracked"] if tracked else None, bn.eps,
                              bn.momentum, bn.training or buffers["running_mean"] is None)

    def forward_eager(self, x: Tensor) -> Tensor:
        """Unfused spatial gate through the submodules themselves (for norms it cannot fuse)."""
        pair = (x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True))
        p = torch.cat(pair if self.max_first else pair[::-1], dim=1)
        return x * torch.sigmoid(self.block(p))

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """x (N, C, H, W) -> x * spatial attention, same dtype and memory format.

        With ``residual``: relu(gated x + residual), the ResNet block epilogue, in the same pass.
        """
        params = self.gate_params()
        if not self.fusable():
            check_input(x, params, type(self).__name__)
            if residual is not None:
                check_residual(x, residual)
            y = self.forward_eager(x)
            return y if residual is None else torch.relu(y + residual)
        return attention_gate(x, residual, params, GateConfig(max_first=self.max_first),
                              self.bn_state(), name=type(self).__name__)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, style={self.style!r}"


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
        if spatial is None:
            return attention_gate(x, residual, params, channel.gate_config(), name="CBAM")
        if not spatial.fusable():
            return spatial(attention_gate(x, None, params, channel.gate_config(), name="CBAM"),
                           residual)
        return attention_gate(x, residual, spatial.gate_params(params),
                              channel.gate_config(spatial.max_first), spatial.bn_state(),
                              name="CBAM")

    def extra_repr(self) -> str:
        return f"style={self.style!r}, no_spatial={self.spatial_gate is None}"
