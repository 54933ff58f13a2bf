"""Synthetic phantoms: the folder layout, shapes, a learnable label signal, non-IID sites."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.site import validate_site
from simulations import prepare
from simulations.phantoms.sites import PHANTOMS, make_phantom_sites


def load_site(site: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with open(site / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    images = np.stack(
        [
            nib.load(site / "images" / f"{r['case']}.nii.gz").get_fdata(dtype=np.float32)
            for r in rows
        ]
    )
    return images, np.array([int(r["label"]) for r in rows]), [r.get("split", "") for r in rows]


def blob_score(images: np.ndarray) -> np.ndarray:
    """Peak of the per-image robust z-scored image (undoes each site's offset and scale)."""
    flat = images.reshape(len(images), -1)
    z = (flat - np.median(flat, 1, keepdims=True)) / flat.std(1, keepdims=True)
    return z.max(1)


@pytest.fixture(scope="module")
def sites_2d(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("p2d") / "sites"
    make_phantom_sites("blobs-2d", out, hospitals=3, cases_per_site=80, holdout_cases=60, seed=1)
    return out


def test_registry():
    assert {"blobs-2d", "blobs-3d"} <= set(PHANTOMS)
    assert PHANTOMS["blobs-2d"].image_size == (28, 28)
    assert PHANTOMS["blobs-3d"].image_size == (32, 32, 32)


def test_2d_layout_and_counts(sites_2d):
    manifest = json.loads((sites_2d / "prepare.json").read_text())
    assert manifest["sites"] == ["hospital-1", "hospital-2", "hospital-3", "holdout"]
    for site in manifest["sites"]:
        images, labels, splits = load_site(sites_2d / site)
        assert images.shape[1:] == (28, 28)
        assert np.isfinite(images).all()
        assert manifest["counts"][site] == np.bincount(labels, minlength=2).tolist()
        assert len(set(labels)) == 2
        meta = json.loads((sites_2d / site / "dataset.json").read_text())
        assert meta["spatial_dims"] == 2 and meta["image_size"] == [28, 28]
        assert meta["task"] == "classification" and len(meta["class_names"]) == 2
        if site == "holdout":
            assert splits == [""] * 60
        else:
            assert len(labels) == 80 and {"train", "val"} == set(splits)


def test_2d_label_signal(sites_2d):
    images, labels = [], []
    for site in ["hospital-1", "hospital-2", "hospital-3", "holdout"]:
        x, y, _ = load_site(sites_2d / site)
        images.append(x)
        labels.append(y)
    images, labels = np.concatenate(images), np.concatenate(labels)
    score = blob_score(images)
    assert roc_auc_score(labels, score) > 0.9


def test_sites_are_not_iid(sites_2d):
    means = [load_site(sites_2d / f"hospital-{h}")[0].mean() for h in (1, 2, 3)]
    stds = [load_site(sites_2d / f"hospital-{h}")[0].std() for h in (1, 2, 3)]
    assert max(means) - min(means) > 5  # intensity offsets differ by tens of units
    assert max(stds) / min(stds) > 1.1


def test_3d_layout_shapes_and_signal(tmp_path):
    out = tmp_path / "p3d"
    counts = make_phantom_sites(
        "blobs-3d", out, hospitals=2, cases_per_site=12, holdout_cases=40, seed=0
    )  # fmt: skip
    assert list(counts) == ["hospital-1", "hospital-2", "holdout"]
    x, y, _ = load_site(out / "holdout")
    assert x.shape == (40, 32, 32, 32)
    assert json.loads((out / "holdout" / "dataset.json").read_text())["spatial_dims"] == 3
    assert roc_auc_score(y, blob_score(x)) > 0.9


def test_deterministic_for_a_seed(tmp_path):
    kw = dict(hospitals=2, cases_per_site=10, holdout_cases=5, image_size=(12, 12))
    make_phantom_sites("blobs-2d", tmp_path / "a", seed=3, **kw)
    make_phantom_sites("blobs-2d", tmp_path / "b", seed=3, **kw)
    make_phantom_sites("blobs-2d", tmp_path / "c", seed=4, **kw)
    a, b, c = (load_site(tmp_path / n / "hospital-2")[0] for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown phantom"):
        make_phantom_sites("lung-mri", tmp_path / "x", 2)
    with pytest.raises(ValueError, match="image_size"):
        make_phantom_sites("blobs-3d", tmp_path / "x", 2, image_size=(28, 28))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        make_phantom_sites("blobs-2d", tmp_path / "mine", 2, cases_per_site=4, holdout_cases=2)
    assert (tmp_path / "mine" / "keep.txt").exists()


def test_cli_phantom(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    argv = ["--phantom", "blobs-3d", "--out", str(tmp_path / "o"), "--hospitals", "2"]
    argv += ["--cases-per-site", "6", "--holdout-cases", "4", "--image-size", "10", "10", "10"]
    assert prepare.run(parser.parse_args(argv)) == 0
    assert "hospital-2" in capsys.readouterr().out
    assert nib.load(next((tmp_path / "o" / "hospital-1" / "images").iterdir())).shape == (
        10,
        10,
        10,
    )
    bad = parser.parse_args(["--phantom", "nope", "--out", str(tmp_path / "q")])
    assert prepare.run(bad) == 2
    assert "unknown phantom" in capsys.readouterr().err


def test_output_passes_the_reader_validation(sites_2d):
    from common import site as data

    for site in ["hospital-1", "holdout"]:
        report = data.validate_site(sites_2d / site)
        assert report.exit_code == 0, report.format(only_bad=True)
        assert report.spec.spatial_dims == 2


# ---------------------------------------------------------------------------------------------
# organ-3d / organ-ct-3d (issue 16): binary organ shapes with a subtle local abnormality


@pytest.fixture(scope="module")
def organ_sites(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("organ") / "sites"
    make_phantom_sites("organ-3d", out, hospitals=3, cases_per_site=14, holdout_cases=9, seed=2)
    return out


def test_organ_3d_volumes_labels_and_contract(organ_sites):
    from simulations.phantoms.organ import PREVALENCE

    manifest = json.loads((organ_sites / "prepare.json").read_text())
    assert manifest["sites"] == ["hospital-1", "hospital-2", "hospital-3", "holdout"]
    for site in manifest["sites"]:
        images, labels, splits = load_site(organ_sites / site)
        assert images.shape[1:] == (64, 64, 64)
        assert set(np.unique(images)) == {0.0, 255.0}  # binary 0/255
        foreground = (images > 0).mean(axis=(1, 2, 3))
        assert foreground.min() >= 0.002 and foreground.max() <= 0.06, foreground
        assert manifest["counts"][site] == np.bincount(labels, minlength=2).tolist()
        meta = json.loads((organ_sites / site / "dataset.json").read_text())
        assert meta["modality"] == "mask" and meta["image_size"] == [32, 32, 32]
        assert meta["task"] == "classification" and meta["spatial_dims"] == 3
        if site == "holdout":  # exactly round(22 % of 9) abnormal cases
            assert labels.sum() == round(PREVALENCE * 9) and splits == [""] * 9
        else:  # hospitals draw their prevalence around 22 %
            assert 2 <= labels.sum() <= 5 and {"train", "val"} == set(splits)
        report = validate_site(organ_sites / site)
        assert report.exit_code == 0, report.format(only_bad=True)


def test_organ_sites_differ_in_scanner_and_orientation(organ_sites):
    from common.transforms import to_canonical

    headers = [
        nib.load(next((organ_sites / f"hospital-{h}" / "images").iterdir())) for h in (1, 2, 3)
    ]
    geometry = {
        (nib.aff2axcodes(i.affine), tuple(np.round(i.header.get_zooms(), 3))) for i in headers
    }
    assert len(geometry) == 3  # voxel sizes (and here orientations) differ between hospitals
    assert len({nib.aff2axcodes(i.affine) for i in headers}) >= 2
    for img in headers:  # reoriented to RAS, the organ is near the centre whatever the storage
        data, _ = to_canonical(img)
        centre = np.argwhere(data > 0).mean(axis=0)
        assert np.all(np.abs(centre - 31.5) < 10), centre


def test_organ_abnormality_is_a_small_local_bump():
    from scipy.ndimage import distance_transform_edt

    from simulations.phantoms.organ import HOLDOUT_ORGAN_SITE, organ_mask

    for seed in range(4):
        normal = organ_mask(np.random.default_rng(seed), (64,) * 3, HOLDOUT_ORGAN_SITE, False) > 0
        bump = organ_mask(np.random.default_rng(seed), (64,) * 3, HOLDOUT_ORGAN_SITE, True) > 0
        added = bump & ~normal
        # Tens to a few hundred voxels added to a 1,000-5,000 voxel organ, near it, in one spot.
        assert 0 < added.sum() < min(400, 0.25 * normal.sum()) and not (normal & ~bump).any()
        # The ball (radius <= 5.5 mm, centre <= 0.6 radius out) stands <= 8.8 mm off the surface.
        assert distance_transform_edt(~normal)[added].max() <= 9
        spread = np.argwhere(added).std(axis=0)
        assert spread.max() < 4, spread


def test_organ_phantoms_are_deterministic_by_seed(tmp_path):
    kw = dict(hospitals=2, cases_per_site=3, holdout_cases=2)
    make_phantom_sites("organ-ct-3d", tmp_path / "a", seed=5, **kw)
    make_phantom_sites("organ-ct-3d", tmp_path / "b", seed=5, **kw)
    make_phantom_sites("organ-ct-3d", tmp_path / "c", seed=6, **kw)
    a, b, c = (load_site(tmp_path / n / "hospital-2")[0] for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # CT variant: HU, fat around a soft-tissue organ, int16 on disk
    first = next((tmp_path / "a" / "hospital-1" / "images").iterdir())
    assert nib.load(first).get_data_dtype() == np.int16
    assert -200 < np.median(a) < 0 and np.percentile(a, 99.9) > 0
    meta = json.loads((tmp_path / "a" / "holdout" / "dataset.json").read_text())
    assert meta["modality"] == "CT"


# lesion-ct-3d / lesion-mr-3d: a small lesion somewhere in an organ, CT in HU, MRI in scanner units


@pytest.mark.parametrize("name", ["lesion-ct-3d", "lesion-mr-3d"])
def test_lesion_sites_are_valid_nifti_with_shifted_scanners(tmp_path, name):
    out = tmp_path / name
    kw = dict(hospitals=3, cases_per_site=10, holdout_cases=10, image_size=(24, 24, 24))
    counts = make_phantom_sites(name, out, seed=3, **kw)
    ct = name == "lesion-ct-3d"
    grids, medians = set(), []
    for site in ["hospital-1", "hospital-2", "hospital-3", "holdout"]:
        assert validate_site(out / site).exit_code == 0
        meta = json.loads((out / site / "dataset.json").read_text())
        assert meta["modality"] == ("CT" if ct else "MR") and meta["task"] == "classification"
        images, labels, splits = load_site(out / site)
        assert counts[site] == np.bincount(labels, minlength=2).tolist()
        if site == "holdout":
            assert labels.sum() == 3 and splits == [""] * 10  # exactly 30 % positive
        first = nib.load(next((out / site / "images").iterdir()))
        assert first.get_data_dtype() == np.int16
        grids.add((images.shape[1:], nib.aff2axcodes(first.affine), first.header.get_zooms()))
        medians.append(float(np.median(images)))
    assert len(grids) == 4  # grid, voxel size or axis order differ between the sites
    if ct:  # HU: fat (-100) around a soft-tissue organ (60), calibration within 30 HU
        assert all(-150 < m < 100 for m in medians), medians
    else:  # arbitrary units: each scanner its own scale
        assert max(medians) > 1.5 * min(medians) and min(medians) > 0, medians


def test_a_lesion_is_small_inside_the_organ_and_the_only_difference():
    from simulations.phantoms.lesion import LESION_RADIUS_MM, anatomy, holdout_lesion_site

    site = holdout_lesion_site((64, 64, 64), mr=False)  # 1.5 mm voxels
    voxel = site.spacing[0] ** 3
    for seed in range(3):
        normal, _ = anatomy(np.random.default_rng(seed), site, False)
        found, _ = anatomy(np.random.default_rng(seed), site, True)
        lesion = found["lesion"]
        # the same anatomy; the lesion takes its place inside the organ and nothing else
        assert np.allclose(found["organ"] + lesion, normal["organ"])
        for k in ("fat", "kidney", "vessel"):
            assert np.array_equal(found[k], normal[k])
        volume = lesion.sum() * voxel  # mm^3: a ball of radius 2.5-6 mm, irregular
        assert 0.3 * 4 / 3 * np.pi * LESION_RADIUS_MM[0] ** 3 < volume
        assert volume < 3 * 4 / 3 * np.pi * LESION_RADIUS_MM[1] ** 3
        spread = np.argwhere(lesion > 0.5).std(axis=0) * site.spacing[0]
        assert spread.max() < 6, spread  # one spot, not scattered
