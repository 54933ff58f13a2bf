"""`fedvox prepare`: partitions, the written hospital folders, safety of the output folder."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common import datasets
from simulations import prepare
from simulations.prepare import (
    DEFAULT_SOURCE,
    ensure_demo_data,
    format_class_table,
    partition_indices,
    prepare_from_npz,
)

ROOT = Path(__file__).resolve().parents[1]


def read_labels(site: Path) -> list[dict[str, str]]:
    with open(site / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_case(site: Path, case: str) -> np.ndarray:
    """The case as stored, back in numpy (H, W[, D]) order (prepare reverses the axes)."""
    return np.asarray(nib.load(site / "images" / f"{case}.nii.gz").dataobj).T


def site_pairs(site: Path) -> Counter:
    """Multiset of (image bytes, label) of a written site."""
    return Counter(
        (read_case(site, r["case"]).tobytes(), int(r["label"])) for r in read_labels(site)
    )


def npz_pairs(images: np.ndarray, labels: np.ndarray) -> Counter:
    return Counter((x.tobytes(), int(y)) for x, y in zip(images, labels.reshape(-1), strict=True))


def mean_tv_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance of each hospital's label distribution from the global one."""
    k = labels.max() + 1
    glob = np.bincount(labels, minlength=k) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - glob).sum() for p in parts]
    return float(np.mean(tv))


