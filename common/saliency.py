"""Where the model looked: a heat map per case, on the model grid (predict maps it back).

Classification: Grad-CAM (MONAI's `GradCAM`) of the positive class (binary) or of the predicted
class (more classes), at the last activation of the model's convolutional features: the
deepest layer that still has a spatial grid. MONAI upsamples it to the input size and scales it
to [0, 1]. A model without such a layer (filterbank-3d: fixed whole-volume statistics and a
linear head) gets MONAI's `OcclusionSensitivity` instead: how much the class probability drops
when each 8-voxel block is replaced by the image mean (a few seconds a 32^3 volume).
Segmentation: the model's own per-voxel answer already is a map, so its heat map is the
probability that a voxel is foreground (1 - p(background)).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.model_registry import GRAD_CAM, OCCLUSION


def target_layer(model: nn.Module) -> str:
    """Name of the last ReLU inside `model.features` (fedvox's CNN and scattering CNN)."""
    names = [n for n, m in model.named_modules() if n.startswith("features.")]
    relus = [n for n in names if isinstance(model.get_submodule(n), nn.ReLU)]
    if not relus:
        raise ValueError(f"{type(model).__name__} has no ReLU in .features for Grad-CAM")
    return relus[-1]


def class_saliency(
    model: nn.Module, image: torch.Tensor, class_index: int, method: str | None = None
) -> tuple[torch.Tensor, str]:
    """(1, *size) heat map in [0, 1] and the method's name: `method` (the model's registry
    trait, common/model_registry.py), else Grad-CAM where the model has a ReLU in
    `.features` and occlusion sensitivity where it has none."""
    if method is None:
        try:
            target_layer(model)
            method = GRAD_CAM
        except ValueError:
            method = OCCLUSION
    if method == OCCLUSION:
        return occlusion(model, image, class_index), OCCLUSION
    return gradcam(model, image, class_index), GRAD_CAM


def occlusion(model: nn.Module, image: torch.Tensor, class_index: int) -> torch.Tensor:
    """(C, *size) preprocessed image -> (1, *size): the drop of the class probability when
    each block is occluded, scaled to [0, 1] (zeros where nothing lowers it)."""
    from monai.visualize import OcclusionSensitivity

    model.eval()
    # 8-voxel blocks side by side (overlap 0): 64 model calls for a 32^3 volume
    occ = OcclusionSensitivity(
        nn_module=model, mask_size=8, n_batch=16, mode="mean_img", overlap=0.0, verbose=False
    )
    with torch.no_grad(), warnings.catch_warnings():
        # MONAI 1.x indexes with lists (a torch deprecation warning per call, not our concern)
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence")
        full = torch.softmax(model(image[None]), 1)[0, class_index]
        occluded, _ = occ(image[None])  # (1, classes, *size): probabilities with a block hidden
    drop = (full - occluded[0, class_index]).clamp(min=0).float()
    high = drop.max()
    return (drop / high)[None] if high > 0 else torch.zeros_like(drop)[None]


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
