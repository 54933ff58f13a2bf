"""load_site: shapes, splits, skipping bad files loudly, and decoding each NIfTI file once."""

from __future__ import annotations

import os

import nibabel
import numpy as np
import pytest
import torch
from nifti_factory import make_site, write_nifti

import common.site as data
from common.site import DataError, load_site

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def fresh_memory_cache():
    data.clear_memory_cache()
    yield
    data.clear_memory_cache()


@pytest.fixture
def load_spy(monkeypatch):
    """Counts nibabel.load calls (every decode starts with one) and calls through."""
    calls: list[str] = []
    real = nibabel.load

    def spy(filename, *args, **kwargs):
        calls.append(os.fspath(filename))
        return real(filename, *args, **kwargs)

    monkeypatch.setattr(nibabel, "load", spy)
    return calls


def site2d(root, n=12, shape=(10, 10)):
    cases = {f"c{i:02d}": (RNG.random(shape).astype(np.float32) + i % 3, i % 3) for i in range(n)}
    return make_site(root, cases, class_names=["a", "b", "c"], modality="xray")


def test_2d_and_3d_shapes(tmp_path):
    ds = load_site(site2d(tmp_path / "s2"), split="all", log=lambda m: None)
    assert ds.images.shape == (12, 1, 10, 10) and ds.images.dtype == torch.float32
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [i % 3 for i in range(12)]
    assert (ds.in_channels, ds.num_classes, ds.spatial_dims) == (1, 3, 2)
    x, y = ds[4]
    assert x.shape == (1, 10, 10) and int(y) == 1
    vols = {f"v{i}": (RNG.random((6, 7, 5)).astype(np.float32), i % 2) for i in range(4)}
    ds3 = load_site(make_site(tmp_path / "s3", vols), split="all", image_size=(8, 8, 8))
    assert ds3.images.shape == (4, 1, 8, 8, 8) and ds3.spatial_dims == 3
    assert ds3.num_classes == 2  # inferred from labels.csv
    assert ds3.preprocess.spatial_size == (8, 8, 8)


def test_image_size_from_first_valid_image_and_mixed_sizes(tmp_path):
    site = site2d(tmp_path / "s", n=3, shape=(10, 10))
    write_nifti(site / "images" / "c03.nii.gz", RNG.random((20, 14)).astype(np.float32))
    with open(site / "labels.csv", "a") as f:
        f.write("c03,0\n")
    ds = load_site(site, split="all")
    assert ds.images.shape == (4, 1, 10, 10)


def test_splits(tmp_path):
    site = site2d(tmp_path / "s", n=40)
    train = load_site(site, "train")
    val = load_site(site, "val")
    assert len(train) + len(val) == 40 and len(val) >= 1
    ids_val = {c.case_id for c in val.cases}
    data.clear_memory_cache()  # the hash split must not depend on process state
    assert {c.case_id for c in load_site(site, "val").cases} == ids_val
    assert not ids_val & {c.case_id for c in train.cases}
    tiny = site2d(tmp_path / "tiny", n=2)
    assert len(load_site(tiny, "val")) == 1  # at least one val case when the site has >= 2
    explicit = make_site(
        tmp_path / "e",
        {"a": (RNG.random((4, 4)), 0), "b": (RNG.random((4, 4)), 1)},
        splits={"a": "train", "b": "train"},
    )
    assert len(load_site(explicit, "train")) == 2
    with pytest.raises(DataError, match="split 'val' is empty"):
        load_site(explicit, "val")


def test_bad_files_are_skipped_loudly_and_none_left_fails(tmp_path):
    site = site2d(tmp_path / "s", n=4)
    (site / "images" / "broken.nii.gz").write_bytes(b"")
    nan = RNG.random((10, 10)).astype(np.float32)
    nan[1, 1] = np.nan
    write_nifti(site / "images" / "nan.nii.gz", nan)
    with open(site / "labels.csv", "a") as f:
        f.write("broken,0\nnan,1\n")
    logged: list[str] = []
    ds = load_site(site, "all", log=logged.append)
    assert len(ds) == 4 and ds.report.n_bad == 2
    text = "\n".join(logged)
    assert "images/broken.nii.gz: empty file (0 bytes)" in text and "NaN/Inf" in text
    for p in (site / "images").glob("c*.nii.gz"):
        p.write_bytes(b"")
    with pytest.raises(DataError, match=str(site.name)):
        load_site(site, "all", log=logged.append)


def test_memory_cache_without_cache_dir(tmp_path, load_spy):
    # Flower simulation: many clients in one process repeat the same load_site every round.
    site = site2d(tmp_path / "s", n=6)
    first = load_site(site, "train")
    assert len(load_spy) == 6
    for _round in range(3):
        assert torch.equal(load_site(site, "train").images, first.images)
        load_site(site, "val")
    assert len(load_spy) == 6


