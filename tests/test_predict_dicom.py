"""`fedvox predict` on DICOM series written with pydicom (tests/dicom_factory.py), converted by
the real dcm2niix, predicted by a real (briefly trained) model; the DICOM it writes is read back
with pydicom/highdicom.

* SEG: every frame on a source slice (0.01 mm), referencing a source instance, pixels where the
  NIfTI mask says and where the bright block is, segments named and coded, new UIDs per run;
  an axial and a coronal series with different rescale slopes / intercepts;
* SR: the probability of predictions.csv, the label, the model's identity and epsilon, the
  disclaimer, the study and series as evidence; the saliency parametric map on the slices;
* a scout and a series with a missing slice are skipped with import's own reasons;
* an enhanced multi-frame CT gets the SEG of its single-frame original.
"""

from __future__ import annotations

import csv
import re

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from common.predict import predict_fields
from common.tasks import ModelSpec, build_task_model
from common.transforms import PreprocessConfig, build_transform
from server.run_dir import RunDir
from simulations.cli import main as fedvox
from tests.dicom_factory import write_dicomdir, write_volume
from tests.nifti_factory import write_nifti

SIZE = (16, 16, 16)
CLASSES = ("background", "lung", "nodule")
SHAPE, SLICES = (20, 16), 24  # rows x columns, slices of the DICOM series
BLOCK = (slice(4, 12), slice(3, 10), slice(2, 8))  # (slices, rows, cols): the "nodule"
HU_AIR, HU_BODY, HU_NODULE = -1000.0, 40.0, 400.0
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"


def _block_hu() -> np.ndarray:
    """(slices, rows, cols) HU: air around a soft-tissue body holding a bright block."""
    hu = np.full((SLICES, *SHAPE), HU_AIR)
    hu[1:-1, 1:-1, 1:-1] = HU_BODY
    hu[BLOCK] = HU_NODULE
    return hu


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """A run folder with an untrained slice-unet whose final bias is centred on the block
    phantom, so that its masks hold every class in patches no mirror image repeats."""
    torch.manual_seed(0)
    prep = PreprocessConfig(SIZE, "CT")
    spec = ModelSpec("segmentation", 3, 1, 3, SIZE, arch="slice-unet", width=8)
    model = build_task_model(spec).eval()
    x = build_transform(prep)(_block_hu().astype(np.float32))[None]
    with torch.no_grad():
        logits = model(x)[0].flatten(1)
        model.unet.final_conv.bias -= logits.median(dim=1).values
    run = RunDir(tmp_path_factory.mktemp("seg-run"), {"config": {"dp": False}, "rounds": []})
    run.save_checkpoint(1, model.state_dict(), spec.as_dict(), best=True,
                        predict=predict_fields(prep, CLASSES, {}))  # fmt: skip
    return run.path