def write_npz(path: Path, n=(120, 30, 40), shape=(12, 10), classes=3, seed=0, **override):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, m in zip(("train", "val", "test"), n, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (m, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes, (m, 1), dtype=np.uint8)
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def vendored() -> dict[str, np.ndarray]:
    with np.load(DEFAULT_SOURCE) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    # The one full-size run (5,855 NIfTI files, ~5 s here): through ensure_demo_data, which is
    # prepare_from_npz(vendored npz, 5 hospitals, dirichlet 0.5, seed 0).
    return ensure_demo_data(tmp_path_factory.mktemp("demo") / "sites", hospitals=5)


# ----------------------------------------------------------------------------- full dataset


def test_vendored_npz_is_the_documented_file():
    assert datasets._sha256(DEFAULT_SOURCE) == (
        "8821e51f95ef260032fbdc2a85ab2d41017ef1ea16ebdaa2f75c06f55635766b"
    )
    assert (
        "8821e51f95ef260032fbdc2a85ab2d41017ef1ea16ebdaa2f75c06f55635766b"
        in (DEFAULT_SOURCE.parent / "README.md").read_text()
    )


def test_demo_layout_and_metadata(demo):
    assert sorted(p.name for p in demo.iterdir()) == [
        "holdout",
        *[f"hospital-{h}" for h in range(1, 6)],
        "prepare.json",
    ]
    for site in sorted(demo.glob("hospital-*")) + [demo / "holdout"]:
        meta = json.loads((site / "dataset.json").read_text())
        assert meta == {
            "task": "classification",
            "class_names": ["normal", "pneumonia"],
            "modality": "xray",
            "spatial_dims": 2,
            "image_size": [28, 28],
        }
        rows = read_labels(site)
        files = sorted(p.name for p in (site / "images").iterdir())
        assert files == sorted(f"{r['case']}.nii.gz" for r in rows)
        assert all(r["case"] == f"case-{i:06d}" for i, r in enumerate(rows, start=1))
        img = nib.load(site / "images" / files[0])
        assert img.shape == (28, 28) and img.get_data_dtype() == np.uint8
        assert np.allclose(img.affine, np.eye(4))
        if site.name == "holdout":
            assert set(rows[0]) == {"case", "label"}
        else:
            splits = Counter(r["split"] for r in rows)
            assert set(splits) == {"train", "val"}
            assert 0.10 < splits["val"] / len(rows) < 0.20


def test_demo_hospitals_are_a_partition_of_train_val_and_holdout_is_test(demo, vendored):
    # Compares every written image and label with the npz: disjoint + covering + pixel-exact.
    pooled = npz_pairs(
        np.concatenate([vendored["train_images"], vendored["val_images"]]),
        np.concatenate([vendored["train_labels"], vendored["val_labels"]]),
    )
    written = Counter()
    for site in sorted(demo.glob("hospital-*")):
        written += site_pairs(site)
    assert written == pooled
    assert site_pairs(demo / "holdout") == npz_pairs(
        vendored["test_images"], vendored["test_labels"]
    )


def test_demo_counts_match_manifest_and_table(demo):
    manifest = json.loads((demo / "prepare.json").read_text())
    for site, counts in manifest["counts"].items():
        labels = [int(r["label"]) for r in read_labels(demo / site)]
        assert counts == np.bincount(labels, minlength=2).tolist()
    table = format_class_table(manifest["counts"], manifest["class_names"])
    assert "pneumonia" in table and "hospital-5" in table and "holdout" in table
    assert str(sum(manifest["counts"]["holdout"])) in table


def test_ensure_demo_data_is_a_noop_when_complete(demo):
    stamp = (demo / "prepare.json").stat().st_mtime_ns
    assert ensure_demo_data(demo, hospitals=5) == demo
    assert (demo / "prepare.json").stat().st_mtime_ns == stamp  # not rewritten


def test_ensure_demo_data_redoes_incomplete_or_different(tmp_path, monkeypatch):
    # Small stand-in for the vendored file so that redoing is cheap.
    monkeypatch.setattr(prepare, "DEFAULT_SOURCE", write_npz(tmp_path / "toy.npz", classes=2))
    out = ensure_demo_data(tmp_path / "demo", hospitals=3)
    stamp = (out / "prepare.json").stat().st_mtime_ns
    assert ensure_demo_data(out, hospitals=3) == out
    assert (out / "prepare.json").stat().st_mtime_ns == stamp

    # A folder that lost a file (an older writer's crash, a user's rm) is redone.
    victim = next((out / "hospital-2" / "images").iterdir())
    victim.unlink()
    ensure_demo_data(out, hospitals=3)
    assert victim.exists()
    assert (out / "prepare.json").stat().st_mtime_ns != stamp

    # Different parameters: redone with the new ones.
    ensure_demo_data(out, hospitals=4)
    assert sorted(p.name for p in out.glob("hospital-*"))[-1] == "hospital-4"


# ----------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "quantity"])
def test_partition_disjoint_covering_deterministic(vendored, partition):
    labels = vendored["train_labels"].reshape(-1).astype(int)
    parts = partition_indices(labels, 7, partition, alpha=0.3, seed=3)
    assert len(parts) == 7
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and set(joined.tolist()) == set(range(len(labels)))
    assert min(len(p) for p in parts) >= 10
    again = partition_indices(labels, 7, partition, alpha=0.3, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(labels, 7, partition, alpha=0.3, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_small_alpha_is_more_skewed_than_iid(vendored):
    labels = np.concatenate([vendored["train_labels"], vendored["val_labels"]]).reshape(-1)
    labels = labels.astype(int)
    iid = mean_tv_skew(partition_indices(labels, 5, "iid", seed=0), labels)
    skewed = mean_tv_skew(partition_indices(labels, 5, "dirichlet", alpha=0.1, seed=0), labels)
    assert iid < 0.05
    assert skewed > 0.25
    # quantity skew: sizes vary a lot, label mix stays close to global
    qty = partition_indices(labels, 5, "quantity", alpha=0.5, seed=0)
    sizes = np.array([len(p) for p in qty])
    assert sizes.max() > 2 * sizes.min()


def test_partition_min_per_hospital_rebalances():
    # 40 cases, 8 hospitals, very small alpha: random draws almost never give everyone >= 4.
    labels = np.repeat([0, 1], 20)
    parts = partition_indices(labels, 8, "dirichlet", alpha=0.01, seed=0, min_per_hospital=4)
    assert min(len(p) for p in parts) >= 4
    assert sorted(np.concatenate(parts).tolist()) == list(range(40))
    with pytest.raises(ValueError, match="cannot give 8 hospitals"):
        partition_indices(labels, 8, "iid", min_per_hospital=6)
    with pytest.raises(ValueError, match="unknown partition"):
        partition_indices(labels, 2, "random")


# ----------------------------------------------------------------------------- small npz


def test_small_npz_deterministic_and_generic_names(tmp_path):
    src = write_npz(tmp_path / "toy.npz")
    a = prepare_from_npz(src, tmp_path / "a", 3, "dirichlet", seed=5, min_per_hospital=5)
    b = prepare_from_npz(src, tmp_path / "b", 3, "dirichlet", seed=5, min_per_hospital=5)
    prepare_from_npz(src, tmp_path / "c", 3, "dirichlet", seed=6, min_per_hospital=5)
    assert a == b
    for site in a:
        assert read_labels(tmp_path / "a" / site) == read_labels(tmp_path / "b" / site)
        assert site_pairs(tmp_path / "a" / site) == site_pairs(tmp_path / "b" / site)
    assert any(site_pairs(tmp_path / "a" / s) != site_pairs(tmp_path / "c" / s) for s in a)
    meta = json.loads((tmp_path / "a" / "hospital-1" / "dataset.json").read_text())
    assert meta["class_names"] == ["class-0", "class-1", "class-2"]
    assert meta["image_size"] == [10, 12]  # NIfTI (X, Y) = (W, H)
    assert nib.load(tmp_path / "a" / "holdout" / "images" / "case-000001.nii.gz").shape == (10, 12)


def test_3d_npz_axis_order_and_flat_labels(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (30, 4, 5, 6), dtype=np.uint8)  # (N, D, H, W)
    src = tmp_path / "vol.npz"
    np.savez(
        src,
        train_images=imgs[:20], train_labels=np.arange(20) % 2,
        val_images=imgs[20:24], val_labels=np.arange(4) % 2,
        test_images=imgs[24:], test_labels=np.arange(6) % 2,
    )  # fmt: skip
    prepare_from_npz(src, tmp_path / "out", 2, "iid", min_per_hospital=3)
    site = tmp_path / "out" / "holdout"
    assert json.loads((site / "dataset.json").read_text())["image_size"] == [6, 5, 4]
    assert json.loads((site / "dataset.json").read_text())["spatial_dims"] == 3
    assert nib.load(site / "images" / "case-000001.nii.gz").shape == (6, 5, 4)  # (X, Y, Z)
    assert site_pairs(site) == npz_pairs(imgs[24:], np.arange(6) % 2)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"val_labels": None}, "missing key 'val_labels'"),
        ({"train_labels": np.zeros((119, 1), np.uint8)}, "train_labels has 119 labels"),
        ({"test_images": np.zeros((40, 10), np.uint8)}, "test_images must be"),
        ({"train_labels": np.zeros((120, 3), np.uint8)}, "train_labels must be"),
        ({"val_images": np.zeros((30, 28, 28, 3), np.uint8)}, "channels-last"),
        ({"test_images": np.zeros((40, 11, 10), np.uint8)}, "differ in shape"),
    ],
)
def test_bad_npz_names_file_and_key(tmp_path, override, message):
    src = write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(ValueError, match=message) as err:
        prepare_from_npz(src, tmp_path / "out", 2, min_per_hospital=2)
    assert str(src) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_not_an_npz(tmp_path):
    src = tmp_path / "junk.npz"
    src.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz: not an .npz file"):
        prepare_from_npz(src, tmp_path / "out", 2)


