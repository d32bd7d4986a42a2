"""Handing the parameters and buffers of one module tree to another that names them the same."""

from typing import Dict

from torch import Tensor, nn


def _tensors(module: nn.Module) -> Dict[str, Tensor]:
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def adopt_tensors(target: nn.Module, source: nn.Module) -> nn.Module:
    """``target``, holding ``source``'s parameters and buffers -- the very tensor objects, so
    that optimizers and tied weights stay valid -- and the train/eval mode of ``source``'s
    submodules of the same names. The two must hold parameters and buffers under the same names
    and shapes (ValueError otherwise); ``target``'s own tensors (on the meta device, typically)
    are dropped."""
    ours, theirs = _tensors(target), _tensors(source)
    if set(ours) != set(theirs):
        raise ValueError(f"{type(target).__name__} and {type(source).__name__} hold different "
                         f"tensors: only in the first {sorted(set(ours) - set(theirs))}, only "
                         f"in the second {sorted(set(theirs) - set(ours))}")
    modules = dict(source.named_modules(remove_duplicate=False))
    for name, module in target.named_modules(remove_duplicate=False):
        if name in modules:
            module.training = modules[name].training
        prefix = f"{name}." if name else ""
        for slot, parameters in ((module._parameters, True), (module._buffers, False)):
            for attr, placeholder in slot.items():
                if placeholder is None:
                    continue
                tensor = theirs[prefix + attr]
                if (tensor.shape != placeholder.shape
                        or isinstance(tensor, nn.Parameter) != parameters):
                    raise ValueError(f"{prefix + attr}: {type(tensor).__name__} of shape "
                                     f"{tuple(tensor.shape)} cannot stand for a "
                                     f"{type(placeholder).__name__} of shape "
                                     f"{tuple(placeholder.shape)}")
                slot[attr] = tensor
    return target
