"""Small helpers that write real NIfTI files and hospital folders for tests (nibabel, no mocks).

write_nifti(path, array, affine=None)   -> path   (.nii or .nii.gz decided by the name)
make_site(root, {"case": (array, label), ...}, class_names=..., modality=..., split=...)
    -> root, with images/<case>.nii.gz, labels.csv and dataset.json (when class_names given)
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np


def write_nifti(path: Path | str, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), path)
    return path


def make_site(
    root: Path | str,
    cases: dict[str, tuple[np.ndarray, int]],
    class_names: list[str] | None = None,
    modality: str | None = None,
    spatial_dims: int | None = None,
    splits: dict[str, str] | None = None,
) -> Path:
    """A valid site; `splits` (case -> train|val|test) adds the split column."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = ["case,label,split" if splits else "case,label"]
    for case, (array, label) in cases.items():
        write_nifti(root / "images" / f"{case}.nii.gz", array)
        lines.append(f"{case},{label},{splits[case]}" if splits else f"{case},{label}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    spec = {"task": "classification"}
    if class_names is not None:
        spec["class_names"] = class_names
    if modality is not None:
        spec["modality"] = modality
    if spatial_dims is not None:
        spec["spatial_dims"] = spatial_dims
    if len(spec) > 1:
        (root / "dataset.json").write_text(json.dumps(spec))
    return root
