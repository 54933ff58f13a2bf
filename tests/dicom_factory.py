"""Real DICOM files for tests, written with pydicom (proper file meta, patient coordinates).

write_volume(folder, ...)      -> Written: a CT/MR series, one file per slice, in shuffled order
write_radiograph(folder, ...)  -> Written: a one-image CR/DX series
write_report(folder, ...)      -> Written: a Basic Text SR (no pixel data)
write_dicomdir(path)           -> a DICOMDIR-class file (an export's index)

Every file carries a patient name, id, birth date and accession number, so tests can check
that none of them reaches a site.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

PATIENT = {
    "PatientName": "Kowalczyk^Annika",
    "PatientID": "PID-5550123",
    "PatientBirthDate": "19610203",
    "StudyDate": "20240517",
    "StudyTime": "134501",
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


def _rot(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


# An oblique, nearly sagittal plane for write_volume: the sagittal frame (rows along +y,
# columns along -z) rotated 20 degrees about x, then 15 degrees about z.
_R = _rot("z", 15) @ _rot("x", 20)
OBLIQUE = {"row_dir": _R @ [0.0, 1.0, 0.0], "col_dir": _R @ [0.0, 0.0, -1.0]}


@dataclass
class Written:
    study_uid: str
    series_uid: str
    accession: str
    files: list[Path] = field(default_factory=list)
    uids: list[str] = field(default_factory=list)  # every UID written (must never leak)
    stored: dict[int, np.ndarray] = field(default_factory=dict)  # slice index -> stored pixels
    positions: dict[int, np.ndarray] = field(default_factory=dict)  # slice index -> IPP (LPS)
    row_dir: np.ndarray | None = None  # IOP[:3]: direction of increasing column index
    col_dir: np.ndarray | None = None  # IOP[3:]: direction of increasing row index
    spacing: tuple[float, float] = (1.0, 1.0)  # PixelSpacing: (between rows, between columns)
    slope: float = 1.0
    intercept: float = 0.0


def _dataset(path: Path, sop_class: str, w: Written, modality: str, number: int) -> FileDataset:
    meta = FileMetaDataset()
    sop = generate_uid()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = w.study_uid, w.series_uid
    ds.AccessionNumber, ds.Modality, ds.SeriesNumber = w.accession, modality, number
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    w.uids.append(sop)
    return ds


def _pixels(ds: FileDataset, stored: np.ndarray, bits_stored: int = 16) -> None:
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.astype(np.uint16).tobytes()


def write_volume(
    folder: Path,
    *,
    study_uid: str | None = None,
    accession: str = "ACC-0001",
    slices: int = 24,
    shape: tuple[int, int] = (20, 16),
    row_dir=(0.0, 1.0, 0.0),
    col_dir=(0.0, 0.0, -1.0),
    spacing: tuple[float, float] = (0.8, 0.7),
    slice_step: float = 2.5,
    origin=(-40.0, 25.0, 60.0),
    slope: float = 0.5,
    intercept: float = -1024.0,
    modality: str = "CT",
    number: int = 3,
    description: str = "Thorax 2.5mm",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    sop_class: str = CTImageStorage,
    drop: tuple[int, ...] = (),
    seed: int = 0,
    values: np.ndarray | None = None,
) -> Written:
    """A series of parallel slices along row_dir x col_dir; files in shuffled order.
    `values`: the stored pixels, (slices, rows, cols); default a ramp unique per voxel."""
    folder.mkdir(parents=True, exist_ok=True)
    w = Written(study_uid or generate_uid(), generate_uid(), accession)
    w.uids += [w.study_uid, w.series_uid]
    w.row_dir, w.col_dir = np.array(row_dir, float), np.array(col_dir, float)
    w.spacing, w.slope, w.intercept = spacing, slope, intercept
    normal = np.cross(w.row_dir, w.col_dir)
    frame = generate_uid()
    w.uids.append(frame)
    order = [k for k in range(slices) if k not in drop]
    random.Random(seed).shuffle(order)
    rows, cols = shape
    for n, k in enumerate(order):
        path = folder / f"IM{seed:02d}{n:04d}"  # PACS exports often have no .dcm suffix
        ds = _dataset(path, sop_class, w, modality, number)
        ds.FrameOfReferenceUID, ds.InstanceNumber = frame, k + 1
        ds.SeriesDescription, ds.ImageType = description, list(image_type)
        w.positions[k] = np.array(origin, float) + k * slice_step * normal
        ds.ImagePositionPatient = [round(float(v), 6) for v in w.positions[k]]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing, ds.SliceThickness = list(spacing), slice_step
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if values is not None:
            w.stored[k] = np.asarray(values[k])
        else:
            ramp = np.arange(rows * cols).reshape(rows, cols)
            w.stored[k] = (k * rows * cols + ramp + 10) % 60000
        _pixels(ds, w.stored[k])
        ds.save_as(path, enforce_file_format=True)
        w.files.append(path)
    return w


def write_radiograph(
    folder: Path,
    pixels: np.ndarray,
    *,
    study_uid: str | None = None,
    accession: str = "ACC-0002",
    modality: str = "DX",
    number: int = 1,
    description: str = "Chest PA",
    transfer_syntax: str | None = None,
    name: str = "xray.dcm",
    extra: dict | None = None,
) -> Written:
    """One 2D projection image; `transfer_syntax`: compress it (RLE natively, JPEG 2000 with
    pylibjpeg-openjpeg)."""
    folder.mkdir(parents=True, exist_ok=True)
    w = Written(study_uid or generate_uid(), generate_uid(), accession)
    w.uids += [w.study_uid, w.series_uid]
    path = folder / name
    ds = _dataset(path, DigitalXRayImageStorageForPresentation, w, modality, number)
    ds.InstanceNumber, ds.SeriesDescription = 1, description
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImagerPixelSpacing = [0.2, 0.2]
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    _pixels(ds, pixels, bits_stored=12)
    if transfer_syntax is not None:
        ds.compress(transfer_syntax, np.asarray(pixels, dtype=np.uint16))
    ds.save_as(path, enforce_file_format=True)
    w.files.append(path)
    w.stored[0] = np.asarray(pixels)
    return w


def write_report(folder: Path, study_uid: str, accession: str = "ACC-0001") -> Written:
    folder.mkdir(parents=True, exist_ok=True)
    w = Written(study_uid, generate_uid(), accession)
    w.uids.append(w.series_uid)
    path = folder / "report.dcm"
    ds = _dataset(path, BASIC_TEXT_SR, w, "SR", 99)
    ds.SeriesDescription = "Radiology report"
    ds.save_as(path, enforce_file_format=True)
    w.files.append(path)
    return w


def write_dicomdir(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DICOMDIR_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.FileSetID = "EXPORT"
    ds.save_as(path, enforce_file_format=True)
    return path
