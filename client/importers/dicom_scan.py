"""Reading a DICOM export's headers and deciding which series can become a fedvox case.

pydicom reads every file once (the pixel bytes are read, never decoded: decoding, orientation,
slice order, rescaling to HU is the converter's job, see client/importers/dicom_convert.py).
What is kept per file is the handful of attributes the checks below need. A series is skipped,
with one reason, when it is not an original image acquisition of the wanted modality (structured
reports, secondary captures, derived reformats, localisers / scouts) or when it cannot be one
volume: inconsistent orientation, slices that share a position (echoes, phases, time points),
slices not stacked along their normal (gantry tilt), missing slices or uneven spacing. The
converter could paper over some of these (dcm2niix re-grids tilted or unevenly spaced stacks
into extra files); a training set should rather not contain them silently.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

MODALITIES_3D = ("CT", "MR")
MODALITIES_2D = ("CR", "DX")
MODALITIES = MODALITIES_3D + MODALITIES_2D
MIN_SLICES = 5  # fewer in a CT/MR series: a localiser / scout, not a volume
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants .7.1-.7.4
POSITION_MM = 0.01  # slice positions closer than this coincide
SPACING_REL = 0.01  # relative tolerance of the slice spacing


class FileProblem(Exception):
    """This file is not (usable) DICOM; `ignore`: expected clutter, noted but not counted."""

    def __init__(self, reason: str, ignore: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.ignore = reason, ignore


@dataclass
class DicomFile:
    path: Path
    rel: str  # path under the export folder (for the report when the file itself is bad)
    sop_class: str
    study_uid: str
    series_uid: str
    accession: str
    modality: str
    series_number: int | None
    description: str
    image_type: tuple[str, ...]
    rows: int
    cols: int
    samples: int
    frames: int
    pixel_problem: str  # "" when pixel data is present and complete (as far as headers tell)
    burned_in: bool  # BurnedInAnnotation YES: identifying text drawn into the pixels
    has_pixels: bool
    spacing: tuple[float, ...] | None
    geometry: list[tuple[tuple[float, ...] | None, tuple[float, ...] | None]]  # (IPP, IOP)/frame


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _frame_geometry(ds: pydicom.Dataset, frames: int) -> list:
    """(ImagePositionPatient, ImageOrientationPatient) of each frame; enhanced multi-frame
    files keep them in the per-frame / shared functional groups."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        geo = (
            _floats(ds.get("ImagePositionPatient"), 3),
            _floats(ds.get("ImageOrientationPatient"), 6),
        )
        return [geo] * frames if frames == 1 else [(None, geo[1])] * frames
    shared = (ds.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()])[0]
    out = []
    for item in ds.PerFrameFunctionalGroupsSequence:
        pos = item.get("PlanePositionSequence") or shared.get("PlanePositionSequence") or [{}]
        ori = item.get("PlaneOrientationSequence") or shared.get("PlaneOrientationSequence") or [{}]
        out.append(
            (
                _floats(pos[0].get("ImagePositionPatient"), 3),
                _floats(ori[0].get("ImageOrientationPatient"), 6),
            )
        )
    return out


def _spacing(ds: pydicom.Dataset) -> tuple[float, ...] | None:
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if ds.get(group):
            measures = ds[group][0].get("PixelMeasuresSequence")
            if measures:
                return _floats(measures[0].get("PixelSpacing"), 2)
    return _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)


def _pixel_problem(ds: pydicom.Dataset, frames: int) -> str:
    """Truncated native pixel data (pydicom reads a cut-off file without complaint)."""
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None or UID(ts).is_compressed:
        return ""  # encapsulated: the converter decodes it and reports a broken stream
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits < 8:
        return ""
    need = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames * bits // 8
    have = len(ds.PixelData)
    return f"truncated pixel data ({have} of {need} bytes)" if have < need else ""


def read_file(path: Path, rel: str) -> DicomFile:
    """The header facts of one file, or FileProblem naming why it cannot be used."""
    try:
        with warnings.catch_warnings():  # pydicom's warnings quote values (UIDs, names)
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise FileProblem("not a DICOM file (no DICOM preamble/'DICM' prefix)") from None
    except Exception as e:  # corrupt: pydicom raises many types on broken element headers
        raise FileProblem(f"unreadable DICOM ({type(e).__name__}: {e})") from None
    meta = getattr(ds, "file_meta", pydicom.Dataset())
    sop = str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")
    if sop == DICOMDIR_CLASS:
        raise FileProblem("DICOMDIR index (no image)", ignore=True)
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID") if not ds.get(k)]
    if missing or not sop:
        raise FileProblem(f"corrupt or truncated DICOM: no {', '.join(missing) or 'SOPClassUID'}")
    has_pixels = "PixelData" in ds and "Rows" in ds and "Columns" in ds
    frames = int(ds.get("NumberOfFrames", 1) or 1) if has_pixels else 0
    number = ds.get("SeriesNumber")
    return DicomFile(
        path=path,
        rel=rel,
        sop_class=sop,
        study_uid=str(ds.StudyInstanceUID).strip(),
        series_uid=str(ds.SeriesInstanceUID).strip(),
        accession=str(ds.get("AccessionNumber", "") or "").strip(),
        modality=str(ds.get("Modality", "") or "").strip().upper(),
        series_number=int(number) if number not in (None, "") else None,
        description=" ".join(str(ds.get("SeriesDescription", "") or "").split()),
        image_type=tuple(str(v).strip().upper() for v in (ds.get("ImageType") or [])),
        rows=int(ds.get("Rows", 0) or 0),
        cols=int(ds.get("Columns", 0) or 0),
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        frames=frames,
        pixel_problem=_pixel_problem(ds, frames) if has_pixels else "",
        burned_in=str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES",
        has_pixels=has_pixels,
        spacing=_spacing(ds),
        geometry=_frame_geometry(ds, frames) if has_pixels else [],
    )


