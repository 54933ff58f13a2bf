"""Opacus-ready U-Nets for 2D and 3D segmentation: MONAI's BasicUNet, configured for DP-SGD.

Checked against Opacus 1.6 (tests/test_segmentation.py runs a real DP step of each):
* `ModuleValidator.validate` passes BasicUNet and UNet with GroupNorm; it does not catch the
  real failure, which is MONAI's default `LeakyReLU(inplace=True)`: Opacus' backward hooks
  wrap module outputs in views, and an in-place activation on such a view raises. So the
  activation is made out-of-place here.
* ConvTranspose has no Opacus grad sampler; Opacus 1.6 falls back to functorch for it (works,
  but was ~2x slower per step in 3D here). `upsample="nontrainable"` (linear interpolation +
  a 1-voxel conv) uses only Conv layers, which have fast unfold-based grad samplers.
* GroupNorm, never BatchNorm/InstanceNorm-with-running-stats: normalisation must not mix the
  samples of a batch, or per-sample gradients (and DP) break.
BasicUNet always has 4 down-sampling levels, so every input side should be >= 16 (a multiple
of 16 avoids the 1-voxel padding its decoder adds otherwise).
"""

from __future__ import annotations

from torch import nn


def default_unet_width(spatial_dims: int) -> int:
    """First-level channels: 16 in 2D, 8 in 3D (activations are ~Z times larger there)."""
    return 16 if spatial_dims == 2 else 8


def _groups(width: int) -> int:
    # Every level has a multiple of `width` channels, so a divisor of width divides them all.
    groups = min(8, width)
    while width % groups:
        groups -= 1
    return groups


def build_unet(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    width: int | None = None,
    depth: int = 4,
) -> nn.Module:
    """A U-Net with `width`, w, 2w, 4w, 8w channels per level; outputs per-voxel class logits.

    `depth` is accepted for the Task interface (`model-depth` run config) but BasicUNet's depth
    is fixed at 4 poolings.
    """
    from monai.networks.nets import BasicUNet  # MONAI import is slow: only when a U-Net is built

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + structures), got {num_classes}")
    w = int(width or default_unet_width(spatial_dims))
    return BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        features=(w, w, 2 * w, 4 * w, 8 * w, w),
        act=("LeakyReLU", {"negative_slope": 0.1, "inplace": False}),
        norm=("group", {"num_groups": _groups(w)}),
        upsample="nontrainable",
    )
