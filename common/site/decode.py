"""Stage 4, decoding: read one file's voxels, check them, preprocess them into its record.

Transforms are built lazily, on the first file that needs one: a fully cached load (and
`fedvox validate`, which wants no tensors) never imports MONAI.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from common.site.checks import data_reason, mask_data_problem, nonfinite_problem
from common.transforms import PreprocessConfig, build_mask_transform, build_transform


class Preprocessor:
    """One scan's preprocessing settings and its (lazily built) transforms.

    The size is the requested one, else dataset.json's; else it is settled by the first valid
    image (`settle`), so it is known before any tensor is made.
    """

    def __init__(self, want_tensors: bool, modality: str, size: tuple[int, ...] | None):
        self.want_tensors = want_tensors
        self.modality = modality
        self.cfg = PreprocessConfig(tuple(size), modality) if (want_tensors and size) else None
        self._key: str | None = None  # cfg.key() hashes JSON: once per scan, not per file
        self._transform: Callable | None = None
        self._mask_transform: Callable | None = None

    def settle(self, shape: tuple[int, ...]) -> None:
        """Without a size, the first valid image's (RAS) shape is the model input size."""
        if self.want_tensors and self.cfg is None:
            self.cfg = PreprocessConfig(shape, self.modality)

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = self.cfg.key()
        return self._key

    def needs_decode(self, rec: dict) -> bool:
        """Voxels not checked yet, or the record's tensor was made with other settings."""
        return not rec["decoded"] or (
            self.want_tensors and not rec["data_error"] and rec["prep"] != self.key
        )

    def image(self, img: nib.spatialimages.SpatialImage) -> torch.Tensor:
        if self._transform is None:
            self._transform = build_transform(self.cfg)
        return self._transform(img)

    def mask(self, img: nib.spatialimages.SpatialImage) -> torch.Tensor:
        if self._mask_transform is None:
            self._mask_transform = build_mask_transform(self.cfg)
        return self._mask_transform(img)


def decode_image(rec: dict, img: nib.spatialimages.SpatialImage, prep: Preprocessor) -> None:
    """Voxel checks (data_error) and, for training, the preprocessed tensor."""
    try:
        data = img.get_fdata(dtype=np.float32)  # nibabel keeps it for the transform
        rec["data_error"] = nonfinite_problem(data)
    except Exception as e:
        rec["data_error"] = data_reason(e)
    rec["decoded"] = True
    if prep.want_tensors and not rec["data_error"]:
        prep.settle(rec["shape"])
        try:
            rec["tensor"], rec["prep"] = prep.image(img), prep.key
        except Exception as e:
            rec["data_error"] = f"preprocessing failed: {type(e).__name__}: {e}"
    img.uncache()


def decode_mask(
    rec: dict,
    path: Path,
    class_names: tuple[str, ...],
    always: tuple[str, ...],
    prep: Preprocessor,
) -> None:
    """Segmentation: the mask's value checks, the labels present and its tensor."""
    rel = f"masks/{path.name}"
    mimg = nib.load(path)
    try:
        data = mimg.get_fdata(dtype=np.float32)
    except Exception as e:
        rec["mask_error"] = f"{rel}: {data_reason(e)}"
        return
    error, warning, present = mask_data_problem(data, class_names, always)
    rec["mask_error"] = f"{rel}: {error}" if error else ""
    rec["mask_warning"] = f"{rel}: {warning}" if warning else ""
    rec["mask_present"] = present
    if prep.want_tensors and not error and rec["tensor"] is not None:
        try:
            rec["mask_tensor"] = prep.mask(mimg)
        except Exception as e:
            rec["mask_error"] = f"{rel}: preprocessing failed: {type(e).__name__}: {e}"
    mimg.uncache()
