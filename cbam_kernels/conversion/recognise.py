"""Recognising CBAM and SE modules of other libraries by their structure.

Each recogniser looks at one module and returns None when it is not of its kind, and otherwise
a :class:`Match`: the kind, where its attention maps are seen during a forward (read by
:func:`cbam_kernels.capture_attention`, so that capturing and converting know the same modules)
and how to replace it. Its :meth:`Match.plan` raises :class:`Unsupported` when the fused modules
cannot reproduce the module exactly, and otherwise returns a :class:`Plan`: the equivalent fused
module, built on the meta device in the original's train/eval mode, holding its parameters and
buffers under the original's names (so that the original's tensors move over name for name and
checkpoints load either way). Nothing from timm,
torchvision or the official repository is imported: only submodule names, ``torch.nn`` layer
types, shapes and class names (of activations, of timm's ``Light*`` variants, and of modules
that look like attention) are read.
"""

import re
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ..modules.cbam import CBAM, ChannelGate, SpatialGate
from ..ops.types import ACTIVATIONS, GATES
from ..modules.se import SE

# Class names (lower case) of activation modules that compute one of the fused functions:
# timm's Swish and its memory-efficient SwishMe / HardSigmoidMe variants (whose backward at
# exactly x = -3 and 3 passes the gradient that F.hardsigmoid's does not).
ALIASES = {"swish": "silu", "swishme": "silu", "hardsigmoidme": "hardsigmoid"}

# Class names of modules that look like channel or spatial attention: those that are none of
# the structures below are listed as left in place by convert().
LOOKS_LIKE_ATTENTION = re.compile(
    r"Excit|Cbam|CBAM|SE(Module|Layer|Block)?$|Se(Module|Layer|Block)$"
    r"|(Eca|Ceca|ECA)(Module|Layer)?$|GlobalContext$|(Channel|Spatial|Coord|Strip|Local)"
    r"(Attn|Attention|Gate)$")


SPATIAL_PROBE_CHANNELS = 8  # a spatial gate takes any width: the one it is probed with


class Unsupported(Exception):
    """A CBAM/SE module the fused modules cannot reproduce exactly (the message says why)."""


@dataclass
class Plan:
    """How to replace one recognised module.

    Attributes:
        kind: what the original is, e.g. "timm CbamModule".
        module: the replacement, on the meta device until it adopts the original's tensors
            (which it holds under the same names).
        channels: C, the input width (for probing).
    """

    kind: str
    module: nn.Module
    channels: int


# How a MapSource's value is read: the submodule's output (a gate layer's), the sigmoid of its
# output (logits, the sigmoid being a function) or, for the official ChannelGate (whose sigmoid
# is a function), the sigmoid of the sum of its ``mlp`` over the ``pool_types`` of its input.
OUTPUT, SIGMOID_OF_OUTPUT, OFFICIAL_POOLED_MLP = "output", "sigmoid(output)", "official pools"


@dataclass(frozen=True)
class MapSource:
    """Where one attention map of a recognised module is seen during its forward.

    Attributes:
        field: "channel" (read as (N, C)) or "spatial" (read as (N, H, W), channel 0).
        path: the submodule (qualified name, "" for the module itself) whose forward shows it.
        value: how: :data:`OUTPUT`, :data:`SIGMOID_OF_OUTPUT` or :data:`OFFICIAL_POOLED_MLP`.
    """

    field: str
    path: str
    value: str = OUTPUT


@dataclass(frozen=True)
class Match:
    """A module recognised by structure (convertible or not).

    Attributes:
        kind: what it is, e.g. "timm CbamModule".
        maps: where its channel and spatial maps are seen.
        build: the fused replacement (on the meta device) and its input width C, or raises
            :class:`Unsupported`.
    """

    kind: str
    maps: Tuple[MapSource, ...]
    build: Callable[[], Tuple[nn.Module, int]]

    def plan(self) -> Plan:
        """The replacement plan, or :class:`Unsupported`."""
        return Plan(self.kind, *self.build())

def activation_name(module: Optional[nn.Module]) -> str:
    """Lower-case class name of an activation module ("relu", "sigmoid", ...; timm's Swish ->
    "silu", HardSigmoid -> "hardsigmoid")."""
    name = type(module).__name__.lower()
    return ALIASES.get(name, name)


def looks_like_attention(module: nn.Module) -> bool:
    """Whether ``module``'s class name is that of a channel or spatial attention module (SE,
    CBAM, ECA, gather-excite, global context, coordinate attention, ...)."""
    return bool(LOOKS_LIKE_ATTENTION.search(type(module).__name__))


