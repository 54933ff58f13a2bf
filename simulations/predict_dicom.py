"""DICOM inputs of `fedvox predict`: a series folder, a study folder or a whole PACS export.

The series are found, checked and chosen by `fedvox import dicom`'s own code
(client/importers/dicom_scan.py, client/importers/dicom.py: one usable series per study, the
same reasons for every skipped one) and converted by the same dcm2niix call into a private
temporary folder, so the model sees the voxels, orientation and Hounsfield scaling a site
imported from the same export would hold. The prediction is then `common.predict.predict_file`
on that volume: the NIfTI outputs and the predictions.csv row are those of a NIfTI input.

With `--dicom` the results go back to DICOM (simulations/dicom_out.py) on the source's own
pixel grid: every pixel of every source frame is mapped through the frame's position,
orientation and spacing to the converted volume's voxel it is (dcm2niix keeps the pixels, so
each lands on a voxel centre; anything else is an error, never a resampling).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from client.importers import dicom_scan
from client.importers.dicom import SITE_MODALITY, Series, _group, _modalities, _select
from client.importers.dicom_convert import ConversionFailed, convert_series, converter
from client.importers.site import ImportInputError
from common.predict import InputError, Predictor, predict_file
from common.site.index import NIFTI_SUFFIXES

# Case names of predictions: a hash of the StudyInstanceUID (as import's case ids, but not
# keyed by a node's secret: predict has no state folder, and its outputs stay at the node).
CASE_KEY = b"fedvox predict"
ON_VOXEL = 0.05  # a source pixel more than this (in voxels) off a voxel centre: not the grid


class GeometryMismatch(Exception):
    """The converted volume does not hold the source frames' pixels."""


@dataclass
class DicomOptions:
    write_dicom: bool = False
    saliency: bool = False
    description: re.Pattern | None = None


def scan_input(path: Path) -> tuple[list, list] | None:
    """(DICOM files, file problems) of an input holding no NIfTI file; None if not DICOM."""
    path = Path(path)
    if path.is_dir():
        folder = path / "images" if (path / "images").is_dir() else path
        if any(p.name.endswith(NIFTI_SUFFIXES) for p in folder.iterdir()):
            return None
        files, problems = dicom_scan.scan_tree(path)
        return (files, problems) if files else None
    if not path.is_file() or path.name.endswith(NIFTI_SUFFIXES):
        return None
    try:
        return [dicom_scan.read_file(path, path.name)], []
    except dicom_scan.FileProblem:
        return None


def model_modalities(predictor: Predictor) -> tuple[str, ...]:
    """The DICOM modalities of the model's site modality (CT, MR, xray); () if unknown."""
    want = predictor.preprocess.modality.strip().lower()
    return tuple(m for m, site in SITE_MODALITY.items() if site.lower() == want)


def source_frames(sources: list) -> tuple[list, tuple[float, ...], int, int]:
    """(per-frame (IPP, IOP), pixel spacing, rows, cols) of the source instances."""
    geo = []
    for ds in sources:
        geo += dicom_scan._frame_geometry(ds, int(ds.get("NumberOfFrames", 1) or 1))
    first = sources[0]
    return geo, dicom_scan._spacing(first), int(first.Rows), int(first.Columns)


def on_source_frames(img: nib.Nifti1Image, sources: list) -> np.ndarray:
    """A volume on the converter's grid -> (frames, rows, cols), one value per source pixel."""
    geo, spacing, rows, cols = source_frames(sources)
    if spacing is None or any(p is None or o is None for p, o in geo):
        raise GeometryMismatch("the source has no pixel spacing / slice positions")
    data = np.asarray(img.dataobj)
    if data.ndim == 2:
        data = data[..., None]
    inverse = np.linalg.inv(img.affine)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    out = np.zeros((len(geo), rows, cols), data.dtype)
    for i, (ipp, iop) in enumerate(geo):
        lps = (
            np.asarray(ipp)
            + np.multiply.outer(c * spacing[1], iop[:3])
            + np.multiply.outer(r * spacing[0], iop[3:])
        )
        vox = (lps * [-1.0, -1.0, 1.0]) @ inverse[:3, :3].T + inverse[:3, 3]  # LPS -> RAS
        idx = np.rint(vox).astype(int)
        off = float(np.abs(vox - idx).max())
        inside = ((idx >= 0) & (idx < data.shape[:3])).all()
        if off > ON_VOXEL or not inside:
            raise GeometryMismatch(
                f"frame {i + 1} does not lie on the converted volume's voxels "
                f"({off:.2f} voxel off{'' if inside else ', outside'})"
            )
        out[i] = data[idx[..., 0], idx[..., 1], idx[..., 2]]
    return out