def _series(folder, orientation: str, slope: float, intercept: float, **kw):
    """The block phantom as a DICOM series: slice k, row r, column c = volume[k, r, c]."""
    hu = _block_hu()
    stored = np.rint((hu - intercept) / slope).astype(np.uint16)
    dirs = {
        "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
        "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    }[orientation]
    w = write_volume(folder, row_dir=dirs[0], col_dir=dirs[1], shape=SHAPE, slices=SLICES,
                     slope=slope, intercept=intercept, values=stored, **kw)  # fmt: skip
    return w, hu


def _own_nifti(w, hu: np.ndarray, path):
    """The series as a NIfTI built here, without the converter: voxel (i, j, k) = column i,
    row j of slice k, placed by the DICOM geometry (LPS -> RAS)."""
    affine = np.eye(4)
    affine[:3, 0] = w.row_dir * w.spacing[1]
    affine[:3, 1] = w.col_dir * w.spacing[0]
    affine[:3, 2], affine[:3, 3] = w.positions[1] - w.positions[0], w.positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return write_nifti(path, hu.transpose(2, 1, 0).astype(np.float32), affine)


def _pixel_to_voxel(ds, affine: np.ndarray) -> np.ndarray:
    """4x4: (column, row, 0, 1) of a source slice -> voxel of a NIfTI with this affine."""
    iop = np.asarray(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3] * dc, iop[3:] * dr
    lps[:3, 2], lps[:3, 3] = np.cross(iop[:3], iop[3:]), np.asarray(ds.ImagePositionPatient)
    return np.linalg.inv(affine) @ np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _expected(ds, mask: nib.Nifti1Image) -> np.ndarray:
    rows, cols = int(ds.Rows), int(ds.Columns)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    pix = np.stack([c.ravel(), r.ravel(), np.zeros(r.size), np.ones(r.size)])
    vox = np.rint(_pixel_to_voxel(ds, mask.affine) @ pix)[:3].astype(int)
    return np.asarray(mask.dataobj)[tuple(vox)].reshape(rows, cols)


def _seg_labels(seg, sources: dict) -> dict[str, np.ndarray]:
    """SOP instance UID -> the SEG's label map on that source slice (checks frame geometry)."""
    out = {uid: np.zeros((int(ds.Rows), int(ds.Columns)), np.uint8) for uid, ds in sources.items()}
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref in sources  # the frame derives from an instance of the source series
        pos = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        assert np.abs(pos - np.asarray(sources[ref].ImagePositionPatient, float)).max() <= 0.01
        segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        out[ref][seg.pixel_array[i] > 0] = segment
    return out


def _texts(item) -> list[str]:
    """Every TEXT value of an SR content tree."""
    out = [str(item.TextValue)] if "TextValue" in item else []
    for child in item.get("ContentSequence", []):
        out += _texts(child)
    return out


def _check_heat_map(stem, w) -> None:
    """A parametric map holding the saliency NIfTI's values on every source slice."""
    pm = pydicom.dcmread(f"{stem}_saliency.dcm")
    assert pm.SOPClassUID == PARAMETRIC_MAP and pm.StudyInstanceUID == w.study_uid
    heat = nib.load(f"{stem}_saliency.nii.gz")
    sources = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, w.files)}
    refs = []
    for i, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
        refs.append(
            frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        )
        pos = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        assert np.abs(pos - np.asarray(sources[refs[-1]].ImagePositionPatient, float)).max() <= 0.01
        want = _expected(sources[refs[-1]], heat).astype(np.float32)
        np.testing.assert_allclose(pm.pixel_array[i], want, rtol=1e-6)
    assert sorted(refs) == sorted(sources)