def _check_functions(act: str, gate: str) -> None:
    """Unsupported unless the fused MLP has this hidden activation and gate function."""
    if act not in ACTIVATIONS or gate not in GATES:
        raise Unsupported(f"activation {act!r} / gate {gate!r} (fused: activations "
                          f"{ACTIVATIONS}, gates {GATES})")


def _check_pointwise(conv: nn.Module, what: str) -> nn.Conv2d:
    if not (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1):
        raise Unsupported(f"{what} is not a plain 1x1 convolution: {conv}")
    return conv


def _check_mlp(first: nn.Module, second: nn.Module) -> Tuple[int, int, bool, bool]:
    """(C, R, bias, linear) of an MLP of two Linear layers or two 1x1 convs, or Unsupported."""
    linear = type(first) is nn.Linear
    if linear and type(second) is not nn.Linear:
        raise Unsupported(f"the MLP mixes a Linear layer and a {type(second).__name__}")
    if not linear:
        _check_pointwise(first, "the MLP's first layer")
        _check_pointwise(second, "the MLP's second layer")
    hidden, channels = first.weight.shape[:2]
    if tuple(second.weight.shape[:2]) != (channels, hidden):
        raise Unsupported(f"the MLP's layers do not chain: {first} then {second}")
    bias = first.bias is not None
    if bias != (second.bias is not None):
        raise Unsupported("only one of the two MLP layers has a bias")
    return channels, hidden, bias, linear


def _with_meta(build: Callable[[], nn.Module], original: nn.Module) -> nn.Module:
    try:
        with torch.device("meta"):
            module = build()
    except (KeyError, ValueError) as err:  # e.g. layer names that clash with the module's
        raise Unsupported(f"no fused module holds it under its own names ({err})") from err
    return module.train(original.training)


