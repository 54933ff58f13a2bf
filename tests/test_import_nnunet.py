"""`fedvox import nnunet` on generated nnU-Net v2, v1 and MSD datasets (real NIfTI files)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.site import validate_site
from simulations.cli import main as fedvox

AFFINE = np.array([[1.5, 0, 0, -20], [0, 1.5, 0, 10], [0, 0, 2.0, -30], [0, 0, 0, 1]])


def _case(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume in HU: lung (-800) around a soft-tissue ball (label 1) with a dense
    nodule (label 2) at a random place."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    centre = rng.uniform(5, np.array(shape) - 5)
    ball = np.linalg.norm(grid - centre, axis=-1) < 4
    nodule = np.linalg.norm(grid - centre, axis=-1) < 1.6
    mask = ball.astype(np.uint8) + nodule.astype(np.uint8)
    image = np.where(ball, 40, -800) + np.where(nodule, 300, 0) + rng.normal(0, 20, shape)
    return image.astype(np.int16), mask


def make_dataset(
    root: Path,
    n: int = 6,
    layout: str = "v2",
    seed: int = 0,
    shape: tuple[int, ...] = (16, 16, 16),
    meta: dict | None = None,
) -> Path:
    """An nnU-Net v2 / v1 or MSD training set of n cases; `meta` overrides dataset.json keys."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n):
        case = f"lung_{seed}{i:03d}"
        image, mask = _case(rng, shape)
        suffix = "" if layout == "msd" else "_0000"
        nib.save(nib.Nifti1Image(image, AFFINE), root / "imagesTr" / f"{case}{suffix}.nii.gz")
        nib.save(nib.Nifti1Image(mask, AFFINE), root / "labelsTr" / f"{case}.nii.gz")
        training.append(
            {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
        )
    if layout == "v2":  # labels {name: value}, deliberately not in value order
        spec = {"channel_names": {"0": "CT"}, "labels": {"nodule": 2, "background": 0, "ball": 1},
                "numTraining": n, "file_ending": ".nii.gz"}  # fmt: skip
    else:  # MSD / nnU-Net v1: labels {value: name}
        spec = {"name": "Lung", "modality": {"0": "CT"}, "numTraining": n, "training": training,
                "labels": {"2": "nodule", "0": "background", "1": "ball"}}  # fmt: skip
    spec.update(meta or {})
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def _import(src: Path, site: Path, capsys, *extra: str) -> tuple[int, str]:
    code = fedvox(["import", "nnunet", str(src), "--out", str(site), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_nnunet_v2_dataset_becomes_a_site_that_validate_accepts(tmp_path, capsys):
    src = make_dataset(tmp_path / "Dataset001_Lung")
    code, out = _import(src, tmp_path / "site", capsys)
    assert code == 0, out
    assert "(nnU-Net v2)" in out and out.count("ok   case") == 6
    spec = json.loads((tmp_path / "site" / "dataset.json").read_text())
    assert spec == {"task": "segmentation", "class_names": ["background", "ball", "nodule"],
                    "modality": "CT", "spatial_dims": 3}  # fmt: skip
    image = tmp_path / "site" / "images" / "lung_0000.nii.gz"
    mask = tmp_path / "site" / "masks" / "lung_0000.nii.gz"
    assert image.is_symlink() and image.resolve() == src / "imagesTr" / "lung_0000_0000.nii.gz"
    assert mask.is_symlink() and mask.resolve() == src / "labelsTr" / "lung_0000.nii.gz"
    report = validate_site(tmp_path / "site")
    assert report.exit_code == 0, report.format()
    assert report.n_valid == 6 and report.class_counts == {"background": 6, "ball": 6, "nodule": 6}
    assert fedvox(["validate", str(tmp_path / "site")]) == 0
    # re-import: same site, nothing rewritten
    before = {p: os.lstat(p).st_mtime_ns for p in (tmp_path / "site").rglob("*")}
    assert _import(src, tmp_path / "site", capsys)[0] == 0
    assert {p: os.lstat(p).st_mtime_ns for p in (tmp_path / "site").rglob("*")} == before


@pytest.mark.parametrize("layout", ["msd", "v1"])
def test_msd_and_nnunet_v1_layouts_with_copies(tmp_path, capsys, layout):
    meta = {"modality": {"0": "MRI"}} if layout == "msd" else {}
    src = make_dataset(tmp_path / "Task02_Lung", n=3, layout=layout, meta=meta)
    code, out = _import(src, tmp_path / "site", capsys, "--copy")
    assert code == 0 and "(MSD / nnU-Net v1)" in out, out
    images = sorted((tmp_path / "site" / "images").iterdir())
    assert [p.name for p in images] == ["lung_0000.nii.gz", "lung_0001.nii.gz", "lung_0002.nii.gz"]
    suffix = "" if layout == "msd" else "_0000"
    for p in images:
        assert not p.is_symlink()
        assert (
            p.read_bytes()
            == (src / "imagesTr" / p.name.replace(".nii", f"{suffix}.nii")).read_bytes()
        )
    spec = json.loads((tmp_path / "site" / "dataset.json").read_text())
    assert spec["class_names"] == ["background", "ball", "nodule"]
    assert spec["modality"] == ("MRI" if layout == "msd" else "CT")
    assert validate_site(tmp_path / "site").exit_code == 0


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"channel_names": {"0": "T1", "1": "FLAIR"}}, "'FLAIR']; multi-channel datasets are not"),
        ({"labels": {"background": 0, "tumour": 2}}, "values [0, 2] must be 0..1 without gaps"),
        ({"labels": {"background": 0, "whole": [1, 2]}}, "label 'whole' is region-based"),
        ({"labels": {"background": 0, "organ": 1, "ignore": 2}}, "'ignore' label is not supported"),
        ({"file_ending": ".nrrd"}, "file_ending '.nrrd': only NIfTI"),
    ],
)  # fmt: skip
def test_unsupported_datasets_are_refused_naming_dataset_json(tmp_path, capsys, meta, message):
    src = make_dataset(tmp_path / "ds", n=2, meta=meta)
    code, out = _import(src, tmp_path / "site", capsys)
    assert code == 2 and f"{src / 'dataset.json'}: " in out and message in out, out
    assert not (tmp_path / "site").exists()


