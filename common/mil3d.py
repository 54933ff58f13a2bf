"""model="mil-3d": a small learned scorer over fixed LOCAL 3D features, pooled over positions.

Why: filterbank-3d pools its fixed invariants over the whole volume first, so it sees only
whole-volume statistics; a small finding in an intensity volume (a nodule, a lesion: a few
voxels at a contrast near the noise) moves them less than the anatomy, the noise and the sites
do, and it stays at chance (docs/benchmarks.md, "3D classification"). Here the same fixed
features are kept per position and the pooling comes after a learned scorer, as in
multiple-instance learning: a volume is abnormal if some place in it is.

1. Fixed, per input channel (`common/filterbank3d.py`'s maths): Gaussian derivatives up to
   order 2 at a few scales and their 7 rotation invariants per scale (value, gradient norm,
   Laplacian, Hessian invariants, isophote curvatures): blob-, tube- and edge-ness at each
   place, the same whatever the finding's orientation.
2. Fixed: each map standardised per case over the volume (mean 0, std 1: CT windows, MRI
   scanner units and gains differ, and DP-SGD wants centred inputs; no data statistic has to
   be released for that), then averaged over 2x2x2 cells (16^3 positions at 32^3: the features
   of a case fit the feature cache at half precision).
3. Learned (529 weights at the defaults): a two-layer per-position scorer (a 1x1x1 MLP) giving
   one score per finding class at every position, pooled by log-mean-exp, a soft maximum: a
   high score anywhere raises the volume's score; class 0 ("normal", no finding) is the
   reference logit 0.

Nothing of the data leaves a node but the trained weights (no released statistic). The features
are memoised per case like filterbank-3d's (`common/feature_cache.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.feature_cache import memoised
from common.filterbank3d import INVARIANTS, derivative_matrices, invariants, responses

CHUNK = 16  # cases whose features are computed at once (memory)
CELL = 2  # positions: the feature maps averaged over CELL^3 voxels


class Mil3D(nn.Module):
    """Fixed local invariant maps -> per-position MLP scores -> log-mean-exp over positions."""

    def __init__(
        self,
        image_size: Sequence[int],
        in_channels: int,
        num_classes: int,
        scales: Sequence[float] = (0.7, 1.0, 1.5, 2.5),
        hidden: int = 16,
        sharpness: float = 1.0,
    ) -> None:
        super().__init__()
        if len(image_size) != 3:
            raise ValueError(f"mil-3d needs 3D images, got size {tuple(image_size)}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.image_size = tuple(int(s) for s in image_size)
        if min(self.image_size) < 2 * CELL:
            raise ValueError(f"mil-3d needs volumes of at least {2 * CELL} voxels a side")
        self.scales = tuple(float(s) for s in scales)
        self.sharpness = float(sharpness)
        # Filters over the volume extended by replicating its faces (`_compute`): zero padding
        # makes the volume's own border the strongest edge and blob of every case, and the
        # soft maximum would see that before any finding.
        self.pad = math.ceil(3 * max(self.scales))
        for i, sigma in enumerate(self.scales):
            for axis, n in zip("xyz", self.image_size, strict=True):
                m = derivative_matrices(n + 2 * self.pad, sigma)[:, self.pad : self.pad + n]
                self.register_buffer(f"d{axis}{i}", m.contiguous(), persistent=False)
        self.maps = in_channels * (len(self.scales) * (INVARIANTS + 1) - 1)
        self.hidden = nn.Linear(self.maps, hidden)
        self.score = nn.Linear(hidden, num_classes - 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, X, Y, Z) -> (N, positions, maps) standardised local features (fixed; memoised
        per case by the bytes of its input, as filterbank-3d's)."""
        if tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"mil-3d was built for {self.image_size}, got input {tuple(x.shape[2:])}"
            )
        tag = f"mil-3d{(self.image_size, self.scales, CELL)}"
        return memoised(tag, x.float(), self._compute, CHUNK).to(x.device).float()

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            n, c = x.shape[:2]
            v = x.reshape(n * c, 1, *self.image_size).float()
            v = v - v.mean((2, 3, 4), keepdim=True)  # float32 precision under large offsets
            v = F.pad(v, (self.pad,) * 6, mode="replicate")[:, 0]
            maps, smooth = [], []
            for i, sigma in enumerate(self.scales):
                mats = [getattr(self, f"d{axis}{i}").to(v.device) for axis in "xyz"]
                d = responses(v, *mats)
                maps.append(invariants({o: r * sigma ** sum(o) for o, r in d.items()}))
                smooth.append(d[(0, 0, 0)])
            # local contrast: each scale's value against the widest one's (differences of
            # Gaussians), a spot darker or brighter than its surroundings
            maps += [(s - smooth[-1])[:, None] for s in smooth[:-1]]
            maps = torch.cat(maps, 1).reshape(n, self.maps, *self.image_size)
            maps = F.avg_pool3d(F.group_norm(maps, self.maps), CELL, ceil_mode=True)
            return maps.flatten(2).transpose(1, 2).half().cpu()  # half: the cache holds 2x more

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401 - torch convention
        s = self.score(F.relu(self.hidden(self.features(x))))  # (N, positions, classes - 1)
        k = self.sharpness
        pooled = (torch.logsumexp(k * s, dim=1) - torch.log(torch.tensor(float(s.shape[1])))) / k
        return torch.cat([pooled.new_zeros(len(pooled), 1), pooled], 1)


def mil_3d(spec: Any) -> nn.Module:
    """model="mil-3d" for classification (`spec`: common/model_registry.py `ModelEntry`);
    `width` (model-width) is the scorer's hidden width (0 / None = 16)."""
    if spec.image_size is None or len(spec.image_size) != 3:
        raise ValueError(f'model="mil-3d" is for 3D volumes; got size {spec.image_size}')
    return Mil3D(
        tuple(spec.image_size), spec.in_channels, spec.num_classes, hidden=spec.width or 16
    )