def _spatial_kernel(conv: nn.Module, bn: nn.Module) -> int:
    """k of a spatial gate's conv (2 -> 1, k x k) + BatchNorm2d(1), or Unsupported."""
    k = conv.kernel_size[0] if type(conv) is nn.Conv2d else None
    if not (k is not None and conv.in_channels == 2 and conv.out_channels == 1
            and conv.kernel_size == (k, k) and k % 2 == 1 and conv.padding == (k // 2, k // 2)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.bias is None and conv.padding_mode == "zeros"):
        raise Unsupported(f"spatial conv is not 2 -> 1, odd k x k, 'same' padding, no bias: "
                          f"{conv}")
    if not (isinstance(bn, nn.BatchNorm2d) and bn.num_features == 1 and bn.affine
            and bn.track_running_stats
            and all(type(c) is nn.Identity for c in bn.children())):
        raise Unsupported(f"spatial norm is not an affine BatchNorm2d(1) with running stats: {bn}")
    return k


def _spatial_gate(k: int, bn: nn.Module, style: str) -> SpatialGate:
    """A SpatialGate with kernel k and the BatchNorm settings (eps, momentum) of ``bn``."""
    gate = SpatialGate(k, style)
    gate.block.bn.eps, gate.block.bn.momentum = bn.eps, bn.momentum
    return gate


def _timm_spatial(spatial: nn.Module) -> Tuple[int, nn.Module]:
    """(k, BatchNorm) of timm's ``SpatialAttn`` (``conv.conv``, ``conv.bn``, sigmoid ``gate``),
    or Unsupported."""
    conv_bn = spatial.conv
    if set(conv_bn._modules) != {"conv", "bn"}:
        raise Unsupported(f"spatial conv block is not conv + bn: {conv_bn}")
    k = _spatial_kernel(conv_bn.conv, conv_bn.bn)
    if activation_name(spatial.gate) != "sigmoid":
        raise Unsupported(f"spatial gate {activation_name(spatial.gate)!r} (the fused spatial "
                          "gate is a sigmoid)")
    return k, conv_bn.bn


def _spatial_match(kind: str, m: nn.Module,
                   settings: Callable[[nn.Module], Tuple[int, nn.Module]], style: str,
                   maps: Tuple[MapSource, ...]) -> Match:
    """The match of a spatial gate whose (k, BatchNorm) ``settings`` reads (or Unsupported)."""
    def build() -> Tuple[nn.Module, int]:
        k, bn = settings(m)
        return _with_meta(lambda: _spatial_gate(k, bn, style), m), SPATIAL_PROBE_CHANNELS
    return Match(kind, maps, build)


def _is_official_channel(m: Optional[nn.Module]) -> bool:
    return isinstance(getattr(m, "mlp", None), nn.Module) and hasattr(m, "pool_types")


def _official_channel(gate: nn.Module) -> Tuple[int, int, Callable[[], ChannelGate]]:
    """(C, R, builder of the fused twin) of the official ``ChannelGate``, or Unsupported."""
    pool_types = tuple(gate.pool_types)
    if not set(pool_types) <= {"avg", "max"}:
        raise Unsupported(f"pool types {pool_types} (only 'avg' and 'max' are fused)")
    mlp = gate.mlp
    if not (isinstance(mlp, nn.Sequential) and len(mlp) == 4 and "flatten" in activation_name(
            mlp[0]) and type(mlp[1]) is nn.Linear and type(mlp[3]) is nn.Linear):
        raise Unsupported(f"channel MLP is not Sequential(Flatten, Linear, act, Linear): {mlp}")
    act = activation_name(mlp[2])
    _check_functions(act, "sigmoid")
    channels, hidden, bias, _ = _check_mlp(mlp[1], mlp[3])
    return channels, hidden, lambda: ChannelGate(channels, pool_types=pool_types,
                                                 style="official", hidden_channels=hidden,
                                                 bias=bias, act=act)


def _official_spatial(gate: nn.Module) -> Tuple[int, nn.Module]:
    """(k, BatchNorm) of the official ``SpatialGate`` (``spatial.conv``, ``spatial.bn``), or
    Unsupported."""
    conv_bn = gate.spatial
    if getattr(conv_bn, "relu", None) is not None:
        raise Unsupported("spatial conv block has a ReLU")
    return _spatial_kernel(conv_bn.conv, conv_bn.bn), conv_bn.bn


OFFICIAL_SPATIAL_MAP = "spatial"  # the official SpatialGate's conv + BN: its map's logits


def official_cbam(m: nn.Module) -> Optional[Match]:
    """The official repository's ``CBAM`` (``ChannelGate.mlp``, ``SpatialGate.spatial``)."""
    if not (hasattr(m, "no_spatial") and _is_official_channel(getattr(m, "ChannelGate", None))):
        return None
    maps = (MapSource("channel", "ChannelGate", OFFICIAL_POOLED_MLP),)
    if not m.no_spatial:
        maps += (MapSource("spatial", f"SpatialGate.{OFFICIAL_SPATIAL_MAP}", SIGMOID_OF_OUTPUT),)

    def build() -> Tuple[nn.Module, int]:
        channels, hidden, channel_gate = _official_channel(m.ChannelGate)
        spatial = None if m.no_spatial else _official_spatial(m.SpatialGate)

        def new() -> CBAM:
            cbam = CBAM(channels, no_spatial=spatial is None, style="official",
                        hidden_channels=hidden)
            cbam.ChannelGate = channel_gate()
            if spatial is not None:
                cbam.SpatialGate = _spatial_gate(*spatial, "official")
            return cbam
        return _with_meta(new, m), channels

    return Match("official CBAM", maps, build)


def official_channel_gate(m: nn.Module) -> Optional[Match]:
    """The official repository's ``ChannelGate`` on its own (``mlp``, ``pool_types``; its
    sigmoid is a function)."""
    if not _is_official_channel(m):
        return None

    def build() -> Tuple[nn.Module, int]:
        channels, _, channel_gate = _official_channel(m)
        return _with_meta(channel_gate, m), channels

    return Match("official ChannelGate", (MapSource("channel", "", OFFICIAL_POOLED_MLP),), build)


def official_spatial_gate(m: nn.Module) -> Optional[Match]:
    """The official repository's ``SpatialGate`` on its own (``compress``, ``spatial``; its
    sigmoid is a function)."""
    if set(m._modules) != {"compress", OFFICIAL_SPATIAL_MAP}:
        return None
    return _spatial_match("official SpatialGate", m, _official_spatial, "official",
                          (MapSource("spatial", OFFICIAL_SPATIAL_MAP, SIGMOID_OF_OUTPUT),))


LINEAR_OVER_LAST_DIM = ("fc1/fc2 are Linear layers over the last dimension (a channels-last "
                        "block such as timm's SqueezeExciteCl)")


def _timm_channel(channel: nn.Module) -> Tuple[int, Callable[[], ChannelGate]]:
    """(C, builder of the fused twin) of timm's ``ChannelAttn`` (``fc1``, ``act``, ``fc2``,
    ``gate``: the MLP on the average and on the max pool, summed), or Unsupported."""
    if type(channel).__name__.startswith("Light"):
        raise Unsupported("the average and max pools are averaged before the MLP "
                          f"({type(channel).__name__})")
    channels, hidden, bias, linear = _check_mlp(channel.fc1, channel.fc2)
    if linear:
        raise Unsupported(LINEAR_OVER_LAST_DIM)
    act, gate = activation_name(channel.act), activation_name(channel.gate)
    _check_functions(act, gate)
    return channels, lambda: ChannelGate(channels, style="timm", hidden_channels=hidden,
                                         bias=bias, act=act, gate=gate)


def timm_cbam(m: nn.Module) -> Optional[Match]:
    """timm's ``CbamModule`` (``channel``: ``ChannelAttn``, ``spatial``: ``SpatialAttn``)."""
    channel, spatial = getattr(m, "channel", None), getattr(m, "spatial", None)
    if not (all(hasattr(channel, n) for n in ("fc1", "act", "gate"))
            and all(hasattr(spatial, n) for n in ("conv", "gate"))):
        return None

    def build() -> Tuple[nn.Module, int]:
        k, bn = _timm_spatial(spatial)
        channels, channel_gate = _timm_channel(channel)

        def new() -> CBAM:
            cbam = CBAM(channels, style="timm")
            cbam.channel = channel_gate()
            cbam.spatial = _spatial_gate(k, bn, "timm")
            return cbam
        return _with_meta(new, m), channels

    return Match("timm CbamModule", (MapSource("channel", "channel.gate"),
                                     MapSource("spatial", "spatial.gate")), build)


def timm_channel_attn(m: nn.Module) -> Optional[Match]:
    """timm's ``ChannelAttn`` on its own (``fc1``, ``act``, ``fc2``, ``gate``; an SE module
    has the same children, so the class name tells the average+max MLP apart)."""
    if set(m._modules) != {"fc1", "act", "fc2", "gate"} or "ChannelAttn" not in type(m).__name__:
        return None

    def build() -> Tuple[nn.Module, int]:
        channels, channel_gate = _timm_channel(m)
        return _with_meta(channel_gate, m), channels

    return Match("timm ChannelAttn", (MapSource("channel", "gate"),), build)


def timm_spatial_attn(m: nn.Module) -> Optional[Match]:
    """timm's ``SpatialAttn`` on its own (``conv.conv``, ``conv.bn``, ``gate``)."""
    if set(m._modules) != {"conv", "gate"} or not hasattr(m.conv, "bn"):
        return None
    return _spatial_match("timm SpatialAttn", m, _timm_spatial, "timm",
                          (MapSource("spatial", "gate"),))


def _se_match(kind: str, m: nn.Module, layers: Tuple[str, str], act: str, gate: str,
              check: Optional[Callable[[nn.Module], None]]) -> Match:
    """The match of an SE block whose two layers, activation and gate are ``m``'s submodules
    ``layers``, ``act`` and ``gate`` (the channel map is the gate's output); ``check`` raises
    Unsupported for what else the fused SE cannot reproduce."""
    def build() -> Tuple[nn.Module, int]:
        if check is not None:
            check(m)
        channels, hidden, bias, linear = _check_mlp(*(m.get_submodule(n) for n in layers))
        act_name, gate_name = (activation_name(m.get_submodule(n)) for n in (act, gate))
        _check_functions(act_name, gate_name)
        return _with_meta(lambda: SE(channels, bias=bias, hidden_channels=hidden, act=act_name,
                                     gate=gate_name, layers=layers, linear=linear), m), channels
    return Match(kind, (MapSource("channel", gate),), build)


def _check_global_average(pool: nn.Module) -> None:
    if not (isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))):
        raise Unsupported(f"squeeze is not a global average pool: {pool}")


