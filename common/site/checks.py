"""Stage 2, the checks: header, label and mask problems -> one reason per file.

Every file is checked once and gets exactly one reason when bad; the same report serves
`fedvox validate` and training (which skips bad files, loudly). The header checks here read no
voxels; the voxel checks (NaN/Inf, mask values) run on data that decode.py has just decoded.
Differences between scanners (size, spacing, orientation, dtype, byte order) are not defects:
preprocessing absorbs them (common/transforms.py).

Segmentation masks sit beside their images (masks/<case>.nii[.gz]), hold integer labels
(0 = background, i = class_names[i]) and must share their image's shape and affine.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from common.site.index import SiteIndex, case_id
from common.site.report import CaseReport
from common.transforms import canonical_shape, effective_shape

AFFINE_TOLERANCE = 1e-3  # mm: a mask's affine may differ from its image's by float noise only


def header_reason(e: Exception) -> str:
    """The reason for a file whose header nibabel could not read."""
    msg = " ".join(str(e).split())  # one line per file in the report
    if "not a gzip file" in msg:
        return f"unreadable gzip (not a gzip file despite the .gz name): {msg}"
    if isinstance(e, (EOFError, OSError)) and not isinstance(e, nib.filebasedimages.ImageFileError):
        return f"unreadable or truncated file: {type(e).__name__}: {msg}"
    return f"not a NIfTI file: {msg}"


def data_reason(e: Exception) -> str:
    """The reason for a file whose voxels nibabel could not decode."""
    msg = " ".join(str(e).split())  # one line per file in the report
    if isinstance(e, EOFError) or "zlib" in type(e).__module__ or "Compressed file" in msg:
        return f"truncated or corrupt gzip: {type(e).__name__}: {msg}"
    return f"unreadable or truncated voxel data: {type(e).__name__}: {msg}"


def nonfinite_problem(data: np.ndarray) -> str:
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    return f"{bad} NaN/Inf voxels" if bad else ""


def _load_nifti_header(path: Path | str) -> nib.spatialimages.SpatialImage:
    img = nib.load(path)  # header only; voxels are read lazily
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise nib.filebasedimages.ImageFileError(f"{type(img).__name__}, not NIfTI")
    return img


def check_header(rec: dict, index: SiteIndex, name: str) -> nib.spatialimages.SpatialImage | None:
    """Fill a fresh record's header fields (header_error, shape, mask_error) from the image's
    and its mask's headers; return the image's header-only proxy (None when unreadable)."""
    img = None
    if case_id(name) is None:
        rec["header_error"] = "not a NIfTI file name (expected <case>.nii or <case>.nii.gz)"
    elif rec["size"] == 0:
        rec["header_error"] = "empty file (0 bytes)"
    else:
        try:
            img = _load_nifti_header(index.image_folder / name)
            rec["shape"] = effective_shape(img.shape)
            if len(rec["shape"]) in (2, 3):
                rec["shape"] = canonical_shape(img)
        except Exception as e:
            img = None
            rec["header_error"] = header_reason(e)
    if index.segmentation and not rec["header_error"]:
        cid = case_id(name) or name
        files = index.masks_by_case.get(cid, [])
        rec["mask_error"] = mask_header_problem(index.mask_folder, cid, files, img)
    return img


def mask_header_problem(folder: Path, cid: str, files: list[str], img) -> str:
    """Mask missing / duplicated / unreadable / not on its image's voxel grid (headers only)."""
    if not files:
        return f"mask missing (expected masks/{cid}.nii.gz)"
    if len(files) > 1:
        return f"duplicate masks for case {cid!r}: {', '.join('masks/' + f for f in files)}"
    rel = f"masks/{files[0]}"
    try:
        mask = _load_nifti_header(folder / files[0])
    except Exception as e:
        return f"{rel}: {header_reason(e)}"
    ms, im = effective_shape(mask.shape), effective_shape(img.shape)
    if ms != im:
        return f"{rel}: mask shape {ms} differs from the image's {im}"
    diff = float(np.abs(np.asarray(mask.affine) - np.asarray(img.affine)).max())
    if not diff <= AFFINE_TOLERANCE:
        return (
            f"{rel}: mask affine differs from the image's (max difference {diff:.4g}); "
            "mask and image must share one voxel grid"
        )
    return ""


def mask_data_problem(
    data: np.ndarray, class_names: tuple[str, ...], always: tuple[str, ...]
) -> tuple[str, str, list[int]]:
    """(error, warning, label values present) of a decoded mask."""
    bad = nonfinite_problem(data)
    if bad:
        return bad, "", []
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        example = float(data[rounded != data].flat[0])
        return f"non-integer label values (e.g. {example:g}); expected integer labels", "", []
    values = [int(v) for v in np.unique(rounded)]
    outside = [v for v in values if not 0 <= v < len(class_names)]
    if outside:
        return (
            f"labels {outside[:5]} are outside the declared classes "
            f"0..{len(class_names) - 1} {list(class_names)}",
            "",
            [],
        )
    missing = [a for a in always if class_names.index(a) not in values]
    warning = (
        f"mask has no {', '.join(missing)} voxels, but dataset.json says always_present"
        if missing
        else ""
    )
    return "", warning, values


def case_problems(index: SiteIndex, class_names: tuple[str, ...]) -> dict[str, str]:
    """Label-level problems (no decoding needed): case id -> its one reason."""
    problems: dict[str, str] = {}
    for cid in sorted(set(index.images_by_case) | set(index.rows_by_case)):
        problem = _case_problem(index, cid, class_names)
        if problem:
            problems[cid] = problem
    return problems


def _case_problem(index: SiteIndex, cid: str, class_names: tuple[str, ...]) -> str:
    files, rows = index.images_by_case.get(cid, []), index.rows_by_case.get(cid, [])
    if len(files) > 1:
        return f"duplicate case id {cid!r}: {len(files)} images ({', '.join(files)})"
    if len(rows) > 1:
        lines = ", ".join(str(r.line) for r in rows)
        return f"duplicate case id {cid!r} in labels.csv (lines {lines})"
    if not rows:
        if index.segmentation:  # the mask is the label; the row only fixes the split
            return ""
        return "image without a label (no row in labels.csv)"
    if rows[0].problem:
        return rows[0].problem
    if not index.segmentation and not 0 <= rows[0].label < len(class_names):
        return (
            f"label {rows[0].label} is outside the declared classes "
            f"0..{len(class_names) - 1} {list(class_names)}"
        )
    return ""


def reason_before_decoding(rec: dict, problem: str, site_dims: int) -> str:
    """The file's reason from its header, its case's labels, its mask header and its dims."""
    reason = rec["header_error"] or problem or rec.get("mask_error", "")
    if not reason and len(rec["shape"]) != site_dims:
        d = len(rec["shape"])
        kind = f"{d}D series" if d == 4 else f"{d}D image"
        reason = (
            f"{kind} of shape {rec['shape']} among {site_dims}D images "
            f"(the site has {site_dims} spatial dims)"
        )
    return reason


def label_only_reports(index: SiteIndex) -> list[CaseReport]:
    """labels.csv rows that name no image, and rows without a case id."""
    reports = [
        CaseReport(cid, "labels.csv", False, f"label for case {cid!r} without an image")
        for cid in sorted(set(index.rows_by_case) - set(index.images_by_case))
    ]
    reports += [CaseReport("", "labels.csv", False, r.problem) for r in index.rows if not r.case]
    return reports
