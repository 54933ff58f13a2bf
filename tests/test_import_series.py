"""`fedvox import dicom`, series by series: radiographs and compressed transfer syntaxes through
the real dcm2niix, and the stack checks on real files (written with pydicom, then edited)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import OBLIQUE, write_radiograph, write_volume

from common.site import validate_site
from simulations.cli import main as fedvox


def _line(out: str, needle: str) -> str:
    hits = [line for line in out.splitlines() if needle in line]
    assert len(hits) == 1, (needle, out)
    return hits[0]


def test_radiographs_and_compressed_transfer_syntaxes(tmp_path, capsys):
    from pydicom.uid import JPEG2000Lossless, RLELossless

    pixels = (np.arange(64 * 48).reshape(64, 48) * 13) % 4096  # rows x columns
    src = tmp_path / "export"
    ws = {
        "plain": write_radiograph(src / "a", pixels, accession="ACC-2001"),
        "rle": write_radiograph(src / "b", pixels, transfer_syntax=RLELossless),
        # JPEG 2000 is encoded by pylibjpeg-openjpeg here and decoded by dcm2niix's OpenJPEG
        "j2k": write_radiograph(src / "c", pixels, transfer_syntax=JPEG2000Lossless, modality="CR"),
    }
    labels = tmp_path / "labels.csv"
    labels.write_text("study_uid,label,split\n" + "".join(
        f"{w.study_uid},{i % 2},{'val' if i == 2 else 'train'}\n" for i, w in enumerate(ws.values())
    ))  # fmt: skip
    argv = ["import", "dicom", str(src), "--out", str(tmp_path / "site"), "--labels", str(labels)]
    argv += ["--state-dir", str(tmp_path / "state"), "--modality", "DX", "--modality", "CR"]
    code = fedvox(argv + ["--class-names", "normal,abnormal"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("ok   case") == 3 and "64x48x1 ->" not in out and "48x64x1 ->" in out
    # a radiograph with text drawn into its pixels is never imported
    extra = {"BurnedInAnnotation": "YES"}
    write_radiograph(src / "d", pixels, description="Chest AP portable", extra=extra)
    code = fedvox(argv + ["--class-names", "normal,abnormal"])
    line = _line(capsys.readouterr().out, '"Chest AP portable"')
    assert code == 1 and "SKIP" in line and "burned-in annotation" in line
    images = sorted((tmp_path / "site" / "images").iterdir())
    arrays = [nib.load(p).get_fdata()[..., 0] for p in images]
    for a in arrays:  # dcm2niix's voxel order: columns along x, rows along y bottom-up
        np.testing.assert_array_equal(a, pixels.T[:, ::-1])
    spec = json.loads((tmp_path / "site" / "dataset.json").read_text())
    assert spec == {"task": "classification", "class_names": ["normal", "abnormal"],
                    "modality": "xray", "spatial_dims": 2}  # fmt: skip
    report = validate_site(tmp_path / "site")
    assert report.exit_code == 0 and report.n_valid == 3
    assert sorted(c.split for c in report.cases) == ["train", "train", "val"]


def _edit_positions(files, change) -> None:
    """Rewrite ImagePositionPatient / ImageOrientationPatient of real files with pydicom."""
    import pydicom

    for path in files:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("orientation", "inconsistent orientation within the series"),
        ("spacing", "inconsistent slice spacing (1.5 to 3.5 mm)"),
        ("duplicate", "1 slice(s) share a position with another: several volumes"),
        ("tilt", "slices are not stacked along their normal (gantry tilt or shear)"),
    ],
)
def test_stack_checks_name_orientation_spacing_position_and_tilt(tmp_path, kind, reason):
    from client.importers.dicom_scan import read_file, series_problem

    w = write_volume(tmp_path / "s", slices=8, slice_step=2.5, **OBLIQUE)
    normal = np.cross(w.row_dir, w.col_dir)
    assert series_problem([read_file(p, p.name) for p in w.files], ("CT",)) == ""  # as written

    def change(ds):
        k = int(ds.InstanceNumber) - 1
        pos = np.array(ds.ImagePositionPatient, float)
        if kind == "orientation" and k == 4:
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        elif kind == "spacing" and k == 4:
            pos = pos - 1.0 * normal  # gaps 1.5 and 3.5 around slice 5
        elif kind == "duplicate" and k == 4:
            pos = w.positions[3]
        elif kind == "tilt":
            pos = pos + k * 0.6 * w.col_dir  # each slice shifted along the gantry's tilt
        ds.ImagePositionPatient = [round(float(v), 6) for v in pos]

    _edit_positions(w.files, change)
    files = [read_file(p, p.name) for p in w.files]
    assert series_problem(files, ("CT",)).startswith(reason)
    _edit_positions(
        w.files, lambda ds: setattr(ds, "ImagePositionPatient", ds.ImagePositionPatient)
    )
    assert series_problem([read_file(p, p.name) for p in w.files], ("CT",)) != ""  # still bad
