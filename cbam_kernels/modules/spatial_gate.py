"""CBAM's spatial gate: y = x * sigmoid(BN(conv_kxk([max_c(x), mean_c(x)])))."""

from typing import Optional

import torch
from torch import Tensor, nn

from .channel_gate import check_style
from ..ops.types import BatchNormState, GateConfig, GateParams
from ..ops.gate import attention_gate, check_residual
from .checks import check_input, refuse_scripting

BN_MOMENTUM = {"official": 0.01, "timm": 0.1}


class ConvBN(nn.Module):
    """conv k x k (2 -> 1, 'same' padding, no bias) followed by BatchNorm2d(1).

    Holds the spatial gate's parameters under the keys ``conv.weight`` and ``bn.*``.
    """

    def __init__(self, kernel_size: int, momentum: float):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=momentum)

    def forward(self, p: Tensor) -> Tensor:
        """(N, 2, H, W) pooled map -> (N, 1, H, W) normalised logits."""
        return self.bn(self.conv(p))


class SpatialGate(nn.Module):
    """Spatial attention of CBAM (Woo et al., 2018), fused forward and backward.

    Args:
        kernel_size: k, odd (7 or 3 in the paper).
        style: "official" -- map order [max, mean], BatchNorm momentum 0.01, keys
            ``spatial.conv.weight``, ``spatial.bn.*``; "timm" -- map order [mean, max], momentum
            0.1, keys ``conv.conv.weight``, ``conv.bn.*``.

    The BatchNorm is a real ``nn.BatchNorm2d`` submodule: training mode normalises with batch
    statistics and updates ``running_mean``/``running_var``/``num_batches_tracked`` as
    ``nn.BatchNorm2d`` does; eval mode uses the running statistics. After
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` (or with any other norm) the gate's small part
    runs eagerly in training so the norm's own statistics logic applies.
    """

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, kernel_size: int = 7, style: str = "official"):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.style = check_style(style)
        self.kernel_size = kernel_size
        block = ConvBN(kernel_size, BN_MOMENTUM[style])
        if style == "official":
            self.spatial = block
        else:
            self.conv = block

    @property
    def block(self) -> ConvBN:
        """The conv + BatchNorm submodule (``spatial`` or ``conv`` depending on the style)."""
        return self._modules["spatial" if self.style == "official" else "conv"]

    @property
    def max_first(self) -> bool:
        """Whether the pooled map is ordered [max, mean] (official) rather than [mean, max]."""
        return self.style == "official"

    def fusable(self) -> bool:
        """True when the fused op can reproduce the norm exactly (a plain BatchNorm2d, or any
        BatchNorm in eval mode)."""
        bn = self.block.bn
        return type(bn) is nn.BatchNorm2d or (
            isinstance(bn, nn.modules.batchnorm._BatchNorm) and not bn.training
            and bn.running_mean is not None)

    def gate_params(self) -> GateParams:
        """The conv weight and BatchNorm affine terms as
        :class:`~cbam_kernels.ops.torch.small_math.GateParams`."""
        conv, bn = (self.block._modules[k]._parameters for k in ("conv", "bn"))
        return GateParams(conv_w=conv["weight"], bn_w=bn["weight"], bn_b=bn["bias"])

    def bn_state(self, x: Tensor) -> BatchNormState:
        """This gate's BatchNorm for input ``x``: batch statistics (and their running update)
        in training or without running statistics, else the running ones."""
        bn = self.block._modules["bn"]
        buffers = bn._buffers
        batch_stats = bn.training or buffers["running_mean"] is None
        if batch_stats and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            raise ValueError("Expected more than 1 value per channel when training the spatial "
                             f"gate's BatchNorm, got input size {tuple(x.shape)}")
        tracked = bn.training and bn.track_running_stats
        return BatchNormState(buffers["running_mean"], buffers["running_var"],
                              buffers["num_batches_tracked"] if tracked else None, bn.eps,
                              bn.momentum, batch_stats)

    def forward_eager(self, x: Tensor) -> Tensor:
        """Unfused spatial gate through the submodules themselves (for norms it cannot fuse)."""
        pair = (x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True))
        p = torch.cat(pair if self.max_first else pair[::-1], dim=1)
        return x * torch.sigmoid(self.block(p))

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """x (N, C, H, W) -> x * spatial attention, same dtype and memory format.

        With ``residual``: relu(gated x + residual), the ResNet block epilogue, in the same pass.
        """
        check_input(x, None, self, self.block.conv.weight)
        if not self.fusable():
            if residual is not None:
                check_residual(x, residual)
            y = self.forward_eager(x)
            return y if residual is None else torch.relu(y + residual)
        return attention_gate(x, residual, self.gate_params(),
                               GateConfig(max_first=self.max_first), self.bn_state(x))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, style={self.style!r}"
