"""Replacing the CBAM and SE modules of an existing model by the fused ones, in place."""

import copy
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import nn

from .epilogue import FusedResidualBlock, prove_residual
from .models.attention import accepts_residual
from .models.resnet import ResidualBlock
from .recognise import Plan, Unsupported, recognise

PROBE_SHAPE = (2, 5, 5)  # N, H, W of the float64 input each replacement is checked on


@dataclass
class ConversionSummary:
    """What :func:`convert` did.

    Attributes:
        replaced: (qualified module name, "original kind -> replacement") per replaced module.
        skipped: (qualified module name, reason) per CBAM/SE module left in place.
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

    Recognised by structure (see :mod:`cbam_kernels.recognise`): the official repository's
    ``CBAM``, timm's ``CbamModule`` and ``SEModule``, torchvision's ``SqueezeExcitation`` and a
    plain ``AdaptiveAvgPool2d`` + ``Sequential(Linear, ReLU, Linear, Sigmoid)`` SE block. The
    replacement takes over the original's parameter and buffer tensors (the same objects where
    the shapes agree, so optimizers and tied weights stay valid; a Linear weight becomes a new
    1x1-conv parameter), and keeps its train/eval mode, device, dtype and memory format; state_dict
    keys stay the same except for the Linear SE block (``fc.0`` / ``fc.2`` -> ``fc1`` / ``fc2``).
    Modules it cannot reproduce exactly (another activation, gate or pool type, a norm inside
    the MLP) are left in place and listed with the reason.

    Args:
        model: changed in place.
        fuse_epilogue: also rebuild every residual block whose forward is provably
            ``relu(attention(main(x)) + shortcut(x))`` (see :mod:`cbam_kernels.epilogue`) so that
            attention, add and ReLU run as one fused pass.
        verify: check each replacement against the original on a small float64 probe input, in
            training and in eval mode (on CPU copies), and leave the original in place if they
            differ (not possible, so not done, for modules on the meta device).

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
    if accepts_residual(module):
        return module
    try:
        plan = recognise(module)
    except Unsupported as reason:
        summary.skipped.append((name, str(reason)))
        return module
    if plan is None:
        for child_name, child in list(module.named_children()):
            new = _convert_tree(child, f"{name}.{child_name}" if name else child_name, summary,
                                verify)
            if new is not child:
                setattr(module, child_name, new)
        return module
    new = _adopt(plan)
    mismatch = _probe(module, new, plan.channels) if verify else None
    if mismatch:
        summary.skipped.append((name, f"{plan.kind}: {mismatch}"))
        return module
    summary.replaced.append((name, f"{plan.kind} -> {type(new).__name__}"
                                   f"({new.extra_repr()})"))
    return new


def _adopt(plan: Plan) -> nn.Module:
    """The plan's module with every parameter and buffer taken over from the original leaves."""
    new = plan.module
    missing = {n for n, _ in (*new.named_parameters(), *new.named_buffers())}
    for qualname, source in plan.sources:
        target = new.get_submodule(qualname)
        target.training = source.training
        for slot, register in ((target._parameters, target.register_parameter),
                               (target._buffers, target.register_buffer)):
            for attr, placeholder in list(slot.items()):
                original = getattr(source, attr)
                if placeholder is None or original is None:
                    assert placeholder is None and original is None, f"{qualname}.{attr}"
                    continue
                tensor = original
                if original.shape != placeholder.shape:
                    tensor = original.detach().reshape(placeholder.shape).clone()
                    if isinstance(placeholder, nn.Parameter):
                        tensor = nn.Parameter(tensor, requires_grad=original.requires_grad)
                register(attr, tensor)
                missing.discard(f"{qualname}.{attr}")
    assert not missing, f"no source for {sorted(missing)}"
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
        with torch.no_grad():
            error = (a(x) - b(x)).abs().max().item()
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
    summary.fused.append(name)
    if not name:
        return fused
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, fused)
    return model
