"""Recognising CBAM and SE modules of other libraries by their structure.

Each recogniser looks at one module and returns None when it is not of its kind, raises
:class:`Unsupported` when it is but the fused modules cannot reproduce it exactly, and otherwise
returns a :class:`Plan`: the equivalent fused module, built on the meta device in the original's
train/eval mode, and which of the original's leaf modules supplies each of its leaves' tensors.
Nothing from timm, torchvision or the official repository is imported: only attribute names,
``torch.nn`` layer types and shapes are read.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .cbam import CBAM
from .channel_gate import ChannelGate
from .gate_math import ACTIVATIONS, GATES
from .se import SE
from .spatial_gate import SpatialGate


class Unsupported(Exception):
    """A CBAM/SE module the fused modules cannot reproduce exactly (the message says why)."""


@dataclass
class Plan:
    """How to replace one recognised module.

    Attributes:
        kind: what the original is, e.g. "timm CbamModule".
        module: the replacement, on the meta device until its tensors are adopted.
        sources: (qualified name of a leaf of ``module``, original leaf whose parameters and
            buffers of the same names it takes over).
        channels: C, the input width (for probing).
    """

    kind: str
    module: nn.Module
    sources: List[Tuple[str, nn.Module]]
    channels: int


def activation_name(module: Optional[nn.Module]) -> str:
    """Lower-case class name of an activation module ("relu", "sigmoid", ...; Swish -> "silu")."""
    name = type(module).__name__.lower()
    return {"swish": "silu"}.get(name, name)


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


def _check_bias(first: nn.Module, second: nn.Module) -> bool:
    bias = first.bias is not None
    if bias != (second.bias is not None):
        raise Unsupported("only one of the two MLP layers has a bias")
    return bias


def _with_meta(build: Callable[[], nn.Module], original: nn.Module) -> nn.Module:
    with torch.device("meta"):
        module = build()
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
    bias = _check_bias(mlp[1], mlp[3])
    channels, hidden = mlp[1].in_features, mlp[1].out_features
    parts = [("ChannelGate.mlp.1", mlp[1]), ("ChannelGate.mlp.3", mlp[3])]
    spatial = None
    if not m.no_spatial:
        conv_bn = m.SpatialGate.spatial
        if getattr(conv_bn, "relu", None) is not None:
            raise Unsupported("spatial conv block has a ReLU")
        spatial = (_spatial_kernel(conv_bn.conv, conv_bn.bn), conv_bn.bn)
        parts += [("SpatialGate.spatial.conv", conv_bn.conv),
                  ("SpatialGate.spatial.bn", conv_bn.bn)]

    def build() -> CBAM:
        new = CBAM(channels, no_spatial=spatial is None, style="official",
                   hidden_channels=hidden)
        new.ChannelGate = ChannelGate(channels, pool_types=pool_types, style="official",
                                      hidden_channels=hidden, bias=bias, act=act)
        if spatial is not None:
            new.SpatialGate = _spatial_gate(*spatial, "official")
        return new

    return Plan("official CBAM", _with_meta(build, m), parts, channels)


def timm_cbam(m: nn.Module) -> Optional[Plan]:
    """timm's ``CbamModule`` (``channel.fc1/fc2``, ``spatial.conv.conv/bn``)."""
    channel, spatial = getattr(m, "channel", None), getattr(m, "spatial", None)
    if not (hasattr(channel, "fc1") and hasattr(channel, "act") and hasattr(spatial, "conv")):
        return None
    conv_bn = spatial.conv
    if set(conv_bn._modules) != {"conv", "bn"}:
        raise Unsupported(f"spatial conv block is not conv + bn: {conv_bn}")
    k = _spatial_kernel(conv_bn.conv, conv_bn.bn)
    gates = {activation_name(getattr(channel, "gate", None)),
             activation_name(getattr(spatial, "gate", None))}
    if gates != {"sigmoid"}:
        raise Unsupported(f"gates {sorted(gates)} (CBAM gates are sigmoid)")
    fc1, fc2 = _check_pointwise(channel.fc1, "fc1"), _check_pointwise(channel.fc2, "fc2")
    bias, act = _check_bias(fc1, fc2), activation_name(channel.act)
    _check_functions(act, "sigmoid")

    def build() -> CBAM:
        new = CBAM(fc1.in_channels, style="timm")
        new.channel = ChannelGate(fc1.in_channels, style="timm", hidden_channels=fc1.out_channels,
                                  bias=bias, act=act)
        new.spatial = _spatial_gate(k, conv_bn.bn, "timm")
        return new

    parts = [("channel.fc1", fc1), ("channel.fc2", fc2), ("spatial.conv.conv", conv_bn.conv),
             ("spatial.conv.bn", conv_bn.bn)]
    return Plan("timm CbamModule", _with_meta(build, m), parts, fc1.in_channels)


def _se_plan(kind: str, m: nn.Module, fc1: nn.Module, fc2: nn.Module, act: str,
             gate: str) -> Plan:
    channels, hidden = fc1.weight.shape[1], fc1.weight.shape[0]
    bias = _check_bias(fc1, fc2)
    _check_functions(act, gate)
    module = _with_meta(lambda: SE(channels, bias=bias, hidden_channels=hidden, act=act,
                                   gate=gate), m)
    return Plan(kind, module, [("fc1", fc1), ("fc2", fc2)], channels)


def conv_se(m: nn.Module) -> Optional[Plan]:
    """timm's ``SEModule`` (``fc1``, ``bn``, ``act``, ``fc2``, ``gate``) or torchvision's
    ``SqueezeExcitation`` (``avgpool``, ``fc1``, ``fc2``, ``activation``, ``scale_activation``)."""
    if not (isinstance(getattr(m, "fc1", None), nn.Conv2d)
            and isinstance(getattr(m, "fc2", None), nn.Conv2d)):
        return None
    if hasattr(m, "scale_activation"):
        kind, act, gate = "torchvision SqueezeExcitation", m.activation, m.scale_activation
        pool = m.avgpool
        if not (isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))):
            raise Unsupported(f"squeeze is not a global average pool: {pool}")
    elif hasattr(m, "gate") and hasattr(m, "act"):
        kind, act, gate = "timm SEModule", m.act, m.gate
        if type(getattr(m, "bn", nn.Identity())) is not nn.Identity:
            raise Unsupported(f"norm between fc1 and fc2: {m.bn}")
        if getattr(m, "add_maxpool", False):
            raise Unsupported("add_maxpool (avg + max squeeze)")
    else:
        return None
    return _se_plan(kind, m, _check_pointwise(m.fc1, "fc1"), _check_pointwise(m.fc2, "fc2"),
                    activation_name(act), activation_name(gate))


def linear_se(m: nn.Module) -> Optional[Plan]:
    """A plain SE block: ``AdaptiveAvgPool2d(1)`` + ``Sequential(Linear, act, Linear, gate)``."""
    children = list(m.children())
    if not (len(children) == 2 and isinstance(children[0], nn.AdaptiveAvgPool2d)
            and isinstance(children[1], nn.Sequential) and len(children[1]) == 4
            and all(type(children[1][i]) is nn.Linear for i in (0, 2))):
        return None
    pool, (fc1, act, fc2, gate) = children
    if pool.output_size not in (1, (1, 1)):
        raise Unsupported(f"squeeze is not a global average pool: {pool}")
    return _se_plan("SE block (Linear)", m, fc1, fc2, activation_name(act),
                    activation_name(gate))


RECOGNISERS = (official_cbam, timm_cbam, conv_se, linear_se)


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