def test_bad_cases_are_skipped_with_their_reason(tmp_path, capsys):
    src = make_dataset(tmp_path / "ds", n=4)
    (src / "imagesTr" / "lung_0001_0000.nii.gz").unlink()
    nib.save(
        nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), AFFINE),
        src / "labelsTr" / "lung_0002.nii.gz",
    )
    shifted = AFFINE.copy()
    shifted[0, 3] += 5
    img = nib.load(src / "imagesTr" / "lung_0003_0000.nii.gz")
    nib.save(
        nib.Nifti1Image(np.asarray(img.dataobj), shifted),
        src / "imagesTr" / "lung_0003_0000.nii.gz",
    )
    code, out = _import(src, tmp_path / "site", capsys)
    assert code == 1, out
    assert "SKIP case lung_0001: image imagesTr/lung_0001_0000.nii.gz is missing" in out
    assert "SKIP case lung_0002: label shape (8, 8, 8) differs from the image's (16, 16, 16)" in out
    assert "SKIP case lung_0003: label affine differs from the image's" in out
    assert "1 case(s) imported, 3 skipped; 1 case(s) in the site" in out
    assert _import(tmp_path / "missing", tmp_path / "s2", capsys)[1].endswith(
        f"dataset folder {tmp_path / 'missing'} does not exist or is not a folder\n"
    )
    (tmp_path / "empty").mkdir()
    assert (
        "dataset.json: missing or not valid JSON"
        in _import(tmp_path / "empty", tmp_path / "s2", capsys)[1]
    )


def test_imported_nnunet_sites_train_a_segmentation_model_in_two_rounds(tmp_path, capsys):
    from simulations.harness.local import LocalFederation

    for seed, site in enumerate(("hospital-1", "hospital-2", "holdout")):
        src = make_dataset(tmp_path / "nnunet" / site, n=8, seed=seed)
        assert _import(src, tmp_path / "data" / site, capsys)[0] == 0
    with LocalFederation(tmp_path / "sim") as fed:
        result = fed.run(
            {
                "data-dir": str(tmp_path / "data"),
                "output-dir": str(tmp_path / "runs"),
                "run-name": "seg",
                "num-server-rounds": 2,
                "local-epochs": 1,
                "batch-size": 4,
                "learning-rate": 0.1,
                "target-delta": 1e-3,
            },
            num_supernodes=2,
            timeout=600,
        )
        assert result.returncode == 0, result.output[-6000:]
    assert fed.procs.alive_pids() == []
    summary = json.loads((tmp_path / "runs" / "seg" / "summary.json").read_text())
    assert summary["status"] == "finished", summary.get("error")
    assert summary["model"]["task"] == "segmentation"
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    # the 3D recipe scores its holdout after round 0, every 4th round and the last one
    assert [r["holdout_scored"] for r in summary["rounds"]] == [True, False, True]
    for r in (summary["rounds"][0], summary["rounds"][2]):
        assert {"dice-ball", "dice-nodule", "dice-mean"} <= set(r["central"]), r["central"]
    for site in ("hospital-1", "hospital-2"):
        assert summary["rounds"][2]["hospitals"][site]["status"] == "ok"
