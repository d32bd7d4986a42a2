"""Recognising CBAM and SE modules of other libraries by their structure.

Each recogniser looks at one module and returns None when it is not of its kind, raises
:class:`Unsupported` when it is but the fused modules cannot reproduce it exactly, and otherwise
returns a :class:`Plan`: the equivalent fused module, built on the meta device in the original's
train/eval mode, holding its parameters and buffers under the original's names (so that the
original's tensors move over name for name and checkpoints load either way). Nothing from timm,
torchvision or the official repository is imported: only submodule names, ``torch.nn`` layer
types, shapes and class names (of activations, of timm's ``Light*`` variants, and of modules
that look like attention) are read.
"""

import re
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ..modules.cbam import CBAM
from ..modules.channel_gate import ChannelGate
from ..ops.types import ACTIVATIONS, GATES
from ..modules.se import SE
from ..modules.spatial_gate import SpatialGate

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


def official_cbam(m: nn.Module) -> Optional[Plan]:
    """The official repository's ``CBAM`` (``ChannelGate.mlp``, ``SpatialGate.spatial``)."""
    gate = getattr(m, "ChannelGate", None)
    if not (hasattr(m, "no_spatial") and hasattr(gate, "mlp") and hasattr(gate, "pool_types")):
        return None
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
    spatial = None
    if not m.no_spatial:
        conv_bn = m.SpatialGate.spatial
        if getattr(conv_bn, "relu", None) is not None:
            raise Unsupported("spatial conv block has a ReLU")
        spatial = (_spatial_kernel(conv_bn.conv, conv_bn.bn), conv_bn.bn)

    def build() -> CBAM:
        new = CBAM(channels, no_spatial=spatial is None, style="official",
                   hidden_channels=hidden)
        new.ChannelGate = ChannelGate(channels, pool_types=pool_types, style="official",
                                      hidden_channels=hidden, bias=bias, act=act)
        if spatial is not None:
            new.SpatialGate = _spatial_gate(*spatial, "official")
        return new

    return Plan("official CBAM", _with_meta(build, m), channels)


LINEAR_OVER_LAST_DIM = ("fc1/fc2 are Linear layers over the last dimension (a channels-last "
                        "block such as timm's SqueezeExciteCl)")


def _timm_channel(channel: nn.Module) -> Tuple[int, int, bool, str, str]:
    """(C, R, bias, act, gate) of timm's ``ChannelAttn`` (``fc1``, ``act``, ``fc2``, ``gate``:
    the MLP on the average and on the max pool, summed), or Unsupported."""
    if type(channel).__name__.startswith("Light"):
        raise Unsupported("the average and max pools are averaged before the MLP "
                          f"({type(channel).__name__})")
    channels, hidden, bias, linear = _check_mlp(channel.fc1, channel.fc2)
    if linear:
        raise Unsupported(LINEAR_OVER_LAST_DIM)
    act, gate = activation_name(channel.act), activation_name(channel.gate)
    _check_functions(act, gate)
    return channels, hidden, bias, act, gate


def timm_cbam(m: nn.Module) -> Optional[Plan]:
    """timm's ``CbamModule`` (``channel``: ``ChannelAttn``, ``spatial``: ``SpatialAttn``)."""
    channel, spatial = getattr(m, "channel", None), getattr(m, "spatial", None)
    if not (hasattr(channel, "fc1") and hasattr(channel, "act") and hasattr(spatial, "conv")):
        return None
    k, bn = _timm_spatial(spatial)
    channels, hidden, bias, act, gate = _timm_channel(channel)

    def build() -> CBAM:
        new = CBAM(channels, style="timm")
        new.channel = ChannelGate(channels, style="timm", hidden_channels=hidden, bias=bias,
                                  act=act, gate=gate)
        new.spatial = _spatial_gate(k, bn, "timm")
        return new

    return Plan("timm CbamModule", _with_meta(build, m), channels)


def timm_channel_attn(m: nn.Module) -> Optional[Plan]:
    """timm's ``ChannelAttn`` on its own (``fc1``, ``act``, ``fc2``, ``gate``; an SE module
    has the same children, so the class name tells the average+max MLP apart)."""
    if set(m._modules) != {"fc1", "act", "fc2", "gate"} or "ChannelAttn" not in type(m).__name__:
        return None
    channels, hidden, bias, act, gate = _timm_channel(m)
    module = _with_meta(lambda: ChannelGate(channels, style="timm", hidden_channels=hidden,
                                            bias=bias, act=act, gate=gate), m)
    return Plan("timm ChannelAttn", module, channels)


def timm_spatial_attn(m: nn.Module) -> Optional[Plan]:
    """timm's ``SpatialAttn`` on its own (``conv.conv``, ``conv.bn``, ``gate``)."""
    if set(m._modules) != {"conv", "gate"} or not hasattr(m.conv, "bn"):
        return None
    k, bn = _timm_spatial(m)
    return Plan("timm SpatialAttn", _with_meta(lambda: _spatial_gate(k, bn, "timm"), m),
                SPATIAL_PROBE_CHANNELS)


