"""model="filterbank-3d": fixed 3D differential features, fixed pooling, a linear trained head.

Why: under DP-SGD every trained weight pays for noise, and a hospital has a few hundred
volumes. A 3D CNN must learn its first layers through that noise, and on a CT-derived
organ-shape set it barely beats chance under DP while it learns without DP (docs/benchmarks.md,
"3D classification"). Here nothing but the last linear
layer is trained (~2,000 weights); the rest is fixed maths, like `scatter-cnn` in 2D
(kymatio's 3D frontend does not import with SciPy >= 1.17, so it is not used).

The fixed part, per input channel:
1. Gaussian derivatives up to order 2 at a few scales (sigma in voxels), computed separably
   as three 1D passes; each pass is a matrix product with a banded (size x size) matrix, which
   is 10-30x faster on CPU than a depthwise 3D convolution. Derivatives are scale-normalised
   (order k times sigma^k), so scales are comparable.
2. Seven rotation invariants per scale, polynomials in those derivatives (no eigenvalues):
   the smoothed value L, the gradient norm, the Hessian's trace (Laplacian), its second
   invariant and determinant (blob-, tube- and sheet-like structure), and the two isophote
   curvature numerators gradient' H gradient and gradient' adj(H) gradient (mean- and
   Gaussian-curvature of the surface). Each is brought to first degree by a signed root, so
   its size is comparable to the others. Rotation invariance matters: an abnormality can sit
   anywhere on an organ in any pose, and nothing has to learn that through noise.
3. Pooled statistics over the whole volume per invariant map: log-counts of voxels beyond
   fixed thresholds (both signs) and the log-extremes, of the map standardised per case
   (contrast-free, e.g. CT windows differ) and of the raw map (absolute shape measures). A
   small local abnormality changes a few counts of a few maps; a linear layer can read that.
4. Per-case normalisation of the statistics (GroupNorm without parameters: per statistic
   over the maps, then per map over the statistics): DP-SGD on an uncentred feature vector is
   badly conditioned, and a data-dependent (e.g. batch or population) centring would need
   its own privacy budget.

5. Centring by the population's mean feature vector (`feature_mean`, a persistent buffer
   that travels with the weights). The statistics above are all positive-ish log-counts:
   uncentred, every clipped per-case gradient points mostly along the common mean, and DP-SGD
   learns the small differences between cases through that (FL-DP AUC 0.75 where centred
   features reach 0.80-0.82 on the organ phantom, docs/benchmarks.md). The mean is data: each
   hospital releases it ONCE per run with Gaussian noise, on its privacy ledger
   (`client/statistics.py`, planned into the run's epsilon from the start), in its first
   update; FedAvg's weighting by the released counts makes the global buffer the pooled
   estimate, and from then on it is fixed (the server refuses an update that changes it).

The filters are non-persistent buffers: they are rebuilt by every node and never travel in a
message or a checkpoint; `state_dict` holds the linear layer and `feature_mean`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.feature_cache import memoised

# Derivative orders (along x, y, z) up to total order 2, in the order `responses` returns them.
ORDERS = tuple((a, b, c) for a in range(3) for b in range(3) for c in range(3) if a + b + c <= 2)
INVARIANTS = 7
STD_THRESHOLDS = (1.0, 2.0, 4.0, 8.0, 16.0)  # on maps standardised per case
RAW_THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.4)  # on the raw invariants of a [0, 1] image
STATS = 2 * (2 + 2 * len(STD_THRESHOLDS))  # per map: 2 extremes + 2 signs x thresholds, twice
CHUNK = 16  # cases whose features are computed at once (memory, see FilterBank3D.features)
STATISTICS_KEY = "feature_mean"  # the state_dict key of the released feature mean


def derivative_matrices(n: int, sigma: float) -> torch.Tensor:
    """(3, n, n): row i of [k] applies the order-k Gaussian derivative centred at voxel i.

    Zero padding at the borders (rows are truncated there). Sampled kernels, radius 3 sigma;
    order 0 sums to 1 and order 2 to 0, so flat regions give exactly L = value, no derivative.
    """
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    g1 = -t / sigma**2 * g
    g2 = (t**2 / sigma**4 - 1 / sigma**2) * g
    kernels = torch.stack([g, g1, g2 - g2.mean()])
    idx = torch.arange(n)
    offset = idx[None, :] - idx[:, None] + r  # (i, j) -> kernel tap j - i
    inside = (offset >= 0) & (offset <= 2 * r)
    m = torch.zeros(3, n, n, dtype=torch.float64)
    m[:, inside] = kernels[:, offset[inside]]
    return m.to(torch.float32)


def responses(x: torch.Tensor, mx: torch.Tensor, my: torch.Tensor, mz: torch.Tensor):
    """x (N, X, Y, Z) -> {order: (N, X, Y, Z)} for every order in ORDERS (3 separable passes)."""
    ox = {a: torch.einsum("ij,njyz->niyz", mx[a], x) for a in range(3)}
    oxy = {
        (a, b): torch.einsum("ij,nxjz->nxiz", my[b], v) for a, v in ox.items() for b in range(3 - a)
    }
    return {(a, b, c): torch.matmul(oxy[(a, b)], mz[c].T) for a, b, c in ORDERS}


def _signed_root(v: torch.Tensor, degree: int) -> torch.Tensor:
    return torch.sign(v) * v.abs().pow(1.0 / degree)


def invariants(d: dict[tuple[int, int, int], torch.Tensor]) -> torch.Tensor:
    """The 7 rotation invariants (N, 7, X, Y, Z) of one scale's derivatives (see module doc)."""
    gx, gy, gz = d[(1, 0, 0)], d[(0, 1, 0)], d[(0, 0, 1)]
    hxx, hyy, hzz = d[(2, 0, 0)], d[(0, 2, 0)], d[(0, 0, 2)]
    hxy, hxz, hyz = d[(1, 1, 0)], d[(1, 0, 1)], d[(0, 1, 1)]
    # adjugate (cofactor matrix) of the symmetric Hessian
    a_xx, a_yy, a_zz = hyy * hzz - hyz**2, hxx * hzz - hxz**2, hxx * hyy - hxy**2
    a_xy, a_xz, a_yz = hxz * hyz - hxy * hzz, hxy * hyz - hxz * hyy, hxy * hxz - hxx * hyz
    grad2 = gx**2 + gy**2 + gz**2
    trace = hxx + hyy + hzz
    minors = a_xx + a_yy + a_zz
    det = hxx * a_xx + hxy * a_xy + hxz * a_xz
    ghg = (
        gx * (hxx * gx + hxy * gy + hxz * gz)
        + gy * (hxy * gx + hyy * gy + hyz * gz)
        + gz * (hxz * gx + hyz * gy + hzz * gz)
    )
    gag = (
        gx**2 * a_xx
        + gy**2 * a_yy
        + gz**2 * a_zz
        + 2 * (gx * gy * a_xy + gx * gz * a_xz + gy * gz * a_yz)
    )
    parts = [
        d[(0, 0, 0)],
        grad2.sqrt(),
        trace,
        _signed_root(minors, 2),
        _signed_root(det, 3),
        _signed_root(ghg, 3),
        _signed_root(gag, 4),
    ]
    return torch.stack(parts, 1)


