"""Pictures of spatial attention: each stage's map overlaid on the input image (matplotlib)."""

import os
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention_maps import capture_attention


def plot_spatial_maps(model: nn.Module, image: Tensor, path: Union[str, os.PathLike], *,
                      x: Optional[Tensor] = None, alpha: float = 0.5,
                      title: Optional[str] = None) -> Dict[str, Tensor]:
    """Run ``model`` on one image and save, as a PNG at ``path``, the image followed by the
    spatial attention map of each stage overlaid on it.

    A stage is the first component of a module's qualified name (``layer2`` for
    ``layer2.1.cbam``); its map is that of the last module of the stage that ran with a spatial
    gate (see :func:`~cbam_kernels.attention_maps.capture_attention`). Each map is upsampled
    (bilinear) to the image size and shown on a colour scale stretched from its own minimum to
    its maximum, which the panel's title gives.

    Args:
        model: any model with CBAM modules (fused or eager), run as it is (call ``.eval()``
            first for inference maps) under ``torch.no_grad``.
        image: (3, H, W) RGB in [0, 1], as shown.
        path: where the PNG goes.
        x: the model input (1, 3, H, W); default ``image[None]`` (pass the normalised image when
            the model expects one).
        alpha: opacity of the maps.
        title: a title above the panels.

    Returns:
        stage name -> its map (h, w) for the image, at the map's own resolution.

    Needs matplotlib (``pip install "cbam_kernels[plot]"``).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plot_spatial_maps needs matplotlib: pip install matplotlib (or "
                          "the plot extra, pip install \"cbam_kernels[plot]\")") from None
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) RGB in [0, 1], got shape {tuple(image.shape)}")
    x = image[None] if x is None else x
    with torch.no_grad(), capture_attention(model) as maps:
        model(x)
    stages = {name.split(".")[0]: m.spatial[0] for name, m in maps.items()
              if m.spatial is not None}
    if not stages:
        raise ValueError(f"{type(model).__name__} ran no attention module with a spatial gate")
    height, width = image.shape[1:]
    fig = Figure(figsize=(2.6 * (len(stages) + 1), 2.9 if title else 2.6))
    axes = fig.subplots(1, len(stages) + 1)
    shown = image.detach().float().permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    axes[0].imshow(shown)
    axes[0].set_title("input", fontsize=9)
    for ax, (stage, sa) in zip(axes[1:], stages.items()):
        sa = sa.float().cpu()
        up = F.interpolate(sa[None, None], size=(height, width), mode="bilinear",
                           align_corners=False)[0, 0]
        ax.imshow(shown)
        ax.imshow(up.numpy(), cmap="jet", alpha=alpha, vmin=sa.min().item(),
                  vmax=sa.max().item())
        ax.set_title(f"{stage} {sa.shape[0]}x{sa.shape[1]}\n"
                     f"sa {sa.min().item():.2f} to {sa.max().item():.2f}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    return {stage: sa.detach() for stage, sa in stages.items()}
