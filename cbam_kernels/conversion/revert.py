"""Turning fused modules back into plain PyTorch ones: the inverse of :func:`~cbam_kernels.convert`.

:func:`~cbam_kernels.convert` records, on each fused module it makes, the module it replaced as
a structure without data (its classes and settings, tensors on the meta device), and on each
residual block it fuses the original block; :func:`revert` restores those, holding the fused
modules' own tensors. A fused module that ``convert`` did not make (built directly, or by
:mod:`cbam_kernels.models`) becomes :mod:`cbam_kernels.reference` modules with the same
state_dict keys: ``PlainChannelGate`` for ``SE`` and ``ChannelGate``, ``OfficialSpatialGate`` or
``TimmSpatialAttn`` for ``SpatialGate``, and for ``CBAM`` an ``nn.Sequential`` of those under
the names of its two gates.
"""

import copy
import itertools
from collections import OrderedDict

import torch
from torch import nn

from .. import reference
from .adopt import adopt_tensors
from ..modules.cbam import CBAM, ChannelGate, SpatialGate
from .residual import FusedResidualBlock

ORIGINAL = "_cbam_kernels_original"


def remember(new: nn.Module, original: nn.Module) -> None:
    """Record on ``new``, a module that :func:`~cbam_kernels.convert` made, what :func:`revert`
    turns it back into (kept as a plain attribute: no state_dict keys, untouched by ``.to()``)."""
    new.__dict__[ORIGINAL] = original


def structure(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are empty tensors on the meta
    device (no data is copied)."""
    memo = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (nn.Parameter(meta, tensor.requires_grad)
                            if isinstance(tensor, nn.Parameter) else meta)
    return copy.deepcopy(module, memo)


def revert(model: nn.Module) -> nn.Module:
    """Replace, in place, every fused module of ``model`` by plain PyTorch modules.

    Each ``CBAM``, ``SE``, ``ChannelGate`` and ``SpatialGate`` that
    :func:`~cbam_kernels.convert` made becomes the module it replaced again (the official
    repository's, timm's, torchvision's or the model's own class, with its settings), and each
    residual block it fused its original block; other fused modules become
    :mod:`cbam_kernels.reference` modules. State_dict keys do not change, and the plain modules
    hold the fused modules' very tensors (optimizers stay valid), train/eval modes, devices and
    dtypes, so ``revert(convert(model)[0])`` computes what ``model`` did, and its checkpoints
    load anywhere without this package.

    Returns:
        ``model``, or its replacement if ``model`` itself is a fused module or block.
    """
    if isinstance(model, FusedResidualBlock):
        model = _unfuse(model)
    if isinstance(model, (CBAM, ChannelGate, SpatialGate)):
        return _plain(model)
    for name, child in list(model.named_children()):
        new = revert(child)
        if new is not child:
            setattr(model, name, new)
    return model


def _unfuse(fused: FusedResidualBlock) -> nn.Module:
    """The block ``fused`` was made from, holding ``fused``'s current submodules."""
    block = fused.__dict__.get(ORIGINAL)
    if block is None:
        raise ValueError(f"this FusedResidualBlock (from a {fused.original}) was not made by "
                         "convert(): the class of its original block is unknown")
    block._modules.update(fused._modules)
    block.training = fused.training
    return block


def _plain(fused: nn.Module) -> nn.Module:
    """The plain module computing what ``fused`` does, holding its tensors."""
    original = fused.__dict__.get(ORIGINAL)
    if original is not None:
        target = copy.deepcopy(original)
    else:
        with torch.device("meta"):
            target = _reference(fused)
    return adopt_tensors(target.train(fused.training), fused)


def _reference(fused: nn.Module) -> nn.Module:
    """The :mod:`cbam_kernels.reference` equivalent of ``fused`` (built on the current device)."""
    if isinstance(fused, CBAM):
        return nn.Sequential(OrderedDict((name, _reference(gate))
                                         for name, gate in fused.named_children()))
    if isinstance(fused, SpatialGate):
        if fused.style == "official":
            gate = reference.OfficialSpatialGate(fused.kernel_size)
            bn = gate.spatial.bn
        else:
            gate = reference.TimmSpatialAttn(fused.kernel_size)
            bn = gate.conv.bn
        bn.eps, bn.momentum = fused.block.bn.eps, fused.block.bn.momentum
        return gate
    return reference.PlainChannelGate(
        fused.channels, fused.hidden_channels, fused.pool_types,
        bias=fused.gate_params().b1 is not None, act=fused.act, gate=fused.gate,
        layers=fused.layers, linear=fused.linear)
