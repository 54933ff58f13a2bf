"""Where the model looked: a heat map per case, on the model grid (predict maps it back).

Classification: Grad-CAM (MONAI's `GradCAM`) of the positive class (binary) or of the predicted
class (more classes), at the last activation of the model's convolutional features: the
deepest layer that still has a spatial grid. MONAI upsamples it to the input size and scales it
to [0, 1]. Segmentation: the model's own per-voxel answer already is a map, so its heat map is
the probability that a voxel is foreground (1 - p(background)).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


def target_layer(model: nn.Module) -> str:
    """Name of the last ReLU inside `model.features` (fedvox's CNN and scattering CNN)."""
    names = [n for n, m in model.named_modules() if n.startswith("features.")]
    relus = [n for n in names if isinstance(model.get_submodule(n), nn.ReLU)]
    if not relus:
        raise ValueError(f"{type(model).__name__} has no ReLU in .features for Grad-CAM")
    return relus[-1]


def gradcam(model: nn.Module, image: torch.Tensor, class_index: int) -> torch.Tensor:
    """(C, *size) preprocessed image -> (1, *size) Grad-CAM map in [0, 1]."""
    from monai.visualize import GradCAM

    model.eval()
    # MONAI's default post-processing maps (min, max) to (1, 0), i.e. it FLIPS the map (its
    # docstring says so): keep the raw map and scale it to [0, 1] with the peak at 1 here.
    cam = GradCAM(nn_module=model, target_layers=target_layer(model), postprocessing=_identity)
    with torch.enable_grad():
        heat = cam(image[None].clone().requires_grad_(True), class_idx=class_index)
    heat = heat[0].detach().float()
    low, high = heat.min(), heat.max()
    return (heat - low) / (high - low) if high > low else torch.zeros_like(heat)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def foreground_probability(probs: torch.Tensor) -> torch.Tensor:
    """(K, *size) class probabilities -> (1, *size) P(not background)."""
    return (1.0 - probs[:1]).float()


def overlay_png(path: Path, image_ras: np.ndarray, heat_ras: np.ndarray, title: str) -> None:
    """A 2D scan with its heat map on top, anterior up (RAS arrays, x right, y anterior)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2, 3.2), dpi=100)
    ax = fig.add_axes((0, 0, 1, 0.9))
    ax.imshow(image_ras.T, cmap="gray", origin="lower")
    ax.imshow(heat_ras.T, cmap="jet", alpha=0.4, origin="lower", vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    fig.savefig(path)
