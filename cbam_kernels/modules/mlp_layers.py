"""The two layers of a channel MLP, held under the names a checkpoint keeps them.

A name is an attribute (``fc1``, ``conv_reduce``) or an index into an ``nn.Sequential``
attribute (``fc.0``, ``mlp.1``); indexed layers share one Sequential, whose other entries hold
no parameters: ``nn.Flatten`` (``nn.Identity`` for 1x1 convs) before the first layer, the
hidden activation between the two. Only the two layers' names reach the state_dict.
"""

from typing import Sequence, Tuple

from torch import nn

Path = Tuple[str, ...]
ACTIVATION_MODULES = {"relu": nn.ReLU, "silu": nn.SiLU}


def layer_paths(names: Sequence[str]) -> Tuple[Path, Path]:
    """``names`` split at their dots, or ValueError unless they are two distinct attributes or
    two increasing indices into the same Sequential."""
    paths = tuple(tuple(name.split(".")) for name in names)
    attributes = (len(paths) == 2 and all(len(p) == 1 and p[0] for p in paths)
                  and paths[0] != paths[1])
    indexed = (len(paths) == 2 and all(len(p) == 2 and p[0] and p[1].isdigit() for p in paths)
               and paths[0][0] == paths[1][0] and int(paths[0][1]) < int(paths[1][1]))
    if not (attributes or indexed):
        raise ValueError(f"layers must name the MLP's two layers as two attributes ('fc1', "
                         f"'fc2') or two increasing indices into one Sequential ('fc.0', "
                         f"'fc.2'), got {tuple(names)!r}")
    return paths


def add_layers(module: nn.Module, paths: Tuple[Path, Path], first: nn.Module,
               second: nn.Module, act: str) -> None:
    """Register ``first`` and ``second`` on ``module`` under ``paths`` (see :func:`layer_paths`;
    ``act`` names the activation module that fills a Sequential between them)."""
    if len(paths[0]) == 1:
        module.add_module(paths[0][0], first)
        module.add_module(paths[1][0], second)
        return
    i, j = int(paths[0][1]), int(paths[1][1])
    before = nn.Flatten if isinstance(first, nn.Linear) else nn.Identity
    entries = [before() if k < i else ACTIVATION_MODULES[act]() for k in range(j + 1)]
    entries[i], entries[j] = first, second
    module.add_module(paths[0][0], nn.Sequential(*entries))

