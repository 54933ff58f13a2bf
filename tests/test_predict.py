"""`fedvox predict` on real NIfTI files written with nibabel, with a real (briefly trained) model.

* geometry: a label map sent through the training chain and mapped back lands on the file's
  own voxels, for files that are neither RAS nor at the model's size (2D and 3D);
* saliency: a CNN trained to spot one bright blob looks at the blob (Grad-CAM peak inside it)
  for at least 80 % of the positive cases;
* errors: a file of the wrong dimensionality, an unreadable one, one with NaN voxels, an empty
  folder and a folder of another modality each get an error naming the file, and the other
  inputs are still predicted.
"""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch

from common.geometry import FileGeometry
from common.predict import predict_fields
from common.tasks import ModelSpec, build_task_model
from common.transforms import PreprocessConfig, build_mask_transform, build_transform
from common.unet import build_unet
from server.run_dir import RunDir
from simulations.cli import main as fedvox
from simulations.phantoms.sites import HOLDOUT_STYLE, blob_sigma, gaussian_blob, smooth_noise
from tests.nifti_factory import write_nifti

SIZE = (28, 28)
PEAK_IN_BLOB_RATE = 0.8  # share of positive cases whose saliency peak lies inside the blob


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.mark.parametrize(
    "shape, affine, size",
    [
        # 2D, axes swapped and x flipped, anisotropic voxels, 50x37 for a 64x64 model
        ((50, 37), [[0, -1.3, 0, 20], [0.9, 0, 0, -5], [0, 0, 2.0, 0], [0, 0, 0, 1]], (64, 64)),
        # 3D, LAS-like with axes permuted, 40x30x20 for a 32^3 model
        ((40, 30, 20), [[0, 0, -3.0, 0], [0, 1.0, 0, 0], [1.5, 0, 0, 0], [0, 0, 0, 1]], (32,) * 3),
    ],
)
def test_a_label_map_goes_back_onto_the_files_own_grid(shape, affine, size):
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(s // 5, s // 2) for s in shape)] = 1
    mask[tuple(slice(s // 2 + 2, s - 3) for s in shape)] = 2
    img = nib.Nifti1Image(mask, np.asarray(affine, float))
    model_grid = build_mask_transform(PreprocessConfig(size, "CT"))(img)[0].long()
    onehot = torch.nn.functional.one_hot(model_grid, 3).movedim(-1, 0).float()
    back = FileGeometry.of(img, size).to_file_grid(onehot).argmax(0)
    assert back.shape == shape
    for label in (1, 2):
        assert _dice(back == label, mask == label) > 0.9, label


def _blob_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """blobs-2d cases (HOLDOUT_STYLE) with the blob centres the phantom does not return."""
    rng, sigma, style = np.random.default_rng(seed), blob_sigma(SIZE), HOLDOUT_STYLE
    margin = np.ceil(2 * sigma)
    images, labels, centres = [], [], []
    for i in range(n):
        img = style.noise * smooth_noise(rng, SIZE, sigma=1.5)
        centre = rng.uniform(margin, np.asarray(SIZE) - 1 - margin)
        if i % 2:
            img = img + style.contrast * gaussian_blob(SIZE, centre, sigma)
        images.append(style.offset + style.scale * img)
        labels.append(i % 2)
        centres.append(centre)
    return np.asarray(images, np.float32), np.asarray(labels), np.asarray(centres)


@pytest.fixture(scope="module")
def blob_run(tmp_path_factory):
    """A run folder whose checkpoint is a CNN trained (non-privately, briefly) on blobs."""
    torch.manual_seed(0)
    images, labels, _ = _blob_images(400, seed=1)
    prep = PreprocessConfig(SIZE, "MR")
    chain = build_transform(prep)
    x = torch.stack([chain(im) for im in images])
    y = torch.as_tensor(labels)
    spec = ModelSpec("classification", 2, 1, 2, SIZE)
    model = build_task_model(spec)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _epoch in range(6):
        for idx in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    run = RunDir(tmp_path_factory.mktemp("blob-run"), {})
    fields = predict_fields(prep, ("no-blob", "blob"), {"threshold": 0.5, "temperature": 1.5})
    run.save_checkpoint(6, model.state_dict(), spec.as_dict(), best=True, predict=fields)
    return run.path


def test_saliency_peaks_inside_the_blob(blob_run, tmp_path):
    images, labels, centres = _blob_images(40, seed=7)
    inputs = []
    for i, image in enumerate(images):  # identity affine: file voxel (i, j) = array [i, j]
        inputs.append(str(write_nifti(tmp_path / "in" / f"case-{i:03d}.nii.gz", image)))
    out = tmp_path / "out"
    argv = ["predict", "--run", str(blob_run), *inputs, "--out", str(out), "--saliency"]
    assert fedvox(argv) == 0
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["case"] for r in rows] == [f"case-{i:03d}" for i in range(40)]
    predicted = np.asarray([int(r["label"]) for r in rows])
    assert (predicted == labels).mean() >= 0.9  # the model learned the blob
    inside = []
    for i in np.flatnonzero(labels == 1):
        heat = nib.load(out / f"case-{i:03d}_saliency.nii.gz")
        assert heat.shape == SIZE and np.allclose(heat.affine, np.eye(4))
        peak = np.unravel_index(np.argmax(heat.get_fdata()), SIZE)
        inside.append(np.linalg.norm(np.asarray(peak) - centres[i]) <= 2 * blob_sigma(SIZE))
        assert (out / f"case-{i:03d}_saliency.png").stat().st_size > 0
    assert np.mean(inside) >= PEAK_IN_BLOB_RATE, np.mean(inside)


def test_bad_inputs_are_named_and_the_rest_still_predicted(blob_run, tmp_path, capsys):
    images, _, _ = _blob_images(2, seed=3)
    good = write_nifti(tmp_path / "good.nii.gz", images[1])
    volume = write_nifti(tmp_path / "volume.nii.gz", np.zeros((28, 28, 9), np.float32))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file at all")
    ct_site = tmp_path / "ct-site"
    write_nifti(ct_site / "images" / "scan.nii.gz", images[0])
    (ct_site / "dataset.json").write_text('{"modality": "CT"}')
    nan = images[0].copy()
    nan[3, 4] = np.nan
    holey = write_nifti(tmp_path / "holey.nii.gz", nan)
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["predict", "--run", str(blob_run), "--checkpoint", "best", "--out", str(tmp_path)]
    inputs = [volume, broken, good, ct_site, holey, empty]
    code = fedvox([*argv, *map(str, inputs)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{volume}: a 3D image" in err and "takes 2D images" in err
    assert f"{broken}: not a readable NIfTI file" in err
    assert f"{ct_site / 'images' / 'scan.nii.gz'}: modality 'CT'" in err
    assert f"{holey}: has NaN or infinite voxel values" in err
    assert f"{empty}: a folder without NIfTI files" in err
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert [r["case"] for r in rows] == ["good"]
    assert set(rows[0]) >= {"case", "probability", "label", "class_name"}
    assert rows[0]["class_name"] == ["no-blob", "blob"][int(rows[0]["label"])]


def test_a_checkpoint_without_predict_fields_is_a_clear_error(tmp_path, capsys):
    run = RunDir(tmp_path / "old", {})
    spec = ModelSpec("classification", 2, 1, 2, SIZE)
    run.save_checkpoint(1, build_task_model(spec).state_dict(), spec.as_dict(), best=False)
    code = fedvox(["predict", "--run", str(run.path), str(tmp_path), "--out", str(tmp_path)])
    assert code == 2
    assert "no 'predict' fields" in capsys.readouterr().err


def test_a_checkpoint_whose_weights_do_not_fit_the_model_is_a_clear_error(tmp_path, capsys):
    """E.g. a slice-unet checkpoint written with another width: the error names the file and
    the first mismatch, not a bare torch traceback."""
    prep = PreprocessConfig((16, 16, 16), "CT")
    spec = ModelSpec("segmentation", 3, 1, 3, (16, 16, 16), arch="slice-unet")
    old = build_unet(2, 5, 3, 8).state_dict()  # width 8, where this spec builds width 16
    run = RunDir(tmp_path / "run", {})
    fields = predict_fields(prep, ("background", "lung", "nodule"), {})
    state = {f"unet.{k}": v for k, v in old.items()}
    run.save_checkpoint(1, state, spec.as_dict(), best=True, predict=fields)
    write_nifti(tmp_path / "in" / "case-1.nii.gz", np.zeros((16, 16, 16), np.float32), np.eye(4))
    out = tmp_path / "out"
    assert fedvox(["predict", "--run", str(run.path), str(tmp_path / "in"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "do not fit the model" in err and "size mismatch for unet.conv_0" in err
    assert "last.pt" in err or "best.pt" in err
    assert not (out / "case-1_mask.nii.gz").exists()


def test_a_slice_unet_checkpoint_predicts_a_mask_on_a_volumes_own_grid(tmp_path):
    """The 3D segmentation recipe's model goes through predict like any other: rebuilt from its
    checkpoint, run slice by slice, its label map written on the input's grid."""
    torch.manual_seed(0)
    prep = PreprocessConfig((16, 16, 16), "CT")
    spec = ModelSpec("segmentation", 3, 1, 3, (16, 16, 16), arch="slice-unet")
    model = build_task_model(spec)
    with torch.no_grad():  # a fixed model: "lung" everywhere
        model.unet.final_conv.weight.zero_()
        model.unet.final_conv.bias.copy_(torch.tensor([0.0, 1.0, -5.0]))
    run = RunDir(tmp_path / "run", {})
    fields = predict_fields(prep, ("background", "lung", "nodule"), {})
    run.save_checkpoint(1, model.state_dict(), spec.as_dict(), best=True, predict=fields)
    scan = np.full((20, 18, 12), -1000.0, np.float32)  # air around a soft-tissue body
    scan[3:17, 3:15] = 40.0
    write_nifti(tmp_path / "in" / "case-1.nii.gz", scan, np.diag([1.5, 1.5, 2.5, 1.0]))
    out = tmp_path / "out"
    assert fedvox(["predict", "--run", str(run.path), str(tmp_path / "in"), "--out", str(out)]) == 0
    mask = nib.load(out / "case-1_mask.nii.gz")
    assert mask.shape == scan.shape and np.allclose(mask.affine, np.diag([1.5, 1.5, 2.5, 1.0]))
    assert (np.asarray(mask.dataobj) == 1).all()
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert rows[0]["case"] == "case-1"
    assert (rows[0]["lung_voxels"], rows[0]["nodule_voxels"]) == (str(scan.size), "0")


def test_a_run_that_predicts_with_test_time_flips_predicts_mirrored(tmp_path):
    """The checkpoint says how the run evaluated its model (run config test-time-flips):
    predict averages the same 8 mirror images; a checkpoint without the field (older runs)
    predicts single-pass."""
    from common.metrics import mirrored_logits
    from common.predict import Predictor

    torch.manual_seed(3)
    prep = PreprocessConfig((16, 16, 16), "CT")
    spec = ModelSpec("segmentation", 3, 1, 3, (16, 16, 16), arch="slice-unet")
    model = build_task_model(spec).eval()
    image = torch.randn(1, 16, 16, 16)
    for name, flips in (("on", True), ("off", False), ("old", None)):
        fields = predict_fields(prep, ("background", "lung", "nodule"), {}, bool(flips))
        if flips is None:
            del fields["test_time_flips"]
        run = RunDir(tmp_path / name, {})
        run.save_checkpoint(1, model.state_dict(), spec.as_dict(), best=True, predict=fields)
        predictor = Predictor.load(run.path)
        assert predictor.flips is bool(flips)
        with torch.no_grad():
            want = mirrored_logits(model, image[None])[0] if flips else model(image[None])[0]
        assert torch.allclose(predictor.logits(image), want, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(mirrored_logits(model, image[None])[0], model(image[None])[0])
