"""Glue shared by every module: the input check and the refusal of TorchScript scripting.

The modules (``ChannelGate``, ``SpatialGate``, ``SE``, ``CBAM``) call the fused gate
(``ops.gate.attention_gate``) with plain tensors and tuples -- their
:class:`~cbam_kernels.ops.torch.small_math.GateParams`, :class:`GateConfig` and the
:class:`BatchNormState` of their own BatchNorm; the checks here are cheap and walk no module
tree.
"""

from typing import Optional

from torch import Tensor



def check_input(x: Tensor, channels: Optional[int], module: object, param: Tensor) -> None:
    """Raise a clear error, naming ``module``'s class, for an input the fused gates cannot take
    (``param``: one of the module's parameters, whose device x must share)."""
    if (isinstance(x, Tensor) and x.dim() == 4 and x.is_floating_point()
            and (channels is None or x.shape[1] == channels) and param.device == x.device):
        return
    name = type(module).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point input, got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} was built for {channels} channels, got an input with "
                         f"{x.shape[1]} channels (shape {tuple(x.shape)})")
    if param.device != x.device:
        raise RuntimeError(f"{name}: input is on {x.device} but parameters are on "
                           f"{param.device}; move the module with .to({str(x.device)!r})")


def refuse_scripting(module: object) -> None:
    """The fused modules' ``__prepare_scriptable__``: ``torch.jit.script`` cannot compile a
    call into the fused kernels, so say what to use instead."""
    raise RuntimeError(
        f"torch.jit.script cannot compile {type(module).__name__} (a fused cbam_kernels "
        "module) and is deprecated: use torch.compile(model) for speed, torch.export.export "
        "or torch.onnx.export to deploy")
