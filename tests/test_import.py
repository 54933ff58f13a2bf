"""`fedvox import dicom` on real DICOM files written with pydicom, converted by the real dcm2niix.

One module-level export holds what a PACS export holds: a CT study with an oblique, shuffled,
rescaled (slope 0.5, intercept -1024) series plus its scout and a structured report; a study with
a missing slice; a derived reformat; a study with two usable series; a radiograph; a study with
a truncated file; a DICOMDIR, a text file and random bytes.
"""

from __future__ import annotations

import gzip
import hmac
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import (
    OBLIQUE,
    PATIENT,
    write_dicomdir,
    write_radiograph,
    write_report,
    write_volume,
)

from common.site import validate_site
from simulations.cli import main as fedvox


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs") / "export"
    w = {}
    w["ct"] = write_volume(root / "A" / "s3", accession="ACC-1001", **OBLIQUE)
    study = w["ct"].study_uid
    w["scout"] = write_volume(
        root / "A" / "s1", study_uid=study, accession="ACC-1001", slices=2, number=1,
        description="Topogram", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), seed=1,
    )  # fmt: skip
    w["sr"] = write_report(root / "A" / "sr", study, "ACC-1001")
    w["gap"] = write_volume(root / "B", accession="ACC-1002", drop=(10,), seed=2)
    w["derived"] = write_volume(
        root / "C", accession="ACC-1003", image_type=("DERIVED", "SECONDARY", "MPR"), seed=3
    )
    w["lung"] = write_volume(
        root / "E" / "lung", accession="ACC-1004", description="Lung kernel", number=2, seed=4
    )
    w["soft"] = write_volume(
        root / "E" / "soft", study_uid=w["lung"].study_uid, accession="ACC-1004",
        description="Soft tissue", number=4, seed=5,
    )  # fmt: skip
    xray = (np.arange(64 * 64).reshape(64, 64) * 7) % 4000
    w["dx"] = write_radiograph(root / "F", xray, accession="ACC-1005")
    w["cut"] = write_volume(root / "G", accession="ACC-1006", seed=6)
    data = w["cut"].files[3].read_bytes()
    w["cut"].files[3].write_bytes(data[:-300])
    write_dicomdir(root / "DICOMDIR")
    (root / "readme.txt").write_text("exported by PACS viewer 3.1\n")
    (root / "F" / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(300))
    labels = root.parent / "labels.csv"
    labels.write_text("accession,label\nACC-1001,1\nACC-1002,0\nACC-1004,1\nACC-9999,0\n")
    return root, w, labels


