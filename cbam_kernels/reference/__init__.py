"""Pure-PyTorch reference modules: the oracle for the fused kernels and the eager baseline.

Everything here is plain eager PyTorch with no custom ops, written to reproduce the public
parameterisations of CBAM and Squeeze-and-Excitation (see ``docs/design.md``, "Parameterisations"):

* :class:`OfficialCBAM` follows the authors' repository (Jongchan/attention-module,
  ``MODELS/cbam.py``): ``Linear`` MLP with bias, hidden width ``C // r``, spatial map
  concatenated as ``[max, mean]``, BatchNorm ``eps=1e-5, momentum=0.01``. Module structure and
  attribute names match, so its ``state_dict`` loads checkpoints from that repository.
* :class:`TimmCBAM` follows timm's ``CbamModule`` (``timm/layers/cbam.py``): bias-free 1x1-conv
  MLP, hidden width ``max(1, int(C * rd_ratio + 0.5))``, spatial map ``[mean, max]``, BatchNorm
  ``eps=1e-5, momentum=0.1``. Its ``state_dict`` is key-for-key identical to timm's.
* :class:`SEModule` follows timm's ``SEModule`` / torchvision's ``SqueezeExcitation`` (1x1 convs
  ``fc1``/``fc2``); :class:`SEBlock` is the classic Hu et al. block with bias-free ``Linear``
  layers.

All arithmetic happens in the input dtype, exactly as the original modules do (parameters must be
in that dtype too, as usual for eager modules). That includes a known property of eager PyTorch:
in float16 the global average pool is a reduction over ``H * W`` values whose sum can exceed the
float16 range (pytorch/pytorch#43992), so fp16 results of this oracle may be ``inf``/``nan``
where a kernel that accumulates in float32 is finite. Compare fused kernels against this module
run in float32/float64 when that matters.
"""

from .official import (POOL_TYPES, BasicConv, ChannelPool, Flatten, OfficialCBAM,
                       OfficialChannelGate, OfficialSpatialGate, logsumexp_2d)
from .se import PlainChannelGate, SEBlock, SEModule
from .timm_style import TimmCBAM, TimmChannelAttn, TimmConvBn, TimmSpatialAttn, timm_rd_channels

__all__ = [
    "Flatten",
    "BasicConv",
    "ChannelPool",
    "logsumexp_2d",
    "OfficialChannelGate",
    "OfficialSpatialGate",
    "OfficialCBAM",
    "timm_rd_channels",
    "TimmConvBn",
    "TimmChannelAttn",
    "TimmSpatialAttn",
    "TimmCBAM",
    "SEModule",
    "SEBlock",
    "PlainChannelGate",
    "POOL_TYPES",
]
