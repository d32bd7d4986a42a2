"""Fine-tuning helpers: learning rates per part of a model, and staged unfreezing.

A model's parameters fall into three disjoint parts:

* ``attention``: every attention module -- this package's, the reference ones, and any CBAM/SE
  module :func:`cbam_kernels.convert` recognises (timm, torchvision, the official repository);
* ``head``: the classifier, by default the last top-level child with parameters (``fc`` of a
  ResNet, ``classifier`` of a VGG, EfficientNet or MobileNet), or the modules named by ``head``;
* ``backbone``: everything else.

Typical use, with new attention modules in a pretrained network::

    unfreeze(model, "head")                       # epochs 0..a: train the classifier only
    unfreeze(model, "attention", last_stages=1)   # a..b: + attention + the last backbone stage
    unfreeze(model, "all")                        # b..: everything
    optimizer = torch.optim.SGD(param_groups(model, lr=1e-3, attention_lr=1e-2, head_lr=1e-2))

The optimizer may hold every parameter from the start: frozen ones get no gradient and are left
alone. BatchNorm layers in frozen parts still update their running statistics in training mode;
put them in eval mode as well to freeze those.
"""

from typing import Dict, List, Optional, Sequence, Union

from torch import nn

from .models.vgg import AttendThenPool
from .conversion.recognise import is_attention

PARTS = ("backbone", "attention", "head")
STAGES = ("head", "attention", "all")
POOLS = (nn.MaxPool2d, nn.AvgPool2d, AttendThenPool)

Names = Optional[Union[str, Sequence[str]]]


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or not p for p in prefixes)


def attention_module_names(model: nn.Module) -> List[str]:
    """Qualified names of the outermost attention modules of ``model``."""
    found: List[str] = []
    for name, module in model.named_modules():
        if not _under(name, found) and is_attention(module):
            found.append(name)
    return found


def head_names(model: nn.Module, head: Names = None) -> List[str]:
    """Qualified names of the head modules: ``head`` checked, or the last top-level child with
    parameters that is not an attention module."""
    if head is not None:
        names = [head] if isinstance(head, str) else list(head)
        for name in names:
            try:
                model.get_submodule(name)
            except AttributeError as error:
                raise ValueError(f"head {name!r} is not a submodule of the model") from error
        return names
    candidates = [name for name, child in model.named_children()
                  if _has_parameters(child) and not is_attention(child)]
    if not candidates:
        raise ValueError("the model has no top-level child with parameters to use as head; "
                         "pass head=...")
    return candidates[-1:]


def split_parameters(model: nn.Module, head: Names = None) -> Dict[str, List[nn.Parameter]]:
    """Every parameter of ``model`` exactly once, by part: {"backbone", "attention", "head"}."""
    attention, heads = attention_module_names(model), head_names(model, head)
    parts: Dict[str, List[nn.Parameter]] = {part: [] for part in PARTS}
    for name, p in model.named_parameters():
        part = ("attention" if _under(name, attention) else "head" if _under(name, heads)
                else "backbone")
        parts[part].append(p)
    return parts


def param_groups(model: nn.Module, lr: float, *, attention_lr: Optional[float] = None,
                 head_lr: Optional[float] = None, head: Names = None) -> List[dict]:
    """Optimizer parameter groups for the backbone (``lr``), the attention modules
    (``attention_lr``, default ``lr``) and the head (``head_lr``, default ``lr``).

    Each group is ``{"name": part, "params": [...], "lr": ...}``; empty parts are left out.
    Together the groups hold every parameter of the model exactly once.
    """
    rates = {"backbone": lr, "attention": attention_lr if attention_lr is not None else lr,
             "head": head_lr if head_lr is not None else lr}
    return [{"name": part, "params": params, "lr": rates[part]}
            for part, params in split_parameters(model, head).items() if params]


def backbone_stages(model: nn.Module, head: Names = None) -> List[List[str]]:
    """Module names of each backbone stage, first to last.

    The stages are the top-level children with parameters other than the head and attention
    modules (``conv1``, ``bn1``, ``layer1``..``layer4`` of a ResNet); when that is a single
    Sequential (``features`` of a VGG, EfficientNet or MobileNet), its children, grouped into
    conv blocks ending at each pooling layer when it has any (VGG).
    """
    skip = head_names(model, head) + attention_module_names(model)
    children = [(name, child) for name, child in model.named_children()
                if not _under(name, skip) and _has_parameters(child)]
    if len(children) == 1 and isinstance(children[0][1], (nn.Sequential, nn.ModuleList)):
        prefix, sequence = children[0]
        children = [(f"{prefix}.{name}", child) for name, child in sequence.named_children()]
        if any(isinstance(child, POOLS) for _, child in children):
            stages, current = [], []
            for name, child in children:
                current.append(name)
                if isinstance(child, POOLS):
                    stages.append(current)
                    current = []
            return stages + ([current] if current else [])
        children = [(n, c) for n, c in children if _has_parameters(c)]
    return [[name] for name, _ in children]


def unfreeze(model: nn.Module, stage: str, last_stages: int = 1, head: Names = None) -> List[str]:
    """Set ``requires_grad`` for one stage of staged fine-tuning; returns the trainable names.

    ``stage``: "head" -- only the head trains; "attention" -- the head, every attention module and
    the last ``last_stages`` backbone stages (see :func:`backbone_stages`); "all" -- everything.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if last_stages < 0:
        raise ValueError(f"last_stages must be >= 0, got {last_stages}")
    trainable = head_names(model, head)
    if stage == "attention":
        stages = backbone_stages(model, head)
        trainable += attention_module_names(model)
        last = stages[max(0, len(stages) - last_stages):]
        trainable += [name for group in last for name in group]
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(stage == "all" or _under(name, trainable))
        if p.requires_grad:
            names.append(name)
    return names