@pytest.mark.parametrize(
    "orientation, slope, intercept", [("axial", 1.0, -1024.0), ("coronal", 0.5, -2000.0)]
)
def test_a_seg_lies_on_the_source_slices_where_the_mask_is(
    seg_run, tmp_path, capsys, orientation, slope, intercept
):
    w, hu = _series(tmp_path / "export" / "series", orientation, slope, intercept)
    out = tmp_path / "out"
    argv = ["predict", "--run", str(seg_run), str(tmp_path / "export"), "--dicom"]
    argv += ["--saliency"] if orientation == "coronal" else []
    assert fedvox([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    case = re.search(r"predicted case (\w+) series 3 CT", printed).group(1)
    seg = hd.seg.segread(out / f"{case}_seg.dcm")
    sources = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, w.files)}
    first = next(iter(sources.values()))
    assert (seg.StudyInstanceUID, seg.PatientID) == (w.study_uid, first.PatientID)
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != w.series_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == w.series_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(CLASSES[1:])
    types = [s.SegmentedPropertyTypeCodeSequence[0] for s in seg.SegmentSequence]
    assert [(t.CodingSchemeDesignator, t.CodeValue) for t in types] == [
        ("SCT", "39607008"),  # Lung
        ("SCT", "27925004"),  # Nodule
    ]
    # pixels: exactly the NIfTI mask's voxels
    labels = _seg_labels(seg, sources)
    mask = nib.load(out / f"{case}_mask.nii.gz")
    by_slice = {}
    for uid, ds in sources.items():
        np.testing.assert_array_equal(labels[uid], _expected(ds, mask))
        by_slice[int(ds.InstanceNumber) - 1] = labels[uid]
    # the same prediction as on the series made into a NIfTI here (the model sees the same
    # voxels and Hounsfield units whatever axis order and flips the converter chose)
    stored = np.stack([w.stored[k] for k in range(SLICES)]) * slope + intercept
    own = _own_nifti(w, stored, tmp_path / "own" / "series.nii.gz")
    assert fedvox(["predict", "--run", str(seg_run), str(own), "--out", str(tmp_path / "o")]) == 0
    want = np.asarray(nib.load(tmp_path / "o" / "series_mask.nii.gz").dataobj).transpose(2, 1, 0)
    assert 0.1 < (want == 2).mean() < 0.6 and (want == 1).mean() > 0.1
    assert not np.array_equal(want, want[:, ::-1]) and not np.array_equal(want, want[::-1])
    np.testing.assert_array_equal(np.stack([by_slice[k] for k in range(SLICES)]), want)
    if orientation == "axial":  # a second run: the same result under new UIDs
        assert fedvox([*argv, "--out", str(tmp_path / "again")]) == 0
        again = hd.seg.segread(tmp_path / "again" / f"{case}_seg.dcm")
        assert again.SOPInstanceUID != seg.SOPInstanceUID
        assert again.SeriesInstanceUID != seg.SeriesInstanceUID
        assert again.StudyInstanceUID == seg.StudyInstanceUID
        np.testing.assert_array_equal(again.pixel_array, seg.pixel_array)
    else:  # P(foreground) as a parametric map
        _check_heat_map(out / case, w)


def test_a_classifier_writes_an_sr_and_a_heat_map_per_study(tmp_path, capsys):
    torch.manual_seed(1)
    prep = PreprocessConfig(SIZE, "CT")
    spec = ModelSpec("classification", 3, 1, 2, SIZE)
    summary = {
        "config": {"dp": True, "target-delta": 1e-5},
        "rounds": [
            {"round": 1, "hospitals": {"h1": {"epsilon_run": 3.5}, "h2": {"epsilon_run": 4.25}}},
            {"round": 2, "hospitals": {"h1": {"epsilon_run": 6.0}}},  # after the checkpoint
        ],
    }
    run = RunDir(tmp_path / "cls-run", summary)
    fields = predict_fields(prep, ("normal", "pneumonia"), {"threshold": 0.4, "temperature": 1.2})
    state = build_task_model(spec).state_dict()
    run.save_checkpoint(1, state, spec.as_dict(), best=True, predict=fields)
    run.write_summary()
    w, _ = _series(tmp_path / "export" / "s", "axial", 1.0, -1024.0)
    out = tmp_path / "out"
    argv = ["predict", "--run", str(run.path), str(tmp_path / "export"), "--out", str(out)]
    assert fedvox([*argv, "--dicom", "--saliency", "--checkpoint", "best"]) == 0
    row = next(csv.DictReader(open(out / "predictions.csv")))
    sr = hd.sr.srread(out / f"{row['case']}_sr.dcm")
    assert sr.StudyInstanceUID == w.study_uid and sr.SeriesInstanceUID != w.series_uid
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == w.study_uid
    refs = evidence.ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == w.series_uid
    sops = {r.ReferencedSOPInstanceUID for r in refs.ReferencedSOPSequence}
    assert sops == {pydicom.dcmread(f).SOPInstanceUID for f in w.files}
    group = sr.content.get_image_measurement_groups()[0]
    (measurement,) = group.get_measurements()
    assert measurement.value == pytest.approx(float(row["probability"]), abs=1e-9)
    assert "pneumonia" in measurement.name.meaning
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.value.meaning == row["class_name"]
    text = " ".join(_texts(sr))
    assert "not for diagnostic use" in text and "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    assert "cls-run" in text and "best.pt (round 1)" in text and "4.25 (delta 1e-05)" in text
    _check_heat_map(out / row["case"], w)
    assert "probability" in capsys.readouterr().out


