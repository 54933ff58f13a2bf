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
`SliceUNet` (model="slice-unet") is the 2D U-Net for 3D volumes: trained on one axial slice per
case, applied slice by slice (the 3D segmentation recipe, common/recipes.py).
BasicUNet always has 4 down-sampling levels, so every input side should be >= 16 (a multiple
of 16 avoids the 1-voxel padding its decoder adds otherwise).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.schedule import cosine_decay


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


# Slices per forward pass when a volume is segmented slice by slice: it bounds the activations
# (16 slices of 64^2 at width 16 are ~17 MB a level), and passes this small stay in the CPU's
# caches: the 3D recipe's holdout took ~40 % less time than in passes of 64 (docs/benchmarks.md,
# "Figures behind code comments").
SLICE_CHUNK = 16
# Share of training slices drawn through the case's rarest structure (e.g. a nodule): a
# uniformly drawn slice misses a small structure most of the time, so it would hardly be learnt.
# It starts at FOCUS_SHARE and follows a half cosine over the run down to FOCUS_FLOOR: the
# over-drawn structure is learnt early, and the last rounds see slices nearly as prediction
# does (whole volumes), so the model stops predicting the structure wherever it is unsure.
# Screen (pooled DP, lung phantom, 60 epochs, seed 0): constant 0.5 gave nodule Dice 0.40 with
# 250-400 false-positive voxels in each nodule-free case; annealed to 0.1 gave 0.49 with ~40.
FOCUS_SHARE = 0.5
FOCUS_FLOOR = 0.1


def focus_share(progress: float) -> float:
    """The share of focus-drawn training slices at `progress` of a run (0 = its first round,
    (r - 1) / R in round r of R, 1 = after it, e.g. local fine-tuning)."""
    return max(FOCUS_FLOOR, FOCUS_SHARE * cosine_decay(progress))


# Neighbouring slices each side given as extra channels ("2.5D"): a nodule is round in 3D, a
# vessel or the tip of a lung is not, which one slice alone cannot tell. Screen (pooled DP, lung
# phantom, 60 epochs, one seed each; nodule Dice): 1 each side 0.31, 2 each side 0.40.
CONTEXT = 2


class SliceUNet(nn.Module):
    """model="slice-unet": a 2D U-Net over the axial (last, RAS "S") slices of a 3D volume.

    Why: a DP-SGD step of the 3D U-Net at 64^3 costs ~0.18 s a case on 2 CPU cores, so the
    steps a DP run needs take over an hour; a 64^2 slice stack costs ~0.015 s (a hospital's DP
    training of a round, 4 steps of batch 96, takes 4-6 s; docs/benchmarks.md).
    The patient stays the privacy unit: `training_view` keeps ONE slice per sampled case, so
    every case still gives exactly one clipped gradient per step, as the accountant assumes.

    `forward` takes volumes (N, C, X, Y, Z) -> logits (N, K, X, Y, Z), segmented slice by slice
    (evaluation, predict, the holdout), or the stacks `training_view` makes, (N, C * (2k + 1),
    X, Y) -> (N, K, X, Y): each slice with its `context` k neighbours either side.
    """

    def __init__(
        self, in_channels: int, num_classes: int, width: int | None = None, context: int = CONTEXT
    ):
        super().__init__()
        self.context = int(context)
        self.unet = build_unet(2, in_channels * (2 * self.context + 1), num_classes, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401 - torch convention
        if x.dim() == 4:  # slices already stacked with their neighbours (training_view)
            return self.unet(x)
        if x.dim() != 5:
            raise ValueError(f"slice-unet takes (N, C, X, Y[, Z]) tensors, got {tuple(x.shape)}")
        sz = x.shape[-1]
        step = max(1, SLICE_CHUNK // max(1, x.shape[0]))  # heights per pass: bounded memory
        out = [self._logits_at(x, torch.arange(h, min(sz, h + step))) for h in range(0, sz, step)]
        return torch.cat(out, dim=-1)

    def _stack(
        self, x: torch.Tensor, heights: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, C, X, Y, Z) and one height per case -> (N, C * (2k + 1), X, Y): each case's slice
        with its k neighbours either side (the edge slice repeated beyond the volume).
        `rows`: the cases of `x` to take (one height each), without copying whole volumes."""
        _, c, sx, sy, sz = x.shape
        rows = torch.arange(len(x)) if rows is None else rows
        offsets = torch.arange(-self.context, self.context + 1)
        z = (heights[:, None] + offsets).clamp(0, sz - 1)  # (N, 2k + 1)
        picked = x.permute(0, 4, 1, 2, 3)[rows[:, None], z]  # (N, 2k + 1, C, X, Y)
        return picked.transpose(1, 2).reshape(len(rows), c * len(offsets), sx, sy)

    def _logits_at(self, x: torch.Tensor, heights: torch.Tensor) -> torch.Tensor:
        """Logits (N, K, X, Y, len(heights)) of every case at each of `heights`."""
        n = x.shape[0]
        stacks = [self._stack(x, torch.full((n,), int(h))) for h in heights]
        # channels-last: oneDNN's fast path for inference convolutions on CPU (~25 % less time a
        # pass, same logits to 1e-5); training (4D stacks, per-sample gradients) keeps NCHW
        stacked = torch.cat(stacks).contiguous(memory_format=torch.channels_last)
        logits = self.unet(stacked)  # (len(heights) * N, K, X, Y)
        return logits.reshape(len(heights), n, *logits.shape[1:]).permute(1, 2, 3, 4, 0)

    def training_view(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        progress: float = 0.0,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One axial slice per case, with its neighbours as channels: images (N, C, X, Y, Z)
        -> (N, C * (2k + 1), X, Y); labels (N, 1, X, Y, Z) -> the slice's (N, 1, X, Y).
        `rows`: the view of these cases of `images` / `labels` only (a sampled batch taken
        from a site's tensors, so its volumes are never copied whole: client/train.py).

        With probability `focus_share(progress)` (the run's progress, 0..1) the slice goes
        through the case's rarest labelled structure (fewest voxels), at the height of a random
        voxel of it; otherwise it is uniform over all slices, so slices with no structure
        (above and below the organ) are learnt as background. The choice depends on the case
        alone (and the public progress): it is part of the per-case computation DP-SGD clips.
        """
        if images.dim() != 5:
            return images, labels
        rows = torch.arange(len(images)) if rows is None else rows
        n, depth = len(rows), images.shape[-1]
        z = torch.randint(depth, (n,))
        for i in torch.nonzero(torch.rand(n) < focus_share(progress)).flatten().tolist():
            label = labels[rows[i], 0].long()
            counts = torch.bincount(label.flatten())
            counts[0] = 0  # background is not a structure
            present = torch.nonzero(counts).flatten()
            if len(present):
                # the height of a random voxel of the structure: slices through its middle,
                # where it is largest, are drawn most often (like MONAI's RandCropByLabelClasses)
                rarest = present[counts[present].argmin()]
                voxels = torch.nonzero(label.flatten() == rarest).flatten()
                z[i] = voxels[torch.randint(len(voxels), ())] % depth
        return self._stack(images, z, rows), labels[rows, :, :, :, z]


def unet(spec: Any) -> nn.Module:
    """model="unet" (or its earlier name "cnn") for segmentation (`spec`: the registry's
    `ModelSpec`, common/model_registry.py)."""
    return build_unet(spec.spatial_dims, spec.in_channels, spec.num_classes, spec.width)


def slice_unet(spec: Any) -> nn.Module:
    """model="slice-unet" (3D segmentation)."""
    return SliceUNet(spec.in_channels, spec.num_classes, spec.width)