def _check_timm_se(m: nn.Module) -> None:
    if type(m.bn) is not nn.Identity:
        raise Unsupported(f"norm between fc1 and fc2: {m.bn}")
    if getattr(m, "add_maxpool", False):
        raise Unsupported("add_maxpool (the squeeze averages the average and max pools)")


def _check_not_channels_last(m: nn.Module) -> None:
    if isinstance(m.fc1, nn.Linear):
        raise Unsupported(LINEAR_OVER_LAST_DIM)


# The SE blocks conv_se knows: (children, kind, MLP layers, activation, gate, extra check).
CONV_SE = (
    ({"fc1", "bn", "act", "fc2", "gate"}, "timm SEModule", ("fc1", "fc2"), "act", "gate",
     _check_timm_se),
    ({"fc1", "act", "fc2", "gate"}, "SE module (fc1, act, fc2, gate)", ("fc1", "fc2"), "act",
     "gate", _check_not_channels_last),
    ({"conv_reduce", "act1", "conv_expand", "gate"}, "timm SqueezeExcite",
     ("conv_reduce", "conv_expand"), "act1", "gate", None),
    ({"fc1", "relu", "fc2", "sigmoid"}, "timm SENet SEModule", ("fc1", "fc2"), "relu",
     "sigmoid", None),
    ({"avgpool", "fc1", "activation", "fc2", "scale_activation"},
     "torchvision SqueezeExcitation", ("fc1", "fc2"), "activation", "scale_activation",
     lambda m: _check_global_average(m.avgpool)),
)