def _import(export, tmp_path, *extra: str, capsys) -> tuple[int, str]:
    """`fedvox import dicom` of the export with its labels -> (exit code, stdout + stderr)."""
    root, _, labels = export
    argv = ["import", "dicom", str(root), "--out", str(tmp_path / "site"), "--labels"]
    argv += [str(labels), "--state-dir", str(tmp_path / "state"), *extra]
    code = fedvox(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _line(out: str, needle: str) -> str:
    hits = [line for line in out.splitlines() if needle in line]
    assert len(hits) == 1, (needle, out)
    return hits[0]


def test_oblique_ct_series_becomes_hu_volume_at_its_world_position(export, tmp_path, capsys):
    _, w, _ = export
    code, out = _import(export, tmp_path, "--modality", "CT", capsys=capsys)
    assert code == 1, out  # other series were skipped
    line = _line(out, '"Thorax 2.5mm": 16x20x24')
    case = line.split()[2]
    img = nib.load(tmp_path / "site" / "images" / f"{case}.nii.gz")
    data, inv = img.get_fdata(), np.linalg.inv(img.affine)
    ct = w["ct"]
    rows, cols = ct.stored[0].shape
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    checked = 0
    for k, ipp in ct.positions.items():
        # DICOM: pixel (row r, column c) of a slice lies at IPP + c*dc*row_dir + r*dr*col_dir (LPS)
        lps = (
            ipp
            + (c[..., None] * ct.spacing[1]) * ct.row_dir
            + (r[..., None] * ct.spacing[0]) * ct.col_dir
        )
        ras = lps * [-1.0, -1.0, 1.0]  # NIfTI world is RAS
        vox = (inv[:3, :3] @ ras.reshape(-1, 3).T).T + inv[:3, 3]
        assert np.abs(vox - np.rint(vox)).max() < 0.01
        i, j, z = np.rint(vox).astype(int).T
        hu = ct.stored[k].reshape(-1) * ct.slope + ct.intercept
        np.testing.assert_allclose(data[i, j, z], hu)
        checked += hu.size
    assert checked == 24 * 20 * 16
    assert data.min() == 10 * 0.5 - 1024  # HU, not the stored integers
    assert np.allclose(img.header.get_zooms(), (0.7, 0.8, 2.5), atol=1e-4)


def test_every_skipped_series_and_file_is_named_with_its_reason(export, tmp_path, capsys):
    code, out = _import(export, tmp_path, "--modality", "CT", capsys=capsys)
    assert code == 1
    expect = {
        '"Topogram"': "localiser / scout (ImageType ORIGINAL\\PRIMARY\\LOCALIZER)",
        '"Radiology report"': "no image data (Basic Text SR Storage)",
        "derived image": "ImageType DERIVED\\SECONDARY\\MPR",
        "missing slice": "1 absent from a stack spaced 2.5 mm",
        '"Lung kernel"': "one of 2 usable series of this study (series 2, 4); none chosen",
        '"Soft tissue"': "one of 2 usable series",
        '"Chest PA"': "modality DX, not the requested CT",
        "truncated pixel data": "G/IM060003",
        "file readme.txt": "not a DICOM file",
        "file F/noise.dcm": "not a DICOM file",
        "labels labels.csv line 5": "no study in the export has this accession",
    }
    for needle, reason in expect.items():
        line = _line(out, needle)
        assert "SKIP" in line and reason in line, line
    assert "note: file DICOMDIR: DICOMDIR index" in out
    assert "1 case(s) imported, 11 skipped; 1 case(s) in the site" in out
    # --series-description resolves the two-candidate study; the rest stays as it was
    code, out = _import(
        export, tmp_path, "--modality", "CT", "--series-description", "lung", capsys=capsys
    )
    assert code == 1 and "ok   case" in _line(out, '"Lung kernel"')
    assert "does not match --series-description" in _line(out, '"Soft tissue"')
    assert "2 case(s) in the site" in out
    report = validate_site(tmp_path / "site")
    assert report.exit_code == 0 and report.n_valid == 2
    assert sorted(c.label for c in report.cases) == [1, 1]


def _forbidden(w: dict) -> list[bytes]:
    values = [u for written in w.values() for u in written.uids]
    values += [written.accession for written in w.values()]
    values += list(PATIENT.values()) + ["Kowalczyk", "Annika"]
    return [v.encode() for v in values]


def test_no_identifier_anywhere_in_the_site_or_report(export, tmp_path, capsys):
    _, w, _ = export
    code, out = _import(export, tmp_path, "--modality", "CT", capsys=capsys)
    argv = ["import", "dicom", str(export[0]), "--out", str(tmp_path / "sites" / "dx")]
    code2 = fedvox(argv + ["--modality", "DX", "--state-dir", str(tmp_path / "state")])
    out2 = capsys.readouterr().out
    assert code == 1 and code2 == 1 and "no --labels: images written" in out2
    forbidden = _forbidden(w)
    files = [p for p in (tmp_path / "site").rglob("*") if p.is_file()]
    files += [p for p in (tmp_path / "sites" / "dx").rglob("*") if p.is_file()]
    assert len(files) == 7  # 2 images, labels.csv, 2 dataset.json, 2 import.json
    for p in files:
        blobs = [p.read_bytes()]
        if p.name.endswith(".gz"):
            blobs.append(gzip.decompress(blobs[0]))  # NIfTI header, descrip, extensions, voxels
            hdr = nib.load(p).header
            assert hdr["descrip"].tobytes().strip(b"\0") == b"" and not hdr.extensions
        for blob in blobs:
            for value in forbidden:
                assert value not in blob, (p, value)
    assert {p.name for p in files} - {"labels.csv", "dataset.json", "import.json"} == {
        p.name for p in files if p.name.endswith(".nii.gz")
    }  # no dcm2niix sidecar or other file
    for value in forbidden:
        assert value.decode() not in out + out2
    # the hospital's own mapping holds them (so the check above could have found them), privately
    mapping = (tmp_path / "state" / "import" / "cases.csv").read_bytes()
    assert w["ct"].accession.encode() in mapping and w["ct"].study_uid.encode() in mapping
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "import" / "cases.csv").st_mode) == 0o600