def _write_dicom(predictor, series: Series, result, out: Path, opts: DicomOptions) -> list[Path]:
    """The series' SEG (segmentation) or SR (classification) [+ heat map] next to its NIfTI
    outputs. A radiograph has no slice positions to put a SEG or map on: its SR only."""
    from simulations import dicom_out

    identity = dicom_out.ModelIdentity.of(
        predictor.source.parent.parent, predictor.source, predictor.round
    )
    sources = dicom_out.load_sources([f.path for f in series.files])
    stem, written = out / series.case, []
    if not predictor.segmentation:
        sr = Path(f"{stem}_sr.dcm")
        row, names, threshold = result.row, predictor.class_names, predictor.threshold
        written.append(dicom_out.write_sr(sr, sources, row, names, threshold, identity))
    maps = predictor.segmentation or opts.saliency
    if maps and series.first.modality in dicom_scan.MODALITIES_2D:
        print(f"  note: {series.name}: no DICOM SEG or heat map for a radiograph (no slice plane)")
        return written
    if predictor.segmentation:
        labels = on_source_frames(nib.load(f"{stem}_mask.nii.gz"), sources)
        seg = Path(f"{stem}_seg.dcm")
        written.append(dicom_out.write_seg(seg, sources, labels, predictor.class_names, identity))
    if opts.saliency:
        what = "P(foreground)" if predictor.segmentation else "Grad-CAM saliency"
        heat = on_source_frames(nib.load(f"{stem}_saliency.nii.gz"), sources)
        pm = Path(f"{stem}_saliency.dcm")
        written.append(dicom_out.write_heat_map(pm, sources, heat, what, identity))
    return written


def _predict_series(predictor, binary, series: Series, tmp: Path, out: Path, opts) -> tuple:
    """-> (predictions.csv row, the report line's detail) or an exception naming the reason."""
    nifti = tmp / f"{series.case}.nii.gz"
    two_d = series.first.modality in dicom_scan.MODALITIES_2D
    slices = 1 if two_d else sum(f.frames for f in series.files)
    convert_series(binary, [f.path for f in series.files], nifti, slices)
    try:
        result = predict_file(predictor, nifti, None, out, opts.saliency)
    except InputError as e:
        raise InputError(str(e).removeprefix(f"{nifti}: ")) from None
    result.row["file"] = os.path.commonpath([str(f.path.parent) for f in series.files])
    written = list(result.written)
    if opts.write_dicom:
        written += _write_dicom(predictor, series, result, out, opts)
    if predictor.segmentation:
        counts = [
            f"{k.removesuffix('_voxels')} {v}"
            for k, v in result.row.items()
            if k.endswith("_voxels")
        ]
        detail = ", ".join(counts[1:]) + " voxels"
    else:
        detail = f"probability {result.row['probability']:.3f}, {result.row['class_name']}"
    return result.row, f"{detail} -> {', '.join(p.name for p in written)}"


def predict_export(
    predictor: Predictor, root: Path, scanned: tuple[list, list], out: Path, opts: DicomOptions
) -> tuple[list[dict], int]:
    """Predict every usable series of a DICOM input; one printed line per series and per bad
    file. -> (predictions.csv rows, series or files not predicted)."""
    files, problems = scanned
    studies = _group(files, CASE_KEY)
    try:
        modalities = _modalities(studies, model_modalities(predictor))
        binary, version = converter()
    except ImportInputError as e:
        print(f"fedvox predict: {root}: {e}", file=sys.stderr)
        return [], 1
    print(f"fedvox predict: DICOM {root} (dcm2niix {version})")
    lines = [(f"file {rel}", False, p.reason) for rel, p in problems if not p.ignore]
    for rel, p in problems:
        if p.ignore:  # expected clutter (a DICOMDIR index): noted, not counted
            print(f"  note: file {rel}: {p.reason}")
    chosen = _select(studies, modalities, opts.description, None)
    done: dict[str, str] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedvox-predict-") as tmp:  # 0700
        for _study, series, _row in chosen:
            try:
                row, detail = _predict_series(predictor, binary, series, Path(tmp), out, opts)
            except (ConversionFailed, InputError, GeometryMismatch, OSError, ValueError) as e:
                series.problem = str(e)
                continue
            rows.append(row)
            done[series.first.series_uid] = detail
    for series in (s for group in studies.values() for s in group):
        detail = done.get(series.first.series_uid)
        lines.append((series.name, detail is not None, detail or series.problem or "not chosen"))
    for item, ok, detail in lines:
        print(f"  {'predicted' if ok else 'skipped  '} {item}: {detail}")
    return rows, sum(not ok for _, ok, _ in lines)