def test_series_import_would_skip_are_skipped_with_its_reasons(seg_run, tmp_path, capsys):
    src = tmp_path / "export"
    good, _ = _series(src / "a" / "good", "axial", 1.0, -1024.0, number=3)
    write_volume(src / "a" / "scout", study_uid=good.study_uid, slices=2, number=1,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), seed=1)  # fmt: skip
    write_volume(src / "b", accession="ACC-0002", drop=(9,), number=7, seed=2)
    (src / "README.txt").write_text("exported by the PACS\n")
    write_dicomdir(src / "DICOMDIR")
    argv = ["import", "dicom", str(src), "--out", str(tmp_path / "site")]
    assert fedvox([*argv, "--state-dir", str(tmp_path / "state")]) == 1
    imported = capsys.readouterr().out
    out = tmp_path / "out"
    assert fedvox(["predict", "--run", str(seg_run), str(src), "--out", str(out)]) == 1
    printed = capsys.readouterr().out

    def reasons(text: str, tag: str) -> dict[str, str]:
        line = rf"^\s+{tag}\s+(?:case \w+ series (\S+) [^:]*|(file [^:]*)): (.*)$"
        found = re.findall(line, text, re.M)
        return {number or file: reason for number, file, reason in found}

    skipped = reasons(printed, "skipped")
    assert skipped == reasons(imported, "SKIP")
    assert "localiser / scout" in skipped["1"] and "missing slice" in skipped["7"]
    assert "not a DICOM file" in skipped["file README.txt"] and "file DICOMDIR" not in skipped
    assert "note: file DICOMDIR: DICOMDIR index" in printed
    assert re.search(r"predicted case \w+ series 3 CT", printed)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 1 and rows[0]["file"] == str(src / "a" / "good")


def test_an_enhanced_multiframe_ct_gets_the_seg_of_its_single_frame_original(seg_run, tmp_path):
    """The same slices in one multi-frame file (highdicom's legacy-converted enhanced CT):
    per-frame positions from the functional groups, frames of the one source instance."""
    w, _ = _series(tmp_path / "single" / "s", "axial", 1.0, -1024.0)
    legacy = [pydicom.dcmread(f) for f in w.files]
    for ds in legacy:  # Type 2 attributes the converter wants present
        ds.PatientSex, ds.StudyID, ds.ReferringPhysicianName = "", "", ""
    multi = hd.legacy.LegacyConvertedEnhancedCTImage(legacy, hd.UID(), 5, hd.UID(), 1)
    (tmp_path / "multi").mkdir()
    multi.save_as(tmp_path / "multi" / "ct.dcm")
    segs = {}
    for name in ("single", "multi"):
        argv = ["predict", "--run", str(seg_run), str(tmp_path / name), "--dicom"]
        assert fedvox([*argv, "--out", str(tmp_path / f"out-{name}")]) == 0
        seg = hd.seg.segread(next((tmp_path / f"out-{name}").glob("*_seg.dcm")))
        segs[name] = {}
        for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
            key = tuple(np.round(frame.PlanePositionSequence[0].ImagePositionPatient, 3))
            number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            segs[name][key, number] = seg.pixel_array[i]
    refs = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert [r.ReferencedSOPInstanceUID for r in refs] == [multi.SOPInstanceUID]
    assert segs["multi"].keys() == segs["single"].keys() and len(segs["multi"]) >= SLICES
    for key, pixels in segs["single"].items():
        np.testing.assert_array_equal(segs["multi"][key], pixels)