def _exceedances(v: torch.Tensor, thresholds: Sequence[float]) -> list[torch.Tensor]:
    """log(1 + count) of values above t and below -t for each t: (rows, V) -> 2 x len(t) rows.

    One bucketize + scatter-add pass instead of a comparison per threshold (that was ~90 % of
    the model's time); the counts beyond each threshold are then cumulative bucket sums."""
    edges = torch.tensor(thresholds, dtype=v.dtype, device=v.device)
    edges = torch.cat([-edges.flip(0), edges])  # sorted: -t_max .. -t_min, t_min .. t_max
    buckets = torch.bucketize(v, edges, right=True)  # 0 = below -t_max, ..., 2k = above t_max
    counts = torch.zeros(v.shape[0], len(edges) + 1, dtype=v.dtype, device=v.device)
    counts.scatter_add_(1, buckets, torch.ones_like(v))
    k = len(thresholds)
    above = counts.flip(1).cumsum(1).flip(1)[:, k + 1 :]  # > t_min, ..., > t_max
    below = counts.cumsum(1)[:, :k].flip(1)  # < -t_min, ..., < -t_max
    return [torch.log1p(c) for pair in zip(above.T, below.T, strict=True) for c in pair]


def pooled_statistics(maps: torch.Tensor) -> torch.Tensor:
    """(N, M, X, Y, Z) invariant maps -> (N, STATS, M) whole-volume statistics."""
    n, m = maps.shape[:2]
    std = F.group_norm(maps, m).flatten(2)  # per case and map: mean 0, std 1
    raw = maps.flatten(2)
    out = []
    for v, thresholds, squash in ((std, STD_THRESHOLDS, True), (raw, RAW_THRESHOLDS, False)):
        top, bottom = v.amax(2), (-v).amax(2)
        if squash:  # standardised extremes of a sparse map reach ~100: compress like counts
            top, bottom = torch.log1p(top.clamp(min=0)), torch.log1p(bottom.clamp(min=0))
        out += [top, bottom]
        out += [c.reshape(n, m) for c in _exceedances(v.reshape(n * m, -1), thresholds)]
    return torch.stack(out, 1)


