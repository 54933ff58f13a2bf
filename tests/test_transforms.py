"""Preprocessing chain: orientation, sizes, per-modality intensity (real nibabel images)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from common.transforms import PreprocessConfig, build_transform


def _quadrant_means(t: torch.Tensor) -> dict[tuple[bool, ...], float]:
    """Mean of each half-space corner: key = (high along axis 0?, high along axis 1?, ...)."""
    x = t[0]
    out = {}
    for corner in np.ndindex(*(2,) * x.ndim):
        sl = tuple(
            slice(n // 2, n) if c else slice(0, n // 2)
            for c, n in zip(corner, x.shape, strict=True)
        )
        out[tuple(bool(c) for c in corner)] = float(x[sl].mean())
    return out


def test_2d_non_ras_permuted_and_flipped_lands_in_ras_corner():
    a = np.zeros((20, 30), np.float32)
    a[:4, :4] = 100.0  # bright block at array index (0, 0)
    # array axis 0 -> world +y, array axis 1 -> world -x (R->L): not RAS, axes swapped
    affine = np.array([[0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    out = build_transform(PreprocessConfig((16, 16)))(nib.Nifti1Image(a, affine))
    assert out.shape == (1, 16, 16) and out.dtype == torch.float32
    q = _quadrant_means(out)
    # RAS x = -j -> block at high x; RAS y = i -> block at low y
    assert max(q, key=q.get) == (True, False), q


def test_3d_flipped_lands_in_ras_corner_and_resizes():
    a = np.zeros((12, 10, 8), np.int16)
    a[:3, :3, :3] = 500  # array (0,0,0)
    affine = np.diag([1.0, -1.0, -1.0, 1.0])  # R, P, I: y and z flipped
    out = build_transform(PreprocessConfig((16, 16, 16)))(nib.Nifti1Image(a, affine))
    assert out.shape == (1, 16, 16, 16)
    q = _quadrant_means(out)
    assert max(q, key=q.get) == (False, True, True), q


def test_anisotropic_spacing_keeps_physical_aspect():
    # 10 x 20 voxels of 2 mm x 1 mm = a 20 mm x 20 mm square: must fill (16, 16), no padding
    a = np.ones((10, 20), np.float32) + np.random.default_rng(0).random((10, 20), np.float32)
    out = build_transform(PreprocessConfig((16, 16)))(nib.Nifti1Image(a, np.diag([2.0, 1, 1, 1])))
    assert out.shape == (1, 16, 16)
    # with 1 mm assumed it would be padded along x: the padded rows would equal the minimum
    edge_rows = out[0, 0], out[0, -1]
    assert all(float(r.std()) > 0 for r in edge_rows)


def test_ct_window_clips_and_scales():
    a = np.array([[-2000, -1000, -300, 400, 3000, 0]] * 6, np.float32)
    out = build_transform(PreprocessConfig((6, 6), modality="CT"))(nib.Nifti1Image(a, np.eye(4)))
    np.testing.assert_allclose(out[0, 0].numpy(), [0, 0, 0.5, 1, 1, 1000 / 1400], atol=1e-6)


def test_robust_zscore_stats_and_outlier():
    rng = np.random.default_rng(1)
    a = rng.normal(100, 20, (32, 32)).astype(np.float32)
    out = build_transform(PreprocessConfig((32, 32), modality="MR"))(nib.Nifti1Image(a, np.eye(4)))
    assert abs(float(out.mean())) < 1e-3 and abs(float(out.std()) - 1) < 0.01
    a[5, 5] = 1e7  # one saturated voxel must not squash everything else's contrast
    out2 = build_transform(PreprocessConfig((32, 32)))(nib.Nifti1Image(a, np.eye(4)))
    rest = np.delete(out2[0].numpy().ravel(), 5 * 32 + 5)
    assert 0.8 < rest.std() < 1.2
    assert np.isfinite(out2.numpy()).all()


def test_numpy_inputs_and_trailing_singleton():
    t2 = build_transform(PreprocessConfig((8, 8)))
    assert t2(np.random.rand(8, 8)).shape == (1, 8, 8)
    assert t2(nib.Nifti1Image(np.random.rand(8, 8, 1).astype(np.float32), np.eye(4))).shape == (
        1,
        8,
        8,
    )
    t3 = build_transform(PreprocessConfig((4, 5, 6)))
    assert t3(np.random.rand(7, 7, 7)).shape == (1, 4, 5, 6)
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps the step's ValueError
        t2(np.random.rand(8, 8, 8))
    assert "spatial dims" in str(err.value.__cause__)
    assert t2(np.full((8, 8), 3.0)).abs().max() == 0  # constant image: no NaN from std 0


def test_key_is_stable_and_covers_every_setting():
    base = PreprocessConfig([28, 28])
    assert base == PreprocessConfig((28, 28)) and base.key() == PreprocessConfig((28, 28)).key()
    others = [
        PreprocessConfig((28, 29)),
        PreprocessConfig((28, 28), modality="CT"),
        PreprocessConfig((28, 28), modality="CT", ct_window=(-200, 300)),
    ]
    assert len({base.key(), *(o.key() for o in others)}) == 4
    with pytest.raises(ValueError):
        PreprocessConfig((28,))


def test_binary_volume_keeps_a_small_foreground_at_one():
    # A segmented organ as 0/255 with 0.1 % foreground: the percentile clip of the robust
    # z-score would blank it; binary images are scaled to [0, 1] instead (issue 16).
    a = np.zeros((32, 32, 32), np.uint8)
    a[10:13, 10:13, 10:13] = 255  # 27 voxels = 0.08 %
    b = np.zeros_like(a)
    b[4:20, 4:20, 4:20] = 255  # 12.5 %: same foreground value whatever the organ's size
    chain = build_transform(PreprocessConfig((32, 32, 32)))
    for vol, n in ((a, 27), (b, 16**3)):
        out = chain(nib.Nifti1Image(vol, np.eye(4)))[0]
        assert float(out.min()) == 0.0 and float(out.max()) == 1.0
        assert int((out == 1).sum()) == n and int((out == 0).sum()) == vol.size - n
    # Resized, the foreground becomes partial volume (occupancy), not a blank image.
    small = build_transform(PreprocessConfig((16, 16, 16)))(nib.Nifti1Image(a, np.eye(4)))
    assert 0 < float(small.max()) <= 1 and float(small.sum()) == pytest.approx(27 / 8, rel=1e-4)


def test_mask_modality_scales_label_maps_to_unit_range():
    a = np.zeros((8, 8), np.float32)
    a[:2], a[2:4] = 1, 2  # three labels: not binary, so only the declared modality scales it
    mask = build_transform(PreprocessConfig((8, 8), modality="mask"))(nib.Nifti1Image(a, np.eye(4)))
    np.testing.assert_allclose(np.unique(mask.numpy()), [0, 0.5, 1])
    grey = build_transform(PreprocessConfig((8, 8)))(nib.Nifti1Image(a, np.eye(4)))
    assert abs(float(grey.mean())) < 1e-5  # z-scored as before
    assert PreprocessConfig((8, 8), modality="mask").key() != PreprocessConfig((8, 8)).key()
