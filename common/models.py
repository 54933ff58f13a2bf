"""Opacus-ready CNNs for 2D images and 3D volumes.

GroupNorm instead of BatchNorm: BatchNorm mixes samples within a batch, which
breaks per-sample gradients (and so DP-SGD); Opacus has a grad sampler for
GroupNorm. The same builder serves 2D and 3D so the rest of fedvox never
branches on dimensionality.
"""

from __future__ import annotations

from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    # Up to 8 groups; fewer when a layer is narrow so each group keeps >= 1 channel.
    groups = min(8, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class CNN(nn.Module):
    """`depth` blocks of conv-GroupNorm-ReLU-maxpool, global average pooling, linear head."""

    def __init__(
        self, spatial_dims: int, in_channels: int, num_classes: int, width: int, depth: int
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            out = width * 2**i
            layers += [conv(channels, out, 3, padding=1), _norm(out), nn.ReLU(), pool(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):  # noqa: D401 - torch convention
        return self.head(self.pool(self.features(x)).flatten(1))


def default_width(spatial_dims: int) -> int:
    """32/64/128 channels in 2D; 16/32/64 in 3D, where activations are ~Z times larger."""
    return 32 if spatial_dims == 2 else 16


def build_model(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    width: int | None = None,
    depth: int = 3,
) -> nn.Module:
    """The classification model for data of `spatial_dims` (2 or 3) dimensions."""
    return CNN(spatial_dims, in_channels, num_classes, width or default_width(spatial_dims), depth)
