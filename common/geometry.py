"""Back from the model's grid to a file's own: the inverse of common/transforms.py's geometry.

Preprocessing (`build_transform`) reorients a file to RAS, resizes it keeping the physical
aspect (`fitted_shape`) and pads it to the model's input size. A prediction made on that grid
(a segmentation's class probabilities, a saliency map) is only useful to a clinician on the
file's own voxels, in the file's own affine, so a viewer overlays it on the scan. `FileGeometry`
records, from the header alone, every number the forward chain used and undoes the steps in
reverse order: crop the padding, resize back to the RAS shape, undo the reorientation, restore
the stored shape (including trailing singleton axes such as a 2D image stored as (X, Y, 1)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
from nibabel.orientations import apply_orientation, ornt_transform

from common.transforms import (
    canonical_shape,
    canonical_zooms,
    effective_shape,
    fitted_shape,
    io_ornt,
)

_RAS = np.array([[0, 1], [1, 1], [2, 1]])


@dataclass(frozen=True)
class FileGeometry:
    """Where a file's voxels went in preprocessing (header only, no voxels read)."""

    file_shape: tuple[int, ...]  # the stored shape, e.g. (X, Y, 1)
    effective: tuple[int, ...]  # without trailing singleton axes
    ornt: np.ndarray  # nibabel orientation: file axes -> RAS axes
    canonical: tuple[int, ...]  # the RAS shape preprocessing started from
    zooms: tuple[float, ...]  # RAS voxel sizes (mm), as the transform chain saw them
    spatial_size: tuple[int, ...]  # the model's input size

    @classmethod
    def of(cls, img: nib.spatialimages.SpatialImage, spatial_size: Sequence[int]) -> FileGeometry:
        eff = effective_shape(img.shape)
        return cls(
            tuple(int(s) for s in img.shape),
            eff,
            io_ornt(img.affine),
            canonical_shape(img),
            tuple(float(z) for z in canonical_zooms(img.affine, len(eff))),
            tuple(int(s) for s in spatial_size),
        )

    @property
    def resized(self) -> tuple[int, ...]:
        """The shape FitToSize resized the RAS image to, before padding."""
        if self.canonical == self.spatial_size:
            return self.canonical  # FitToSize leaves such an image alone
        return fitted_shape(self.canonical, self.zooms, self.spatial_size)

    def to_file_grid(self, maps: torch.Tensor) -> np.ndarray:
        """(C, *spatial_size) maps on the model grid -> (C, *file_shape) float32 on the file's
        voxels. Linear interpolation: pass probabilities (then argmax) for label maps."""
        maps = torch.as_tensor(maps, dtype=torch.float32)
        if tuple(maps.shape[1:]) != self.spatial_size:
            raise ValueError(f"expected maps of size {self.spatial_size}, got {tuple(maps.shape)}")
        maps = maps[(slice(None), *self._unpadded())]
        if tuple(maps.shape[1:]) != self.canonical:
            mode = "bilinear" if len(self.canonical) == 2 else "trilinear"
            maps = torch.nn.functional.interpolate(
                maps[None], size=self.canonical, mode=mode, align_corners=False
            )[0]
        return np.stack([self._unorient(m) for m in maps.numpy()]).astype(np.float32)

    def _unpadded(self) -> tuple[slice, ...]:
        """The region of the model grid that holds the image (SpatialPad's own pad widths)."""
        from monai.transforms import SpatialPad

        resized = self.resized
        widths = SpatialPad(self.spatial_size).compute_pad_width(resized)[1:]  # skip channel
        return tuple(
            slice(before, before + n) for (before, _after), n in zip(widths, resized, strict=True)
        )

    def _unorient(self, ras: np.ndarray) -> np.ndarray:
        """A RAS array (canonical shape) back to the file's axis order and stored shape."""
        data3 = ras if ras.ndim == 3 else np.expand_dims(ras, int(self.ornt[2, 0]))
        back = apply_orientation(data3, ornt_transform(_RAS, self.ornt))
        return np.ascontiguousarray(back).reshape(self.file_shape)


def like(img: nib.spatialimages.SpatialImage, data: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI with `data` on `img`'s grid: same shape and affine, so viewers overlay it."""
    out = nib.Nifti1Image(np.asarray(data), img.affine)
    out.header.set_xyzt_units("mm")
    out.set_qform(img.affine, code=1)
    out.set_sform(img.affine, code=1)
    return out
