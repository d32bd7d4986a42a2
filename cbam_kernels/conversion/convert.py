"""Replacing the CBAM and SE modules of an existing model by the fused ones, in place."""

import copy
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..ops import backend
from .adopt import adopt_tensors
from .residual import FusedResidualBlock, prove_residual
from ..models.attention import accepts_residual
from ..models.resnet import ResidualBlock
from .recognise import Unsupported, looks_like_attention, recognise
from .revert import remember, structure

PROBE_SHAPE = (2, 5, 5)  # N, H, W of the float64 input each replacement is checked on


@dataclass
class ConversionSummary:
    """What :func:`convert` did.

    Attributes:
        replaced: (qualified module name, "original kind -> replacement") per replaced module.
        skipped: (qualified module name, reason) per attention module left in place: CBAM/SE
            modules the fused ones cannot reproduce, and modules whose class name says
            attention but whose structure is none that convert knows.
        fused: qualified names of residual blocks whose attention + add + ReLU now run fused.
    """

    replaced: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    fused: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.replaced)} attention modules, fused {len(self.fused)} "
                 f"residual epilogues, left {len(self.skipped)} in place"]
        lines += [f"  replaced {name or '(model)'}: {what}" for name, what in self.replaced]
        lines += [f"  fused    {name or '(model)'}" for name in self.fused]
        lines += [f"  skipped  {name or '(model)'}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def convert(model: nn.Module, *, fuse_epilogue: bool = True,
            verify: bool = True) -> Tuple[nn.Module, ConversionSummary]:
    """Replace, in place, every CBAM/SE module of ``model`` by its fused equivalent.

    Recognised by structure (see :mod:`cbam_kernels.conversion.recognise`): the official repository's
    ``CBAM``; timm's ``CbamModule``, ``ChannelAttn``, ``SpatialAttn``, ``SEModule`` (also in
    RegNet, NFNet, ...), the EfficientNet / MobileNetV3 ``SqueezeExcite`` and the legacy SENet
    ``SEModule``; torchvision's ``SqueezeExcitation``; and a plain SE block
    ``AdaptiveAvgPool2d`` + ``Sequential(Linear or 1x1 conv, act, same, gate)`` (senet.pytorch's
    ``SELayer``). Activations ReLU or SiLU, gates sigmoid or hard sigmoid (timm's and PyTorch's
    variants). The replacement holds its parameters and buffers under the original's names (so
    checkpoints load before and after, ``strict=True``), takes over the original's very tensors
    (optimizers and tied weights stay valid), and keeps its train/eval mode, device, dtype and
    memory format. Modules it cannot reproduce exactly (another activation, gate or pool type,
    a norm inside the MLP, timm's ``EffectiveSEModule``), and modules whose class name says
    attention but whose structure it does not know (ECA, gather-excite, ...), are left in place
    and listed with the reason. :func:`~cbam_kernels.revert` undoes the conversion.

    Args:
        model: changed in place.
        fuse_epilogue: also rebuild every residual block whose forward is provably
            ``relu(attention(main(x)) + shortcut(x))`` (see :mod:`cbam_kernels.conversion.residual`) so that
            attention, add and ReLU run as one fused pass.
        verify: check each replacement against the original on a small float64 probe input, in
            training and in eval mode (on CPU copies, through the PyTorch backend whatever
            ``CBAM_KERNELS_BACKEND`` says), and leave the original in place if they differ (not
            possible, so not done, for modules on the meta device).

    Returns:
        (model, summary): ``model`` is the same object unless the model itself is a CBAM/SE
        module or a fusable block, in which case it is the replacement.
    """
    summary = ConversionSummary()
    model = _convert_tree(model, "", summary, verify)
    if fuse_epilogue:
        parents = dict.fromkeys(name.rpartition(".")[0] for name, _ in summary.replaced if name)
        for name in parents:
            model = _fuse(model, name, summary)
    return model, summary


def _convert_tree(module: nn.Module, name: str, summary: ConversionSummary,
                  verify: bool) -> nn.Module:
    """``module`` with its CBAM/SE modules replaced (itself, if it is one, or its descendants)."""
    if accepts_residual(module):  # already fused
        return module
    try:
        plan = recognise(module)
    except Unsupported as reason:
        summary.skipped.append((name, str(reason)))
        return module
    if plan is None:
        listed = len(summary.replaced) + len(summary.skipped)
        for child_name, child in list(module.named_children()):
            new = _convert_tree(child, f"{name}.{child_name}" if name else child_name, summary,
                                verify)
            if new is not child:
                setattr(module, child_name, new)
        if looks_like_attention(module) and len(summary.replaced) + len(summary.skipped) == listed:
            summary.skipped.append((name, f"{type(module).__name__} looks like attention but is "
                                          "none of the CBAM/SE structures convert knows"))
        return module
    new = adopt_tensors(plan.module, module)
    mismatch = _probe(module, new, plan.channels) if verify else None
    if mismatch:
        summary.skipped.append((name, f"{plan.kind}: {mismatch}"))
        return module
    remember(new, structure(module))
    summary.replaced.append((name, f"{plan.kind} -> {type(new).__name__}"
                                   f"({new.extra_repr()})"))
    return new


def _probe(original: nn.Module, new: nn.Module, channels: int) -> Optional[str]:
    """None if ``new`` computes what ``original`` does on a float64 probe, else a description.

    A module on the meta device has no values to compare and passes.
    """
    if any(t.is_meta for t in (*original.parameters(), *original.buffers())):
        return None
    x = torch.randn(PROBE_SHAPE[0], channels, *PROBE_SHAPE[1:], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    tolerance = 1e4 * torch.finfo(torch.float64).eps
    for training in (True, False):
        a, b = (copy.deepcopy(m).to("cpu", torch.float64).train(training)
                for m in (original, new))
        try:  # on the torch backend: a forced kernel backend takes no float64 CPU tensors
            with torch.no_grad(), backend.forced("torch"):
                error = (a(x) - b(x)).abs().max().item()
        except Exception as err:  # noqa: BLE001 - a module that fails on the probe stays
            return f"fails on a {tuple(x.shape)} probe input ({type(err).__name__}: {err})"
        if not error <= tolerance:
            mode = "training" if training else "eval"
            return f"outputs differ from the fused module's in {mode} mode (max |diff| {error:.3g})"
    return None


def _fuse(model: nn.Module, name: str, summary: ConversionSummary) -> nn.Module:
    """``model`` with the block ``name`` rebuilt as a FusedResidualBlock, if provable."""
    block = model.get_submodule(name)
    if isinstance(block, ResidualBlock):  # this package's blocks fuse by themselves
        if block.placement == "before_add":
            summary.fused.append(name)
        return model
    recipe = prove_residual(block)
    if recipe is None:
        return model
    fused = FusedResidualBlock(block, recipe)
    remember(fused, block)
    summary.fused.append(name)
    if not name:
        return fused
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, fused)
    return model
