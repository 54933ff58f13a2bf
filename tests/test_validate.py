"""Validation: a corpus with every defect gets one named reason per bad file; exit codes 0/1/2."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nifti_factory import make_site, write_nifti

from common.site import DataError, read_spec, validate_site
from simulations.cli import main

RNG = np.random.default_rng(0)


def img2d(shape=(8, 8)) -> np.ndarray:
    return RNG.random(shape).astype(np.float32)


def good_site(root: Path, n: int = 4) -> Path:
    return make_site(root, {f"ok{i}": (img2d(), i % 2) for i in range(n)}, class_names=["a", "b"])


# file (relative to the site) -> a word its one reason must contain
EXPECTED_BAD = {
    "images/empty.nii.gz": "0 bytes",
    "images/text.nii": "not a NIfTI",
    "images/textgz.nii.gz": "gzip",
    "images/truncgz.nii.gz": "truncated",
    "images/truncraw.nii": "truncated",
    "images/vol3d.nii.gz": "3D image",
    "images/nan.nii.gz": "NaN/Inf",
    "images/inf.nii.gz": "NaN/Inf",
    "images/nolabel.nii.gz": "without a label",
    "labels.csv": "label for case 'ghost' without an image",
    "images/outside.nii.gz": "outside the declared classes",
    "images/notint.nii.gz": "not an integer",
    "images/dup.nii": "duplicate case id",
    "images/dup.nii.gz": "duplicate case id",
    "images/duprow.nii.gz": "duplicate case id",
    "images/readme.txt": "not a NIfTI file name",
}


def bad_corpus(root: Path) -> tuple[Path, set[str]]:
    site = good_site(root)
    im = site / "images"
    # Differences between scanners are NOT defects: size, spacing, orientation, dtype, byte order.
    write_nifti(im / "big.nii.gz", img2d((12, 10)), np.diag([0.5, 0.7, 1, 1]))
    write_nifti(im / "flipped.nii", img2d(), np.diag([-1.0, -1, 1, 1]))
    write_nifti(im / "bigendian.nii.gz", (RNG.random((8, 8)) * 900).astype(">i2"))
    write_nifti(im / "uint8.nii.gz", (RNG.random((8, 8, 1)) * 255).astype(np.uint8))  # (X,Y,1)
    good = {f"images/ok{i}.nii.gz" for i in range(4)} | {
        "images/big.nii.gz",
        "images/flipped.nii",
        "images/bigendian.nii.gz",
        "images/uint8.nii.gz",
    }
    (im / "empty.nii.gz").write_bytes(b"")
    (im / "text.nii").write_text("this is not an image\n" * 40)
    (im / "textgz.nii.gz").write_text("neither is this\n" * 40)
    full = write_nifti(im / "full.nii.gz", img2d((64, 64))).read_bytes()
    (im / "full.nii.gz").unlink()
    (im / "truncgz.nii.gz").write_bytes(full[: len(full) // 2])
    raw = write_nifti(im / "truncraw.nii", img2d((64, 64))).read_bytes()
    (im / "truncraw.nii").write_bytes(raw[: len(raw) - 2000])
    write_nifti(im / "vol3d.nii.gz", RNG.random((8, 8, 8)).astype(np.float32))
    nan, inf = img2d(), img2d()
    nan[2, 3], inf[0, 0] = np.nan, -np.inf
    write_nifti(im / "nan.nii.gz", nan)
    write_nifti(im / "inf.nii.gz", inf)
    for name in ("nolabel", "outside", "notint", "duprow"):
        write_nifti(im / f"{name}.nii.gz", img2d())
    write_nifti(im / "dup.nii", img2d())
    write_nifti(im / "dup.nii.gz", img2d())
    (im / "readme.txt").write_text("notes")
    (im / ".DS_Store").write_bytes(b"\0")  # hidden files are ignored, not reported
    rows = [
        "big,0",
        "flipped,1",
        "bigendian,0",
        "uint8,1",
        "empty,0",
        "text,0",
        "textgz,1",
        "truncgz,0",
        "truncraw,1",
        "vol3d,0",
        "nan,1",
        "inf,0",
        "ghost,1",
        "outside,7",
        "notint,one",
        "dup,0",
        "duprow,1",
        "duprow,1",
    ]
    with open(site / "labels.csv", "a") as f:
        f.write("\n".join(rows) + "\n")
    return site, good


def test_bad_corpus_one_named_reason_per_file(tmp_path):
    site, good = bad_corpus(tmp_path / "site")
    report = validate_site(site)
    by_file: dict[str, list] = {}
    for r in report.reports:
        by_file.setdefault(r.file, []).append(r)
    assert {f for f, rs in by_file.items() if all(r.ok for r in rs)} == good
    assert {f for f, rs in by_file.items() if not any(r.ok for r in rs)} == set(EXPECTED_BAD)
    for f, word in EXPECTED_BAD.items():
        assert len(by_file[f]) == 1, (f, by_file[f])  # exactly one reason per bad file
        assert word in by_file[f][0].reason, (f, by_file[f][0].reason)
    assert report.n_valid == len(good) and report.n_bad == len(EXPECTED_BAD)
    assert report.class_counts == {"a": 4, "b": 4}
    assert report.spec.spatial_dims == 2  # the majority, as dataset.json does not say
    assert report.exit_code == 1
    text = report.format()
    assert (
        "BAD  images/nan.nii.gz" in text and f"{len(good)} valid, {len(EXPECTED_BAD)} bad" in text
    )


def test_4d_series_among_3d_volumes(tmp_path):
    vols = {f"v{i}": (RNG.random((6, 6, 6)).astype(np.float32), 0) for i in range(3)}
    site = make_site(tmp_path / "s3", vols, class_names=["x"], spatial_dims=3)
    write_nifti(site / "images" / "series.nii.gz", RNG.random((6, 6, 6, 3)).astype(np.float32))
    write_nifti(site / "images" / "flat.nii.gz", img2d((6, 6)))
    with open(site / "labels.csv", "a") as f:
        f.write("series,0\nflat,0\n")
    report = validate_site(site)
    reasons = {r.file: r.reason for r in report.reports if not r.ok}
    assert set(reasons) == {"images/series.nii.gz", "images/flat.nii.gz"}
    assert "4D series" in reasons["images/series.nii.gz"]
    assert "2D image" in reasons["images/flat.nii.gz"]
    assert report.n_valid == 3


def test_missing_parts_and_bad_json_name_the_file(tmp_path):
    site = good_site(tmp_path / "s")
    shutil.rmtree(site / "images")
    with pytest.raises(DataError, match="images/"):
        validate_site(site)
    site = good_site(tmp_path / "s2")
    (site / "labels.csv").unlink()
    with pytest.raises(DataError, match="labels.csv"):
        validate_site(site)
    site = good_site(tmp_path / "s3")
    (site / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset.json"):
        validate_site(site)
    (site / "dataset.json").write_text(json.dumps({"spatial_dims": 5}))
    with pytest.raises(DataError, match="spatial_dims"):
        read_spec(site)


def test_inferred_spec(tmp_path):
    site = make_site(tmp_path / "s", {"a": (img2d(), 0), "b": (img2d(), 2)})
    assert not (site / "dataset.json").exists()
    spec = read_spec(site)
    assert spec.class_names == ("0", "1", "2") and spec.spatial_dims == 2
    assert spec.modality == "other" and spec.task == "classification"


def test_cli_exit_codes(tmp_path, capsys):
    ok = good_site(tmp_path / "ok")
    assert main(["validate", str(ok)]) == 0
    out = capsys.readouterr().out
    assert "4 valid, 0 bad" in out and "a=2, b=2" in out
    some, _ = bad_corpus(tmp_path / "some")
    assert main(["validate", str(some), "--bad-only"]) == 1
    out = capsys.readouterr().out
    assert "BAD  images/empty.nii.gz" in out and "ok   images" not in out
    none = tmp_path / "none"
    (none / "images").mkdir(parents=True)
    (none / "images" / "a.nii.gz").write_bytes(b"")
    (none / "labels.csv").write_text("case,label\na,0\n")
    assert main(["validate", str(none)]) == 2
    assert main(["validate", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_console_script(tmp_path):
    exe = Path(sys.executable).parent / "fedvox"
    if not exe.exists():
        exe = shutil.which("fedvox")
    if exe is None:
        pytest.skip("console script not installed (pip install -e .)")
    site, _ = bad_corpus(tmp_path / "s")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(exe), "validate", str(site)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 1, proc.stderr
    assert "NaN/Inf" in proc.stdout and "8 valid" in proc.stdout


def test_gzip_of_non_nifti_is_named(tmp_path):
    site = good_site(tmp_path / "s")
    (site / "images" / "zz.nii.gz").write_bytes(gzip.compress(b"x" * 500))
    with open(site / "labels.csv", "a") as f:
        f.write("zz,0\n")
    bad = [r for r in validate_site(site).reports if not r.ok]
    assert [r.file for r in bad] == ["images/zz.nii.gz"] and "not a NIfTI" in bad[0].reason
    assert nib.load(site / "images" / "ok0.nii.gz").shape == (8, 8)