def test_refuses_foreign_folder_and_replaces_own_output(tmp_path):
    src = write_npz(tmp_path / "toy.npz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing"):
        prepare_from_npz(src, out, 2, min_per_hospital=5)
    assert (out / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_from_npz(src, empty, 2, min_per_hospital=5)  # an empty folder is fine
    prepare_from_npz(src, empty, 3, min_per_hospital=5)  # so is our own previous output
    assert sorted(p.name for p in empty.glob("hospital-*")) == [f"hospital-{h}" for h in (1, 2, 3)]

    # ...but not once the user has added something of theirs to it.
    (empty / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError):
        prepare_from_npz(src, empty, 2, min_per_hospital=5)
    assert (empty / "notes.md").exists() and (empty / "hospital-3").exists()
    assert not list(tmp_path.glob(".*.partial-*"))


def test_val_split_per_hospital(tmp_path):
    src = write_npz(tmp_path / "toy.npz", n=(300, 0, 10), classes=2)
    prepare_from_npz(src, tmp_path / "out", 4, "quantity", alpha=0.3, min_per_hospital=4)
    for site in (tmp_path / "out").glob("hospital-*"):
        splits = Counter(r["split"] for r in read_labels(site))
        assert splits["val"] >= 1 and splits["train"] >= 1
        assert splits["val"] <= max(1, round(0.2 * sum(splits.values())))


# ----------------------------------------------------------------------------- concurrency, CLI

CHILD = """
import os, sys
from pathlib import Path
from common import datasets
datasets.DEFAULT_SOURCE = Path(sys.argv[1])
out = datasets.ensure_demo_data(Path(sys.argv[2]), hospitals=3)
print(os.stat(out / "prepare.json").st_ino, flush=True)
"""


def test_ensure_demo_data_concurrent_processes(tmp_path):
    src = write_npz(tmp_path / "toy.npz", n=(300, 50, 40), classes=2)
    out = tmp_path / "demo"
    # a crashed earlier run left a partial temp folder behind: it must be cleaned up
    (tmp_path / ".demo.partial-crashed" / "hospital-1").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(src), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for _ in range(3)
    ]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), [r[1] for r in results]
    inodes = {r[0].strip() for r in results}
    assert len(inodes) == 1  # prepared once; the others found it complete
    assert inodes == {str(os.stat(out / "prepare.json").st_ino)}
    assert not list(tmp_path.glob(".demo.partial-*"))
    assert sum(sum(c) for c in json.loads((out / "prepare.json").read_text())["counts"].values())
    assert sorted(p.name for p in out.glob("hospital-*")) == [
        "hospital-1",
        "hospital-2",
        "hospital-3",
    ]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    return prepare.run(parser.parse_args(argv))


def test_cli_prints_table_and_reports_errors(tmp_path, capsys):
    src = write_npz(tmp_path / "toy.npz", classes=2)
    argv = ["--source", str(src), "--out", str(tmp_path / "o"), "--hospitals", "3"]
    assert run_cli(argv + ["--partition", "iid", "--min-per-hospital", "5"]) == 0
    out = capsys.readouterr().out
    assert "hospital-3" in out and "holdout" in out and "class-1" in out
    assert run_cli(["--source", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "p")]) == 2
    assert "nope.npz" in capsys.readouterr().err


def test_output_passes_the_reader_validation(tmp_path):
    from common import site as data

    src = write_npz(tmp_path / "toy.npz", classes=2)
    counts = prepare_from_npz(src, tmp_path / "o", 3, "dirichlet", min_per_hospital=5)
    for site, c in counts.items():
        report = data.validate_site(tmp_path / "o" / site)
        assert report.exit_code == 0, report.format(only_bad=True)
        assert report.n_valid == sum(c)
        assert list(report.class_counts.values()) == c