def scan_tree(src: Path) -> tuple[list[DicomFile], list[tuple[str, FileProblem]]]:
    """Every regular file under `src` (hidden ones skipped), in path order."""
    files, problems = [], []
    for root, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            path = Path(root) / name
            rel = path.relative_to(src).as_posix()
            try:
                files.append(read_file(path, rel))
            except FileProblem as p:
                problems.append((rel, p))
    return files, problems


# ---------------------------------------------------------------------------------- series


def series_problem(files: list[DicomFile], modalities: tuple[str, ...]) -> str:
    """Why this series cannot be a case ("" if it can). `modalities`: the wanted ones."""
    first = files[0]
    if len({f.study_uid for f in files}) > 1:
        return "the files of this series name different studies"
    if not any(f.has_pixels for f in files):
        return f"no image data ({UID(first.sop_class).name})"
    for f in files:
        if not f.has_pixels:
            return f"file {f.rel} has no pixel data (truncated file?)"
        if f.pixel_problem:
            return f"file {f.rel}: {f.pixel_problem}"
    mods = sorted({f.modality for f in files})
    if len(mods) > 1:
        return f"mixed modalities {mods} in one series"
    if first.modality not in MODALITIES:
        return f"modality {first.modality or '(none)'} is not supported ({', '.join(MODALITIES)})"
    if first.modality not in modalities:
        return f"modality {first.modality}, not the requested {'/'.join(modalities)}"
    if any(f.sop_class.startswith(SECONDARY_CAPTURE) for f in files):
        return "secondary capture (a screenshot, not an acquisition)"
    types = {"\\".join(f.image_type) for f in files}
    if any("LOCALIZER" in f.image_type or "SCOUT" in f.image_type for f in files):
        return f"localiser / scout (ImageType {sorted(types)[0]})"
    if any(f.image_type[:1] == ("DERIVED",) for f in files):
        return f"derived image (ImageType {sorted(types)[0]}), e.g. a reformat or projection"
    if any(f.burned_in for f in files):
        return "burned-in annotation (BurnedInAnnotation YES: text in the pixels may identify)"
    if any(f.samples != 1 for f in files):
        return f"colour images ({first.samples} samples per pixel) are not supported"
    if len({(f.rows, f.cols) for f in files}) > 1:
        return "images of different sizes in one series"
    n = sum(f.frames for f in files)
    if first.modality in MODALITIES_2D:
        return "" if n == 1 else f"{n} images in one radiograph series (expected 1)"
    if n < MIN_SLICES:
        return f"only {n} slice(s): a localiser / scout, not a volume (fewer than {MIN_SLICES})"
    return _stack_problem(files)


def _stack_problem(files: list[DicomFile]) -> str:
    """A CT/MR series must be one evenly spaced stack of parallel slices."""
    geo = [g for f in files for g in f.geometry]
    if any(p is None or o is None for p, o in geo):
        return "no ImagePositionPatient / ImageOrientationPatient: the slices cannot be placed"
    if len({f.spacing for f in files}) > 1:
        return "different pixel spacings in one series"
    iop = np.array([o for _, o in geo])
    if np.abs(iop - iop[0]).max() > 1e-4:
        return "inconsistent orientation within the series (ImageOrientationPatient differs)"
    normal = np.cross(iop[0, :3], iop[0, 3:])
    if not 0.99 < np.linalg.norm(normal) < 1.01:
        return "ImageOrientationPatient is not two orthogonal unit vectors"
    pos = np.array([p for p, _ in geo])
    depth = pos @ normal
    order = np.argsort(depth, kind="stable")
    pos, depth = pos[order], depth[order]
    gaps = np.diff(depth)
    if (gaps < POSITION_MM).any():
        k = int((gaps < POSITION_MM).sum())
        return (
            f"{k} slice(s) share a position with another: several volumes in one series "
            "(echoes, phases or time points) are not supported"
        )
    rel = pos - pos[0]
    lateral = rel - np.outer(rel @ normal, normal)
    if np.linalg.norm(lateral, axis=1).max() > max(POSITION_MM, 1e-3 * abs(depth[-1] - depth[0])):
        return "slices are not stacked along their normal (gantry tilt or shear): not supported"
    step = float(np.median(gaps))
    tol = SPACING_REL * step + 1e-3
    if np.abs(gaps - step).max() <= tol:
        return ""
    ratio = gaps / step
    whole = np.rint(ratio)
    if (np.abs(ratio - whole) * step <= tol).all() and whole.min() >= 1:
        worst = int(np.argmax(gaps))
        return (
            f"missing slice(s): {int((whole - 1).sum())} absent from a stack spaced {step:.3g} mm "
            f"(gap of {gaps[worst]:.3g} mm after slice {worst + 1} of {len(depth)})"
        )
    return f"inconsistent slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm)"