def test_decode_once_per_process_and_disk_cache(tmp_path, load_spy):
    site = site2d(tmp_path / "s", n=10)
    cache = tmp_path / "cache"
    ds = load_site(site, "all", cache_dir=cache)
    assert len(load_spy) == 10  # each file decoded exactly once on the first load
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)
    for _epoch in range(2):
        seen = sum(len(y) for _, y in loader)
        assert seen == 10
    assert len(load_spy) == 10  # epochs never touch the files
    again = load_site(site, "train", cache_dir=cache)
    load_site(site, "val", cache_dir=cache)
    assert len(load_spy) == 10  # same process: served from memory
    assert len(list(cache.iterdir())) == 1  # one cache file for the site, all splits

    data.clear_memory_cache()  # a fresh process with a warm disk cache
    warm = load_site(site, "all", cache_dir=cache)
    assert len(load_spy) == 10
    assert torch.equal(warm.images, ds.images) and torch.equal(warm.labels, ds.labels)
    assert torch.equal(load_site(site, "train", cache_dir=cache).images, again.images)

    # touched (new mtime), same bytes: re-hashed, not re-decoded
    os.utime(site / "images" / "c03.nii.gz", ns=(1, 10**18))
    data.clear_memory_cache()
    load_site(site, "all", cache_dir=cache)
    assert len(load_spy) == 10
    # new bytes: exactly that file is decoded again
    write_nifti(site / "images" / "c04.nii.gz", np.full((10, 10), 7.0, np.float32))
    data.clear_memory_cache()
    changed = load_site(site, "all", cache_dir=cache)
    assert load_spy[10:] == [str(site / "images" / "c04.nii.gz")]
    assert float(changed.images[4].abs().max()) == 0.0  # constant image -> z-score 0
    # different preprocessing settings: a different cache entry, everything decoded
    load_site(site, "all", image_size=(6, 6), cache_dir=cache)
    assert len(load_spy) == 21


def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path, load_spy):
    site = site2d(tmp_path / "s", n=5)
    cache = tmp_path / "cache"
    first = load_site(site, "all", cache_dir=cache)
    (cache_file,) = cache.iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # a partial write
    data.clear_memory_cache()
    logged: list[str] = []
    rebuilt = load_site(site, "all", cache_dir=cache, log=logged.append)
    assert torch.equal(rebuilt.images, first.images)
    assert any("ignoring unreadable cache file" in m for m in logged)
    assert len(load_spy) == 10
    data.clear_memory_cache()
    load_site(site, "all", cache_dir=cache)  # the rebuilt file is good again
    assert len(load_spy) == 10
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]


def test_changed_modality_invalidates_tensors(tmp_path, load_spy):
    site = site2d(tmp_path / "s", n=3)
    xray = load_site(site, "all")
    (site / "dataset.json").write_text('{"class_names": ["a", "b", "c"], "modality": "CT"}')
    ct = load_site(site, "all")
    assert len(load_spy) == 6 and not torch.equal(xray.images, ct.images)
    assert float(ct.images.min()) >= 0.0  # CT window scales into [0, 1]


def test_default_image_size_shrinks_only_large_3d_volumes(tmp_path):
    from common.site import AUTO_3D_SIZE, default_image_size
    from common.site.spec import AUTO_3D_SEG_SIZE

    rng = np.random.default_rng(0)
    big = make_site(
        tmp_path / "big", {"a": (rng.random((40, 36, 40)), 0), "b": (rng.random((40, 36, 40)), 1)}
    )
    small = make_site(
        tmp_path / "small", {"a": (rng.random((16, 16, 16)), 0), "b": (rng.random((16, 16, 16)), 1)}
    )
    flat = make_site(
        tmp_path / "flat", {"a": (rng.random((64, 64)), 0), "b": (rng.random((64, 64)), 1)}
    )
    declared = make_site(tmp_path / "declared", {"a": (rng.random((40, 40, 40)), 0)})
    (declared / "dataset.json").write_text('{"task": "classification", "image_size": [24, 24, 24]}')
    assert default_image_size(big) == AUTO_3D_SIZE
    assert default_image_size(small) is None  # already small: keep it
    assert default_image_size(flat) is None  # 2D keeps its size
    assert default_image_size(declared) == (24, 24, 24)  # dataset.json wins
    # Segmentation (slice-unet's cost grows with the slice size only) keeps up to 64^3.
    seg_spec = '{"task": "segmentation", "class_names": ["background", "lung"]}'
    seg_big = make_site(tmp_path / "seg-big", {"a": (rng.random((80, 72, 40)), 0)})
    seg_mid = make_site(tmp_path / "seg-mid", {"a": (rng.random((40, 36, 40)), 0)})
    for site in (seg_big, seg_mid):
        (site / "dataset.json").write_text(seg_spec)
    assert AUTO_3D_SEG_SIZE == (64, 64, 64)
    assert default_image_size(seg_big) == AUTO_3D_SEG_SIZE
    assert default_image_size(seg_mid) is None

    # `fedvox prepare` declares the same model input for the 3D volumes it writes.
    from common.datasets import write_site

    vols = rng.random((2, 20, 40, 48)).astype(np.float32)
    write_site(tmp_path / "prepared", vols, np.array([0, 1]), None, ["a", "b"], "MR")
    assert default_image_size(tmp_path / "prepared") == AUTO_3D_SIZE