def test_case_ids_are_keyed_hashes_of_the_study_uid(export, tmp_path, capsys):
    _, w, _ = export
    _import(export, tmp_path, "--modality", "CT", capsys=capsys)
    salt_file = tmp_path / "state" / "import" / "salt"
    assert stat.S_IMODE(os.stat(salt_file).st_mode) == 0o600
    salt = bytes.fromhex(salt_file.read_text().strip())
    assert len(salt) == 32
    expected = hmac.new(salt, w["ct"].study_uid.encode(), "sha256").hexdigest()[:16]
    assert [p.name for p in (tmp_path / "site" / "images").iterdir()] == [f"{expected}.nii.gz"]
    # another node (another salt) gives the same study another id
    other = tmp_path / "other"
    assert fedvox(["import", "dicom", str(export[0]), "--out", str(other / "site"),
                   "--modality", "CT", "--state-dir", str(other / "state")]) == 1  # fmt: skip
    assert [p.name for p in (other / "site" / "images").iterdir()] != [f"{expected}.nii.gz"]
    os.chmod(salt_file, 0o644)  # a salt others can read is refused
    code, out = _import(export, tmp_path, "--modality", "CT", capsys=capsys)
    assert code == 2 and f"{salt_file} is readable by other users" in out and "chmod 600" in out


def _snapshot(site: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(site).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(site.rglob("*"))
        if p.is_file()
    }


def test_reimport_is_idempotent_and_foreign_or_changed_files_are_never_touched(
    export, tmp_path, capsys
):
    site = tmp_path / "site"
    code, out = _import(
        export, tmp_path, "--modality", "CT", "--series-description", "thorax|lung", capsys=capsys
    )
    assert code == 1 and "2 case(s) in the site" in out
    before = _snapshot(site)
    assert len([k for k in before if k.startswith("images/")]) == 2
    code, out = _import(
        export, tmp_path, "--modality", "CT", "--series-description", "thorax|lung", capsys=capsys
    )
    assert code == 1 and "2 case(s) in the site" in out
    assert _snapshot(site) == before  # same bytes, same mtimes: nothing rewritten, no duplicate
    # a file the import did not write: refused before any work, everything left as it was
    (site / "images" / "notes.txt").write_text("radiologist's notes\n")
    code, out = _import(export, tmp_path, "--modality", "CT", capsys=capsys)
    assert code == 2 and "holds files fedvox import did not write (images/notes.txt)" in out
    assert (site / "images" / "notes.txt").read_text() == "radiologist's notes\n"
    (site / "images" / "notes.txt").unlink()
    assert _snapshot(site) == before
    # a file it wrote but someone changed since: refused, kept
    (site / "labels.csv").write_text(before["labels.csv"][0].decode() + "extra,1\n")
    code, out = _import(export, tmp_path, "--modality", "CT", capsys=capsys)
    assert code == 2 and "labels.csv changed since fedvox import wrote it" in out
    assert (site / "labels.csv").read_text().endswith("extra,1\n")
    # a folder that fedvox import never wrote
    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "x.nii.gz").write_bytes(b"precious")
    code = fedvox(["import", "dicom", str(export[0]), "--out", str(foreign), "--modality", "CT",
                   "--state-dir", str(tmp_path / "state")])  # fmt: skip
    assert code == 2 and "not written by fedvox import" in capsys.readouterr().err
    assert [p.name for p in foreign.rglob("*")] == ["images", "x.nii.gz"]
    assert (foreign / "images" / "x.nii.gz").read_bytes() == b"precious"


def test_a_deleted_case_is_dropped_and_a_new_label_file_updates_labels(export, tmp_path, capsys):
    root, w, _ = export
    site = tmp_path / "site"
    _, out = _import(
        export, tmp_path, "--modality", "CT", "--series-description", "thorax|lung", capsys=capsys
    )
    lung, ct = (_line(out, needle).split()[2] for needle in ('"Lung kernel"', '"Thorax 2.5mm": 16'))
    labelled = "".join(f"{c},1\n" for c in sorted([lung, ct]))
    assert (site / "labels.csv").read_text() == "case,label\n" + labelled
    (site / "images" / f"{lung}.nii.gz").unlink()  # how a hospital removes a case
    labels = tmp_path / "relabel.csv"
    labels.write_text(f"study_uid,label\n{w['ct'].study_uid},0\n{w['lung'].study_uid},0\n")
    argv = ["import", "dicom", str(root), "--out", str(site), "--labels", str(labels)]
    argv += ["--state-dir", str(tmp_path / "state"), "--modality", "CT"]
    assert fedvox(argv) == 1  # without the description filter the lung study is skipped again
    out = capsys.readouterr().out
    assert "1 case(s) imported" in out and "1 case(s) in the site" in out
    assert (site / "labels.csv").read_text() == f"case,label\n{ct},0\n"  # relabelled, lung gone
    assert validate_site(site).exit_code == 0


