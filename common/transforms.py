"""Preprocessing: one composable chain shared by training, evaluation and predict.

NIfTI image (or a numpy array already in RAS order) -> float32 tensor (C, *spatial_size):
  1. reorient to the closest canonical (RAS) orientation with nibabel and put the channel first,
  2. cast to float32,
  3. intensity normalisation per modality (CT: clip to a HU window then scale to [0, 1];
     "mask" (label-like inputs, e.g. segmented organ shapes) and any image with at most two
     distinct values: scale min..max to [0, 1]; anything else: robust z-score = clip to the
     0.5/99.5 percentiles, then mean/std),
  4. fit to the model's input size: resize keeping the *physical* aspect ratio (voxel spacing
     differs between scanners), then pad (with the image minimum, i.e. background) or
     centre-crop to exactly spatial_size.
Steps 2-4 are MONAI transforms; every scanner difference the data contract allows (size,
spacing, orientation, dtype, byte order) is absorbed here rather than treated as a defect.

Segmentation masks go through `build_mask_transform`: the same reorientation and the same
FitToSize geometry (which depends only on the shape and voxel sizes, identical for a mask and
its image once validation checked shape + affine), but nearest-neighbour resizing, padding with
background (0) and no intensity step, so each label stays on the voxels of its structure.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np
import torch

# Bump when the chain below changes in a way that changes its output: it is part of key(),
# so every on-disk cache built by an older chain is ignored and rebuilt.
PREPROCESS_VERSION = 2  # 2: binary / "mask" images scaled to [0, 1] (cached features change)


@dataclass(frozen=True)
class PreprocessConfig:
    spatial_size: tuple[int, ...]  # model input size, (X, Y) or (X, Y, Z)
    # "CT" -> HU window scaled to [0, 1]; "mask" -> [0, 1]; anything else -> robust z-score
    modality: str = "other"
    ct_window: tuple[float, float] = (-1000.0, 400.0)

    def __post_init__(self) -> None:
        # Accept lists (from JSON / CLI) but store tuples so the config stays hashable.
        size = tuple(int(s) for s in self.spatial_size)
        if len(size) not in (2, 3) or min(size) < 1:
            raise ValueError(
                f"spatial_size must be 2 or 3 positive ints, got {self.spatial_size!r}"
            )
        lo, hi = (float(v) for v in self.ct_window)
        if not lo < hi:
            raise ValueError(
                f"ct_window must be (low, high) with low < high, got {self.ct_window!r}"
            )
        object.__setattr__(self, "spatial_size", size)
        object.__setattr__(self, "ct_window", (lo, hi))
        object.__setattr__(self, "modality", str(self.modality))

    @property
    def is_ct(self) -> bool:
        return self.modality.strip().upper() == "CT"

    @property
    def is_mask(self) -> bool:
        """Label-like input images (dataset.json modality "mask"): values are classes."""
        return self.modality.strip().lower() == "mask"

    def key(self) -> str:
        """Stable short hash of every setting (plus the chain version): the disk-cache key."""
        blob = json.dumps({"version": PREPROCESS_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def effective_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Spatial shape with trailing singleton axes dropped (never below 2 axes).

    NIfTI writers often store a 2D image as (X, Y, 1) and a 3D volume as (X, Y, Z, 1); those are
    2D / 3D images, not 3D / 4D ones.
    """
    shape = tuple(int(s) for s in shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


_ORNT: dict[bytes, np.ndarray] = {}  # a site's files nearly all share one affine: memoise


def _canonical_ornt(affine: np.ndarray) -> np.ndarray:
    """nibabel's orientation transform from array axes to the closest RAS axes (3 rows)."""
    key = np.asarray(affine, dtype=np.float64).tobytes()
    if key not in _ORNT:
        if len(_ORNT) > 10_000:
            _ORNT.clear()
        _ORNT[key] = nib.io_orientation(affine)
    return _ORNT[key]


def canonical_shape(img: nib.spatialimages.SpatialImage) -> tuple[int, ...]:
    """The effective shape the image will have after reorientation to RAS (header only)."""
    shape = effective_shape(img.shape)
    if len(shape) not in (2, 3):
        return shape
    shape3 = shape + (1,) * (3 - len(shape))
    ornt = _canonical_ornt(img.affine)
    out = [0, 0, 0]
    for i, (axis, _flip) in enumerate(ornt):
        out[int(axis)] = shape3[i]
    if len(shape) == 2:
        del out[int(ornt[2, 0])]  # the padded singleton axis, wherever RAS put it
    return tuple(out)


def to_canonical(img: nib.spatialimages.SpatialImage) -> tuple[np.ndarray, np.ndarray]:
    """Decode a 2D/3D nibabel image into a float32 RAS array plus its voxel sizes (mm).

    Same maths as nibabel.as_closest_canonical, but it also copes with 2D images: they get a
    singleton third axis so the 4x4 affine applies, and lose it again afterwards.
    """
    shape = effective_shape(img.shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"expected a 2D or 3D image, got shape {tuple(img.shape)}")
    # get_fdata applies scl_slope/inter and returns native byte order whatever the file had.
    data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    data3 = data.reshape(shape + (1,) * (3 - len(shape)))
    ornt = _canonical_ornt(img.affine)
    data3 = nib.apply_orientation(data3, ornt)
    if len(shape) == 2:
        data3 = np.squeeze(data3, axis=int(ornt[2, 0]))
    return np.ascontiguousarray(data3, dtype=np.float32), canonical_zooms(img.affine, len(shape))


def io_ornt(affine: np.ndarray) -> np.ndarray:
    """File axes -> closest RAS axes (nibabel's io_orientation, memoised)."""
    return _canonical_ornt(affine)


def canonical_zooms(affine: np.ndarray, ndim: int) -> np.ndarray:
    """Voxel sizes (mm) in RAS axis order, as the chain uses them (0 -> 1 mm); `ndim` 2 drops
    the axis a 2D image's padded singleton went to."""
    ornt = _canonical_ornt(affine)
    voxel = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    zooms = np.ones(3)
    for i, (axis, _flip) in enumerate(ornt):
        zooms[int(axis)] = voxel[i] if voxel[i] > 0 else 1.0
    return np.delete(zooms, int(ornt[2, 0])) if ndim == 2 else zooms


class ToCanonicalChannelFirst:
    """nibabel image -> tensor (1, *RAS spatial).

    When the image still has to be resized to spatial_size it becomes a MONAI MetaTensor whose
    affine carries the voxel sizes (FitToSize keeps the physical aspect); otherwise a plain
    tensor, because MetaTensor bookkeeping would triple the cost of small 2D images.
    A numpy array is taken as already RAS with 1 mm voxels (the prepared-site convention).
    """

    def __init__(self, spatial_size: Sequence[int]):
        self.spatial_size = tuple(int(s) for s in spatial_size)

    def __call__(self, img: nib.spatialimages.SpatialImage | np.ndarray) -> torch.Tensor:
        if isinstance(img, np.ndarray) or torch.is_tensor(img):
            data = np.asarray(img, dtype=np.float32).reshape(effective_shape(np.shape(img)))
            zooms = np.ones(data.ndim)
        else:
            data, zooms = to_canonical(img)
        t = torch.from_numpy(data.copy())[None]
        if data.shape == self.spatial_size:
            return t
        from monai.data import MetaTensor

        return MetaTensor(t, affine=torch.as_tensor(np.diag(list(zooms) + [1.0])))


def fitted_shape(
    shape: Sequence[int], zooms: Sequence[float], spatial_size: Sequence[int]
) -> tuple[int, ...]:
    """The size FitToSize resizes a (RAS) image of `shape` with voxel sizes `zooms` to before
    padding: the physical aspect kept, every side <= spatial_size. Shared with the inverse
    (common/geometry.py), so predict maps outputs back through the very same numbers."""
    extent = np.asarray(shape, dtype=float) * np.asarray(zooms, dtype=float)
    scale = min(t / e for t, e in zip(spatial_size, extent, strict=True))
    return tuple(
        int(min(t, max(1, round(e * scale)))) for t, e in zip(spatial_size, extent, strict=True)
    )


class FitToSize:
    """Resize keeping the physical aspect ratio, then pad / centre-crop to spatial_size.

    Stretching each axis independently would distort anatomy differently per scanner; keeping
    the aspect and padding with the image minimum (background after normalisation) does not.
    """

    def __init__(self, spatial_size: Sequence[int], mask: bool = False):
        self.spatial_size = tuple(int(s) for s in spatial_size)
        # Masks: nearest-neighbour ("nearest-exact": voxel centres, no half-voxel shift) and
        # background padding, so labels stay integers on their structure.
        self.mask = mask

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        from monai.transforms import CenterSpatialCrop, Resize, SpatialPad

        shape = tuple(img.shape[1:])
        if len(shape) != len(self.spatial_size):
            raise ValueError(
                f"image has {len(shape)} spatial dims, model expects "
                f"{len(self.spatial_size)} ({self.spatial_size})"
            )
        if shape == self.spatial_size:
            return img  # the common case for prepared sites: no interpolation at all
        zooms = np.asarray(getattr(img, "pixdim", np.ones(len(shape))), dtype=float)[: len(shape)]
        new = fitted_shape(shape, zooms, self.spatial_size)
        if new != shape:
            # "area" averages when shrinking (no aliasing); linear interpolation when growing.
            shrink = all(n <= s for n, s in zip(new, shape, strict=True))
            mode = "area" if shrink else ("bilinear" if len(shape) == 2 else "trilinear")
            img = Resize(new, mode="nearest-exact" if self.mask else mode)(img)
        background = 0.0 if self.mask else float(img.min())
        img = SpatialPad(self.spatial_size, mode="constant", value=background)(img)
        return CenterSpatialCrop(self.spatial_size)(img)


class IntensityByContent:
    """Non-CT intensity step: [0, 1] for label-like images, robust z-score for the rest.

    A binary image (e.g. a segmented organ, 0/255) has no tails to clip: the 0.5/99.5
    percentile clip maps a foreground under 0.5 % of the voxels to background (a blank image),
    and a z-score makes the foreground value depend on the organ's size (~13 at 0.6 %
    foreground, ~4 at 6 %), so size leaks into contrast. Scaling min..max to [0, 1] keeps a
    voxel's value = its occupancy. `mask=True` (modality "mask") does that for every image,
    e.g. multi-label maps; otherwise only images with at most two distinct values get it, so
    grey-value images (every 2D demo) go through the unchanged robust z-score.
    """

    def __init__(self, mask: bool = False):
        from monai.transforms import (
            ClipIntensityPercentiles,
            Compose,
            NormalizeIntensity,
            ScaleIntensity,
        )

        self.mask = mask
        self.unit = ScaleIntensity(minv=0.0, maxv=1.0)
        # Robust z-score: a few saturated voxels (implants, burnt-in text) must not squash the
        # contrast of everything else, so clip the tails before taking mean and std.
        self.zscore = Compose(
            [ClipIntensityPercentiles(lower=0.5, upper=99.5), NormalizeIntensity()]
        )

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        lo, hi = img.min(), img.max()
        if self.mask or bool(((img == lo) | (img == hi)).all()):
            return self.unit(img)
        return self.zscore(img)


def _to_plain_tensor(img: torch.Tensor) -> torch.Tensor:
    # Drop MONAI metadata: the cache and DataLoader want a plain contiguous float32 tensor.
    t = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
    return t.to(torch.float32).contiguous()


def build_transform(cfg: PreprocessConfig) -> Callable:
    """Preprocessing chain for cfg: nibabel image or numpy array -> (C, *spatial_size) float32."""
    # MONAI is imported here, not at module top: `fedvox validate` never preprocesses and
    # should not pay MONAI's import time.
    from monai.transforms import CastToType, Compose, ScaleIntensityRange

    if cfg.is_ct:
        lo, hi = cfg.ct_window
        intensity = [ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)]
    else:
        intensity = [IntensityByContent(mask=cfg.is_mask)]
    return Compose(
        [
            ToCanonicalChannelFirst(cfg.spatial_size),
            CastToType(dtype=np.float32),
            *intensity,
            FitToSize(cfg.spatial_size),
            _to_plain_tensor,
        ]
    )


def _to_label_tensor(mask: torch.Tensor) -> torch.Tensor:
    # uint8 keeps the caches small (validation allows at most 256 classes); load_site widens
    # to int64 for the loss and the metrics.
    return torch.round(_to_plain_tensor(mask)).to(torch.uint8).contiguous()


def build_mask_transform(cfg: PreprocessConfig) -> Callable:
    """Label-map chain for cfg: nibabel mask -> (1, *spatial_size) uint8, aligned with the
    image that `build_transform(cfg)` makes from the image of the same shape and affine."""
    from monai.transforms import Compose

    return Compose(
        [
            ToCanonicalChannelFirst(cfg.spatial_size),
            FitToSize(cfg.spatial_size, mask=True),
            _to_label_tensor,
        ]
    )