class FilterBank3D(nn.Module):
    """Fixed multi-scale invariant statistics (see module doc) -> per-case norm -> linear."""

    def __init__(
        self,
        image_size: Sequence[int],
        in_channels: int,
        num_classes: int,
        scales: Sequence[float] = (0.5, 0.7, 1.0, 1.5, 2.0, 3.0),
    ) -> None:
        super().__init__()
        if len(image_size) != 3:
            raise ValueError(f"filterbank-3d needs 3D images, got size {tuple(image_size)}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.image_size = tuple(int(s) for s in image_size)
        self.scales = tuple(float(s) for s in scales)
        for i, sigma in enumerate(self.scales):
            for axis, n in zip("xyz", self.image_size, strict=True):
                self.register_buffer(f"d{axis}{i}", derivative_matrices(n, sigma), persistent=False)
        self.maps = in_channels * len(self.scales) * INVARIANTS
        self.head = nn.Linear(STATS * self.maps, num_classes)
        # all zeros = not set yet (a released mean is never exactly zero); see module doc
        self.register_buffer(STATISTICS_KEY, torch.zeros(STATS * self.maps))

    @property
    def feature_norm(self) -> float:
        """Every case's feature vector has exactly this norm (the per-case normalisation):
        the sensitivity of a sum of them, and the clipping bound `feature_sum` enforces."""
        return math.sqrt(STATS * self.maps)

    def feature_sum(self, images: torch.Tensor) -> torch.Tensor:
        """The sum of the cases' feature vectors, each clipped to `feature_norm` (float64).
        (`features` computes in chunks and memoises: training reuses these.)"""
        f = self.features(images).double()
        scale = (self.feature_norm / f.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)
        return (f * scale[:, None]).sum(0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, X, Y, Z) -> (N, STATS * maps) normalised statistics (fixed, no gradient).

        Memoised per case (process-wide, by the bytes of its input): the features depend on
        nothing but the input, and a hospital feeds the same cases every epoch and round, so
        each is computed once per node process instead of rounds x epochs times (they are
        ~90 % of the model's time). Augmented inputs differ and are computed afresh."""
        if tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"filterbank-3d was built for {self.image_size}, got input {tuple(x.shape[2:])}"
            )
        tag = f"filterbank-3d{(self.image_size, self.scales)}"
        return memoised(tag, x.float(), self._compute, CHUNK).to(x.device)

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            n, c = x.shape[:2]
            v = x.reshape(n * c, *self.image_size).float()
            maps = []
            for i, sigma in enumerate(self.scales):
                mats = [getattr(self, f"d{axis}{i}").to(v.device) for axis in "xyz"]
                d = responses(v, *mats)
                d = {o: r * sigma ** sum(o) for o, r in d.items()}  # scale-normalised
                maps.append(invariants(d))
            maps = torch.cat(maps, 1).reshape(n, self.maps, *self.image_size)
            s = pooled_statistics(maps)  # (N, STATS, maps)
            s = F.group_norm(s.flatten(1), STATS)  # each statistic across the maps
            s = s.reshape(n, STATS, self.maps).transpose(1, 2).reshape(n, -1)
            return F.group_norm(s, self.maps).cpu()  # each map across its statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401 - torch convention
        return self.head(self.features(x) - self.feature_mean)


def has_statistics(model: nn.Module) -> bool:
    """Does this model centre its features by a data statistic (that a node must release)?"""
    return isinstance(model, FilterBank3D)


def statistics_set(model: nn.Module) -> bool:
    return bool(getattr(model, STATISTICS_KEY).abs().sum() > 0)


def set_exact_mean(model: FilterBank3D, images: torch.Tensor) -> None:
    """The non-private case (dp = false, the pooled reference): the exact mean."""
    mean = model.feature_sum(images) / max(1, len(images))
    getattr(model, STATISTICS_KEY).copy_(mean.float())
