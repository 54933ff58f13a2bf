"""Opacus-ready classifiers for 2D images and 3D volumes (the `model` run-config key).

* "cnn": conv-GroupNorm-ReLU-maxpool blocks, 2D or 3D.
* "scatter-cnn" (2D): a fixed wavelet scattering transform (Kymatio) in front of a small
  CNN. Under DP-SGD every trained weight pays for noise; scattering features are not trained
  (no privacy cost, nothing to learn from ~1000 cases) and are what a CNN's first layers
  would learn anyway (Tramer & Boneh, "Differentially private learning needs better
  features", ICLR 2021). On the PneumoniaMNIST demo under DP it lifts held-out AUC over the
  plain CNN (docs/benchmarks.md, "Clinical utility under privacy").
* "filterbank-3d" (3D): the same idea for volumes — fixed multi-scale 3D Gaussian-derivative
  invariants pooled into whole-volume statistics, and only a linear head trained
  (`common/filterbank3d.py`).

GroupNorm instead of BatchNorm: BatchNorm mixes samples within a batch, which
breaks per-sample gradients (and so DP-SGD); Opacus has a grad sampler for
GroupNorm. The same builder serves 2D and 3D so the rest of fedvox never
branches on dimensionality.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from common import model_registry
from common.feature_cache import memoised


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


_SCATTERINGS: dict[tuple, nn.Module] = {}


def _scattering(scales: int, shape: tuple[int, ...], angles: int) -> nn.Module:
    """A fresh copy of the scattering for these settings. Its filters are fixed maths that
    take ~0.26 s to build (a hospital builds the model every round): built once per process,
    copied after (~2 ms)."""
    key = (scales, shape, angles)
    if key not in _SCATTERINGS:
        # kymatio.torch would also import its 3D scattering, which needs scipy.special.sph_harm
        # (removed in SciPy 1.17); the 2D frontend alone does not.
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

        _SCATTERINGS[key] = ScatteringTorch2D(J=scales, shape=shape, L=angles)
    return copy.deepcopy(_SCATTERINGS[key])


class ScatterCNN(nn.Module):
    """Fixed 2D scattering (J scales, L angles, orders 0-2) -> GroupNorm -> 2 conv blocks -> linear.

    The scattering filters are maths, not weights: they are buffers kept out of `state_dict`,
    so they never travel in a Flower message or a checkpoint (a fresh model rebuilds them).
    """

    def __init__(
        self,
        image_size: tuple[int, int],
        in_channels: int,
        num_classes: int,
        width: int,
        scales: int = 2,
        angles: int = 8,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        # The scattering subsamples by 2^J and the head pools once more: >= 2^(J+1) a side.
        if min(image_size) < 2 ** (scales + 1):
            raise ValueError(
                f'model="scatter-cnn" needs images of at least {2 ** (scales + 1)} pixels a side, '
                f"got {tuple(image_size)}"
            )
        self.scattering = _scattering(scales, tuple(image_size), angles)
        self.tag = f"scatter-cnn{(tuple(image_size), in_channels, scales, angles)}"
        for name, buffer in list(self.scattering.named_buffers(recurse=False)):
            delattr(self.scattering, name)
            self.scattering.register_buffer(name, buffer, persistent=False)
        # Scattering paths per input channel: 1 low-pass, J*L first order, L^2*J(J-1)/2 second.
        paths = 1 + scales * angles + angles**2 * scales * (scales - 1) // 2
        channels = in_channels * paths
        # Paths differ in scale by orders of magnitude; normalise them in small groups, with no
        # trained affine (the conv after it can rescale). Per-sample, so DP-safe.
        self.norm = nn.GroupNorm(
            channels // 3 if channels % 3 == 0 else channels, channels, affine=False
        )
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            _norm(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            _norm(2 * width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def front(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed part: scattering and its per-sample normalisation, (N, C, H, W) ->
        (N, C x paths, H / 2^J, W / 2^J). No trained weight and no gradient, so it is
        memoised per case (common/feature_cache.py): ~86 % of a step recomputed it."""

        def compute(batch: torch.Tensor) -> torch.Tensor:
            s = self.scattering(batch.contiguous())  # (N, C, paths, H / 2^J, W / 2^J)
            return self.norm(s.flatten(1, 2))

        return memoised(self.tag, x, compute)

    def forward(self, x):  # noqa: D401 - torch convention
        return self.head(self.pool(self.features(self.front(x))).flatten(1))


def default_width(spatial_dims: int) -> int:
    """32/64/128 channels in 2D; 16/32/64 in 3D, where activations are ~Z times larger."""
    return 32 if spatial_dims == 2 else 16


def cnn(spec: Any) -> nn.Module:
    """model="cnn" for classification (`spec`: common/model_registry.py `ModelEntry`)."""
    width = spec.width or default_width(spec.spatial_dims)
    return CNN(spec.spatial_dims, spec.in_channels, spec.num_classes, width, spec.depth)


def scatter_cnn(spec: Any) -> nn.Module:
    if spec.image_size is None or len(spec.image_size) != 2:
        raise ValueError(f'model="scatter-cnn" is for 2D images; got size {spec.image_size}')
    return ScatterCNN(tuple(spec.image_size), spec.in_channels, spec.num_classes, spec.width or 32)


def filterbank_3d(spec: Any) -> nn.Module:
    from common.filterbank3d import FilterBank3D  # 3D only: keep 2D imports light

    if spec.image_size is None or len(spec.image_size) != 3:
        raise ValueError(f'model="filterbank-3d" is for 3D volumes; got size {spec.image_size}')
    return FilterBank3D(tuple(spec.image_size), spec.in_channels, spec.num_classes)


def build_model(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    width: int | None = None,
    depth: int = 3,
    arch: str = "cnn",
    image_size: tuple[int, ...] | None = None,
) -> nn.Module:
    """The classifier `arch` (common/model_registry.py) for `spatial_dims` (2 or 3) data.

    "scatter-cnn" is 2D only, needs `image_size` (the scattering is built for one size) and
    has a fixed two-block head (`depth` is the "cnn"'s). "filterbank-3d" (3D only, built for
    one `image_size`) is fixed 3D filter statistics and a linear head; `width`/`depth` unused.
    """
    size = tuple(image_size) if image_size is not None else None
    spec = SimpleNamespace(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=size,
        arch=arch,
        width=width,
        depth=depth,
    )
    return model_registry.build("classification", spec)
