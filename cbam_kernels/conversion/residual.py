"""Proving that a residual block ends in ``relu(attention(main(x)) + shortcut(x))`` and fusing it.

:func:`prove_residual` traces a block with ``torch.fx``, treating every submodule as opaque, and
accepts exactly this dataflow: one input ``x``; a chain of submodule calls from ``x`` to a fused
attention module; a shortcut that is ``x`` or one submodule call on ``x``; their sum; a ReLU; the
output. Anything else (another op, a drop-path after the attention, a second output, a scaled
sum) and the block keeps its own forward. A proven block is rebuilt as a
:class:`FusedResidualBlock` that calls ``attention(out, residual=identity)``: attention, residual
add and ReLU in one pass.
"""

import operator
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..models.attention import accepts_residual
from .recognise import has_hooks

ADDS = {("call_function", operator.add), ("call_function", operator.iadd),
        ("call_function", torch.add), ("call_method", "add"), ("call_method", "add_")}
RELUS = {("call_function", torch.relu), ("call_function", torch.relu_),
         ("call_function", F.relu), ("call_method", "relu"), ("call_method", "relu_")}  # + nn.ReLU


class Recipe(NamedTuple):
    """A proven residual block: submodule names of the main path (in order), of the attention,
    and of the shortcut (None for the identity)."""

    main: tuple
    attention: str
    shortcut: Optional[str]


class _ChildrenAsLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _module_input(node: fx.Node) -> Optional[fx.Node]:
    """The input of ``node`` if it is a submodule call on one positional argument, else None."""
    if (node.op == "call_module" and len(node.args) == 1 and isinstance(node.args[0], fx.Node)
            and not node.kwargs):
        return node.args[0]
    return None


def _relu_input(node: fx.Node, block: nn.Module) -> Optional[fx.Node]:
    """The input of ``node`` if it is a plain ReLU (module, function or method), else None."""
    if node.op == "call_module":
        return _module_input(node) if type(block.get_submodule(node.target)) is nn.ReLU else None
    if ((node.op, node.target) in RELUS and len(node.args) == 1
            and isinstance(node.args[0], fx.Node) and set(node.kwargs) <= {"inplace"}):
        return node.args[0]
    return None


def _add_inputs(node: fx.Node) -> Optional[tuple]:
    """The two inputs of ``node`` if it is an unscaled sum of two tensors, else None."""
    if ((node.op, node.target) in ADDS and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args)):
        return node.args
    return None


def _is_fused_attention(node: fx.Node, block: nn.Module) -> bool:
    return (_module_input(node) is not None
            and accepts_residual(block.get_submodule(node.target)))


def prove_residual(block: nn.Module) -> Optional[Recipe]:
    """The block's :class:`Recipe` if its forward is provably
    ``relu(attention(main(x)) + shortcut(x))`` with a fused attention module, else None."""
    if block._parameters or block._buffers or has_hooks(block, recurse=False):
        return None
    try:
        graph = _ChildrenAsLeaves().trace(block)
    except Exception:  # noqa: BLE001 - untraceable forwards are simply not fused
        return None
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    output = nodes[-1]
    if len(inputs) != 1 or output.op != "output" or not isinstance(output.args[0], fx.Node):
        return None
    x, relu = inputs[0], output.args[0]
    add = _relu_input(relu, block)
    pair = _add_inputs(add) if add is not None else None
    if pair is None:
        return None
    attention, shortcut = pair if _is_fused_attention(pair[0], block) else pair[::-1]
    if not (_is_fused_attention(attention, block) and (shortcut is x
                                                       or _module_input(shortcut) is x)):
        return None
    main, node = [], _module_input(attention)
    while node is not x:
        if _module_input(node) is None:
            return None
        main.append(node)
        node = _module_input(node)
    inner = [*main, attention, add] + ([] if shortcut is x else [shortcut])
    if (set(nodes) != {x, output, relu, *inner} or any(len(n.users) != 1 for n in inner)
            or any(has_hooks(block.get_submodule(n.target), recurse=False)
                   for n in (relu, attention) if n.op == "call_module")):
        return None
    return Recipe(tuple(n.target for n in reversed(main)), attention.target,
                  None if shortcut is x else shortcut.target)


class FusedResidualBlock(nn.Module):
    """A proven residual block (see :func:`prove_residual`) with its epilogue fused.

    Holds the original block's submodules under their own names (state_dict keys unchanged) and
    its other public attributes, and computes
    ``attention(main(x), residual=shortcut(x))`` = ``relu(attention(main(x)) + shortcut(x))``.
    """

    def __init__(self, block: nn.Module, recipe: Recipe):
        super().__init__()
        for name, child in block._modules.items():
            self.add_module(name, child)
        for name, value in vars(block).items():
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        self.training = block.training
        self.recipe = recipe
        self.original = type(block).__qualname__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x -> relu(attention(main(x)) + shortcut(x)), the last three in one fused pass."""
        out = x
        for name in self.recipe.main:
            out = self.get_submodule(name)(out)
        identity = x if self.recipe.shortcut is None else self.get_submodule(
            self.recipe.shortcut)(x)
        return self.get_submodule(self.recipe.attention)(out, residual=identity)

    def extra_repr(self) -> str:
        return f"fused from {self.original}: {' -> '.join(self.recipe.main)} -> " \
               f"{self.recipe.attention} (+ {self.recipe.shortcut or 'identity'}, relu)"