def _se_plan(kind: str, m: nn.Module, layers: Tuple[str, str], act: nn.Module,
             gate: nn.Module) -> Plan:
    """The plan for an SE block whose two layers are ``m``'s submodules ``layers``."""
    channels, hidden, bias, linear = _check_mlp(*(m.get_submodule(n) for n in layers))
    act_name, gate_name = activation_name(act), activation_name(gate)
    _check_functions(act_name, gate_name)
    module = _with_meta(lambda: SE(channels, bias=bias, hidden_channels=hidden, act=act_name,
                                   gate=gate_name, layers=layers, linear=linear), m)
    return Plan(kind, module, channels)


def _check_global_average(pool: nn.Module) -> None:
    if not (isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))):
        raise Unsupported(f"squeeze is not a global average pool: {pool}")


def conv_se(m: nn.Module) -> Optional[Plan]:
    """The SE blocks of timm and torchvision, by their submodules: timm's ``SEModule`` (``fc1``,
    ``bn``, ``act``, ``fc2``, ``gate``), its EfficientNet / MobileNetV3 ``SqueezeExcite``
    (``conv_reduce``, ``act1``, ``conv_expand``, ``gate``), its legacy SENet ``SEModule``
    (``fc1``, ``relu``, ``fc2``, ``sigmoid``), an SE module of ``fc1``, ``act``, ``fc2``,
    ``gate`` (``cbam_kernels.reference.SEModule``) and torchvision's ``SqueezeExcitation``
    (``avgpool``, ``fc1``, ``activation``, ``fc2``, ``scale_activation``)."""
    children = set(m._modules)
    if children == {"fc1", "bn", "act", "fc2", "gate"}:
        if type(m.bn) is not nn.Identity:
            raise Unsupported(f"norm between fc1 and fc2: {m.bn}")
        if getattr(m, "add_maxpool", False):
            raise Unsupported("add_maxpool (the squeeze averages the average and max pools)")
        return _se_plan("timm SEModule", m, ("fc1", "fc2"), m.act, m.gate)
    if children == {"fc1", "act", "fc2", "gate"}:
        if isinstance(m.fc1, nn.Linear):
            raise Unsupported(LINEAR_OVER_LAST_DIM)
        return _se_plan("SE module (fc1, act, fc2, gate)", m, ("fc1", "fc2"), m.act, m.gate)
    if children == {"conv_reduce", "act1", "conv_expand", "gate"}:
        return _se_plan("timm SqueezeExcite", m, ("conv_reduce", "conv_expand"), m.act1, m.gate)
    if children == {"fc1", "relu", "fc2", "sigmoid"}:
        return _se_plan("timm SENet SEModule", m, ("fc1", "fc2"), m.relu, m.sigmoid)
    if children == {"avgpool", "fc1", "activation", "fc2", "scale_activation"}:
        _check_global_average(m.avgpool)
        return _se_plan("torchvision SqueezeExcitation", m, ("fc1", "fc2"), m.activation,
                        m.scale_activation)
    return None


def effective_se(m: nn.Module) -> Optional[Plan]:
    """timm's ``EffectiveSEModule`` (``fc``, ``gate``): recognised, never converted."""
    if not (set(m._modules) == {"fc", "gate"} and hasattr(m, "add_maxpool")):
        return None
    raise Unsupported("one 1x1 conv between squeeze and gate (the fused MLP is two layers with "
                      "an activation between)")


def sequential_se(m: nn.Module) -> Optional[Plan]:
    """A plain SE block of two children: ``AdaptiveAvgPool2d(1)`` and ``Sequential(layer, act,
    layer, gate)`` with Linear layers (senet.pytorch's ``SELayer``, the classic ``SEBlock``) or
    1x1 convs."""
    children = list(m._modules.items())
    if not (len(children) == 2 and isinstance(children[0][1], nn.AdaptiveAvgPool2d)
            and isinstance(children[1][1], nn.Sequential) and len(children[1][1]) == 4
            and all(type(children[1][1][i]) in (nn.Linear, nn.Conv2d) for i in (0, 2))):
        return None
    _check_global_average(children[0][1])
    name, (_, act, _, gate) = children[1]
    return _se_plan("SE block (Sequential)", m, (f"{name}.0", f"{name}.2"), act, gate)


RECOGNISERS = (official_cbam, timm_cbam, timm_channel_attn, timm_spatial_attn, conv_se,
               effective_se, sequential_se)


def has_hooks(module: nn.Module, recurse: bool = True) -> bool:
    """Whether forward or backward hooks are registered on ``module`` (or its submodules)."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or m._backward_pre_hooks for m in (module.modules() if recurse else [module]))


def recognise(module: nn.Module) -> Optional[Plan]:
    """The replacement plan for ``module``, None if it is no CBAM/SE module, or Unsupported."""
    for recogniser in RECOGNISERS:
        plan = recogniser(module)
        if plan is not None:
            if has_hooks(module):
                raise Unsupported("hooks are registered on it or its submodules (they would not "
                                  "run in the fused module)")
            return plan
    return None


def is_attention(module: nn.Module) -> bool:
    """True for this package's attention modules and for every module :func:`recognise` knows
    (convertible or not)."""
    if isinstance(module, (CBAM, ChannelGate, SpatialGate)):
        return True
    try:
        return recognise(module) is not None
    except Unsupported:
        return True