@pytest.mark.parametrize(
    "content, message",
    [
        ("patient_id,label\nPID-5550123,1\n", "header must be one key column"),
        ("accession,study_uid,label\nA,1.2,1\n", "header must be one key column"),
        ("accession,label,comment\nACC-1001,1,x\n", "header must be one key column"),
        ("accession,label\nACC-1001,pneumonia\n", "line 2: label 'pneumonia' is not a class index"),
        ("accession,label\nACC-1001,1\nACC-1001,0\n", "line 3: the same accession as line 2"),
        ("accession,label,split\nACC-1001,1,holdout\n", "line 2: split 'holdout' is not one of"),
    ],
)
def test_bad_label_files_are_refused_naming_file_and_line(
    export, tmp_path, capsys, content, message
):
    labels = tmp_path / "bad-labels.csv"
    labels.write_text(content)
    argv = ["import", "dicom", str(export[0]), "--out", str(tmp_path / "site"), "--labels"]
    code = fedvox(argv + [str(labels), "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 2 and f"--labels {labels}" in err and message in err, err
    assert not (tmp_path / "site").exists()


def test_bad_inputs_name_the_folder_or_setting(export, tmp_path, capsys):
    root = export[0]
    out = str(tmp_path / "s")
    cases = [
        ([str(tmp_path / "nope"), "--out", out], f"DICOM folder {tmp_path / 'nope'} does not"),
        ([str(root), "--out", out, "--state-dir", str(tmp_path / "s" / "st")], "--state-dir"),
        ([str(root), "--out", str(root / "site")], "inside the DICOM folder"),
        ([str(root), "--out", out], "several modalities: CT (7 series), DX (1 series); choose"),
        ([str(root), "--out", out, "--labels", str(tmp_path / "none.csv")], "--labels"),
        ([str(root), "--out", out, "--labels", str(export[2]), "--class-names", "normal"],
         "--class-names names 1 classes but --labels"),
        ([str(root), "--out", out, "--modality", "CT", "--image-size", "64", "64"],
         "--image-size [64, 64]: the CT images are 3D"),
    ]  # fmt: skip
    for argv, message in cases:
        if "--state-dir" not in argv:
            argv += ["--state-dir", str(tmp_path / "state")]
        assert fedvox(["import", "dicom", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert not (tmp_path / "s").exists() and not (root / "site").exists()
    # nothing usable: exit 2, no site folder
    junk = tmp_path / "junk"
    write_report(junk / "a", "1.2.3.4", "ACC-3")
    (junk / "b.txt").write_text("x")
    assert (
        fedvox(
            [
                "import",
                "dicom",
                str(junk),
                "--out",
                str(tmp_path / "s"),
                "--state-dir",
                str(tmp_path / "state"),
            ]
        )
        == 2
    )
    assert "0 case(s) imported, 2 skipped" in capsys.readouterr().out
    assert not (tmp_path / "s").exists()


def test_an_import_killed_halfway_is_completed_by_the_next(export, tmp_path, capsys, monkeypatch):
    import common.site.writer as site_writer

    _import(export, tmp_path, "--modality", "CT", capsys=capsys)
    real_move, moved = site_writer._move, []

    def crash_on_second(src, dst):  # fault injection: the process dies after one file
        if moved:
            raise OSError("simulated crash")
        moved.append(dst)
        real_move(src, dst)

    monkeypatch.setattr(site_writer, "_move", crash_on_second)
    code, out = _import(
        export, tmp_path, "--modality", "CT", "--series-description", "thorax|lung", capsys=capsys
    )
    assert code == 2 and "simulated crash" in out and len(moved) == 1
    monkeypatch.setattr(site_writer, "_move", real_move)
    code, out = _import(
        export, tmp_path, "--modality", "CT", "--series-description", "thorax|lung", capsys=capsys
    )
    assert code == 1 and "2 case(s) in the site" in out, out
    assert validate_site(tmp_path / "site").n_valid == 2
    assert not list(tmp_path.glob(".site.import-*"))  # no staging folder left behind