def conv_se(m: nn.Module) -> Optional[Match]:
    """The SE blocks of timm and torchvision, by their submodules: timm's ``SEModule`` (``fc1``,
    ``bn``, ``act``, ``fc2``, ``gate``), its EfficientNet / MobileNetV3 ``SqueezeExcite``
    (``conv_reduce``, ``act1``, ``conv_expand``, ``gate``), its legacy SENet ``SEModule``
    (``fc1``, ``relu``, ``fc2``, ``sigmoid``), an SE module of ``fc1``, ``act``, ``fc2``,
    ``gate`` (``cbam_kernels.reference.SEModule``) and torchvision's ``SqueezeExcitation``
    (``avgpool``, ``fc1``, ``activation``, ``fc2``, ``scale_activation``)."""
    children = set(m._modules)
    return next((_se_match(kind, m, *rest) for names, kind, *rest in CONV_SE
                 if children == names), None)


def effective_se(m: nn.Module) -> Optional[Match]:
    """timm's ``EffectiveSEModule`` (``fc``, ``gate``): recognised, never converted."""
    if not (set(m._modules) == {"fc", "gate"} and hasattr(m, "add_maxpool")):
        return None

    def build() -> Tuple[nn.Module, int]:
        raise Unsupported("one 1x1 conv between squeeze and gate (the fused MLP is two layers "
                          "with an activation between)")
    return Match("timm EffectiveSEModule", (MapSource("channel", "gate"),), build)


def sequential_se(m: nn.Module) -> Optional[Match]:
    """A plain SE block of two children: ``AdaptiveAvgPool2d(1)`` and ``Sequential(layer, act,
    layer, gate)`` with Linear layers (senet.pytorch's ``SELayer``, the classic ``SEBlock``) or
    1x1 convs."""
    children = list(m._modules.items())
    if not (len(children) == 2 and isinstance(children[0][1], nn.AdaptiveAvgPool2d)
            and isinstance(children[1][1], nn.Sequential) and len(children[1][1]) == 4
            and all(type(children[1][1][i]) in (nn.Linear, nn.Conv2d) for i in (0, 2))):
        return None
    pool, name = children[0][0], children[1][0]
    return _se_match("SE block (Sequential)", m, (f"{name}.0", f"{name}.2"), f"{name}.1",
                     f"{name}.3", lambda m: _check_global_average(m.get_submodule(pool)))


RECOGNISERS = (official_cbam, official_channel_gate, official_spatial_gate, timm_cbam,
               timm_channel_attn, timm_spatial_attn, conv_se, effective_se, sequential_se)


def has_hooks(module: nn.Module, recurse: bool = True) -> bool:
    """Whether forward or backward hooks are registered on ``module`` (or its submodules)."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or m._backward_pre_hooks for m in (module.modules() if recurse else [module]))


def identify(module: nn.Module) -> Optional[Match]:
    """What ``module`` is by its structure (the first of :data:`RECOGNISERS` that knows it,
    convertible or not), or None if it is no CBAM/SE module of another library."""
    return next((match for match in (recognise_kind(module) for recognise_kind in RECOGNISERS)
                 if match is not None), None)


def recognise(module: nn.Module) -> Optional[Plan]:
    """The replacement plan for ``module``, None if it is no CBAM/SE module, or Unsupported."""
    match = identify(module)
    if match is None:
        return None
    plan = match.plan()
    if has_hooks(module):
        raise Unsupported("hooks are registered on it or its submodules (they would not run in "
                          "the fused module)")
    return plan


def is_attention(module: nn.Module) -> bool:
    """True for this package's attention modules and for every module :func:`identify` knows
    (convertible or not)."""
    return isinstance(module, (CBAM, ChannelGate, SpatialGate)) or identify(module) is not None
