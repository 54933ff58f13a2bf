"""Segmentation (issue 7): masks in the data contract, aligned preprocessing, DP U-Nets, Dice,
lung-CT phantoms and a 2-round federated segmentation run on a real Flower simulation."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from nifti_factory import write_nifti
from opacus.validators import ModuleValidator

from common.site import DataError, clear_memory_cache, load_site, validate_site
from common.tasks import ModelSpec, SegmentationTask, task_for
from common.unet import FOCUS_FLOOR, FOCUS_SHARE, focus_share
from simulations.harness.local import LocalFederation
from simulations.phantoms.sites import PHANTOMS, make_phantom_sites

CLASSES = ["background", "lung", "nodule"]


def _seg_site(root, cases, always=("lung",), labels_csv=None, class_names=CLASSES):
    """cases: {case: (image, mask or None, image affine, mask affine)}."""
    for case, (image, mask, affine, mask_affine) in cases.items():
        write_nifti(root / "images" / f"{case}.nii.gz", image, affine)
        if mask is not None:
            write_nifti(root / "masks" / f"{case}.nii.gz", mask, mask_affine)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    spec = {"task": "segmentation", "class_names": class_names, "always_present": list(always)}
    (root / "dataset.json").write_text(json.dumps(spec))
    if labels_csv is not None:
        (root / "labels.csv").write_text(labels_csv)
    return root


def _good(shape=(12, 10, 8)):
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[2:8, 2:6] = 1
    mask[4:6, 3:5] = 2
    return image, mask


def test_mask_defects_are_reported_per_file(tmp_path):
    eye = np.eye(4)
    image, mask = _good()
    shifted = eye.copy()
    shifted[0, 3] = 2.0
    out_of_range, fractional, no_lung = mask.copy(), mask.astype(np.float32), mask.copy()
    out_of_range[0, 0, 0] = 5
    fractional[0, 0, 0] = 0.5
    no_lung[no_lung == 1] = 0
    site = _seg_site(
        tmp_path / "site",
        {
            "ok": (image, mask, eye, eye),
            "missing": (image, None, eye, eye),
            "shape": (image, mask[:, :, :6], eye, eye),
            "affine": (image, mask, eye, shifted),
            "range": (image, out_of_range, eye, eye),
            "fraction": (image, fractional, eye, eye),
            "nolung": (image, no_lung, eye, eye),
        },
    )
    report = validate_site(site)
    by_file = {r.file: r for r in report.reports}
    assert by_file["images/ok.nii.gz"].ok and not by_file["images/ok.nii.gz"].warning
    expected = {
        "missing": "mask missing (expected masks/missing.nii.gz)",
        "shape": "masks/shape.nii.gz: mask shape (12, 10, 6) differs from the image's (12, 10, 8)",
        "affine": "masks/affine.nii.gz: mask affine differs",
        "range": "masks/range.nii.gz: labels [5] are outside the declared classes 0..2",
        "fraction": "masks/fraction.nii.gz: non-integer label values (e.g. 0.5)",
    }
    for case, reason in expected.items():
        r = by_file[f"images/{case}.nii.gz"]
        assert not r.ok and r.reason.startswith(reason), (case, r.reason)
    # An always-present structure missing is a warning: the case stays usable.
    warned = by_file["images/nolung.nii.gz"]
    assert warned.ok and "no lung voxels" in warned.warning
    assert "WARN images/nolung.nii.gz" in report.format(only_bad=True)
    assert report.n_valid == 2 and report.n_bad == 5
    assert report.class_counts == {"background": 2, "lung": 1, "nodule": 2}
    # labels.csv is optional for segmentation; training loads the valid cases with masks.
    data = load_site(site, "all", log=lambda _m: None)
    assert data.labels.shape == (2, 1, 12, 10, 8) and data.labels.dtype == torch.int64
    assert sorted(data.labels.unique().tolist()) == [0, 1, 2]


def test_segmentation_labels_csv_and_dataset_json_rules(tmp_path):
    image, mask = _good((16, 16))
    eye = np.eye(4)
    cases = {f"c{i}": (image, mask, eye, eye) for i in range(4)}
    site = _seg_site(tmp_path / "a", cases, labels_csv="case,split\nc0,val\nc1,train\nghost,val\n")
    report = validate_site(site)
    splits = {c.case_id: c.split for c in report.cases}
    assert splits["c0"] == "val" and splits["c1"] == "train" and len(splits) == 4
    ghost = [r for r in report.reports if r.case == "ghost"]
    assert ghost and not ghost[0].ok and ghost[0].file == "labels.csv"
    # Class names are required (label value i = class_names[i]) and always_present must name them.
    bad = _seg_site(tmp_path / "b", cases, class_names=["lung"], always=())
    with pytest.raises(DataError, match="class_names"):
        validate_site(bad)
    bad = _seg_site(tmp_path / "c", cases, always=("heart",))
    with pytest.raises(DataError, match="always_present"):
        validate_site(bad)


def test_aligned_transforms_keep_the_mask_on_its_structure(tmp_path):
    """A bright box in an anisotropic, x-flipped volume; after reorientation + resize + pad to
    16^3 the mask must sit exactly on the bright voxels, at the RAS position of the box."""
    shape = (40, 24, 12)
    image = np.zeros(shape, np.float32)
    mask = np.zeros(shape, np.uint8)
    image[4:14, 6:18, 3:9] = 1000.0  # near the start of array axis 0
    mask[4:14, 6:18, 3:9] = 1
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])  # x flipped (LAS-like), 2 mm slices
    site = _seg_site(
        tmp_path / "s", {"box": (image, mask, affine, affine)}, always=(), class_names=["bg", "box"]
    )
    data = load_site(site, "all", image_size=(16, 16, 16), log=lambda _m: None)
    img, lab = data.images[0, 0].numpy(), data.labels[0, 0].numpy()
    assert set(np.unique(lab)) == {0, 1}  # nearest neighbour: no blended labels
    # Voxels wholly inside the box are labelled; labelled voxels are at least partly inside
    # (edge voxels blend box and background after resizing: either label is right there).
    core, touched = img > img.max() - 1e-3, img > img.min() + 1e-3
    assert (lab[core] == 1).all() and (touched[lab == 1]).all()
    assert (lab == 1).sum() >= 0.5 * touched.sum()
    # Array axis 0 runs right-to-left, so after RAS reorientation the box is at the high-x end.
    xs = np.flatnonzero((lab == 1).any(axis=(1, 2)))
    assert xs.min() > 16 / 2, xs


@pytest.mark.parametrize("dims,size", [(2, 32), (3, 16)])
def test_one_dp_step_of_each_unet(dims, size, sgd):
    torch.manual_seed(0)
    task = SegmentationTask(tuple(CLASSES))
    model = task.build_model(ModelSpec("segmentation", dims, 1, 3, (size,) * dims))
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    images = torch.randn(6, 1, *(size,) * dims)
    masks = (images > 0.5).long() + (images > 1.5).long()
    before = [p.detach().clone() for p in model.parameters()]
    result = sgd(model, images, masks, batch_size=3, loss_fn=task.loss_fn())
    assert result.history and result.history[0][2] == 2  # two DP steps were accounted
    assert np.isfinite(result.loss)
    after = list(model.parameters())
    changed = [not torch.equal(a, b.detach()) for a, b in zip(before, after, strict=True)]
    assert all(changed)  # every layer, the upsampling path included, got a noisy update
    assert not any(k.startswith("_module") for k in model.state_dict())


def test_slice_unet_trains_on_one_slice_per_case_and_segments_volumes_slice_by_slice(sgd):
    torch.manual_seed(0)
    task = SegmentationTask(tuple(CLASSES))
    model = task.build_model(ModelSpec("segmentation", 3, 1, 3, (16, 16, 12), arch="slice-unet"))
    images = torch.randn(8, 1, 16, 16, 12)
    masks = torch.zeros(8, 1, 16, 16, 12, dtype=torch.long)
    masks[:, :, 2:14, 2:14, 2:10] = 1  # the "lung": slices 2-9
    masks[:, :, 6:8, 6:8, 5] = 2  # a small "nodule": 4 voxels in slice 5, its tip in slice 6
    masks[:, :, 6, 6, 6] = 2

    # Training view: one slice per case with its k neighbours either side as channels (the
    # edge slice repeated past the ends), and the label slice at the same height.
    k = model.context
    assert k >= 1
    views = [model.training_view(images, masks) for _ in range(40)]
    x, y = views[0]
    assert x.shape == (8, 2 * k + 1, 16, 16) and y.shape == (8, 1, 16, 16)
    heights = []
    for x, y in views:
        for i in range(8):  # which slice of case i was taken (images are distinct per slice)
            hit = [z for z in range(12) if torch.equal(images[i, 0, :, :, z], x[i, k])]
            assert len(hit) == 1 and torch.equal(masks[i, :, :, :, hit[0]], y[i])
            for offset in range(-k, k + 1):
                z = min(max(hit[0] + offset, 0), 11)
                assert torch.equal(x[i, k + offset], images[i, 0, :, :, z])
            heights.append(hit[0])
    heights = np.array(heights)
    # About half go through the rarest structure (0.5 + 0.5 * 2/12 expected), mostly where it
    # is largest; the rest are uniform over all 12 (so empty slices are seen too).
    assert 0.45 < np.mean((heights == 5) | (heights == 6)) < 0.72
    assert np.mean(heights == 5) > 2 * np.mean(heights == 6)
    assert set(heights) == set(range(12))
    # Over a run the focus share follows a half cosine from FOCUS_SHARE down to FOCUS_FLOOR:
    # at the end most slices are drawn as prediction sees them: slice 5 (4 of the 5 nodule
    # voxels) expected 0.1 * 0.8 + 0.9 / 12 = 0.155 of the time, against 0.44 at the start.
    assert focus_share(0.0) == FOCUS_SHARE > focus_share(0.5) > focus_share(1.0) == FOCUS_FLOOR
    late = [model.training_view(images, masks, progress=1.0)[0] for _ in range(100)]
    at_nodule = [torch.equal(v[i, k], images[i, 0, :, :, 5]) for v in late for i in range(8)]
    assert 0.09 < np.mean(at_nodule) < 0.25
    empty = model.training_view(images[:0], masks[:0])  # an empty Poisson batch stays empty
    assert empty[0].shape == (0, 2 * k + 1, 16, 16) and empty[1].shape == (0, 1, 16, 16)
    # The view of some rows of a site's tensors (what the training loader takes, never
    # copying whole volumes) is the view of those cases gathered, draw for draw.
    rows = torch.tensor([6, 1, 1, 3])
    for progress in (0.0, 1.0):
        torch.manual_seed(7)
        by_rows = model.training_view(images, masks, progress, rows)
        torch.manual_seed(7)
        gathered = model.training_view(images[rows], masks[rows], progress)
        assert all(torch.equal(a, b) for a, b in zip(by_rows, gathered, strict=True))
    none = model.training_view(images, masks, 0.0, rows[:0])
    assert none[0].shape == (0, 2 * k + 1, 16, 16) and none[1].shape == (0, 1, 16, 16)
    # local_sgd's loader hands the model its training view, taken from the sampled rows
    from client.train import LocalTraining, _cases, _loader

    settings = LocalTraining(epochs=1, batch_size=4, learning_rate=0.1, progress=0.5)
    for private in (True, False):
        batches = list(_loader(_cases(model, images, masks, settings), settings, private))
        assert batches and all(x.shape[1:] == (2 * k + 1, 16, 16) for x, _ in batches)
        assert all(y.shape[1:] == (1, 16, 16) and len(y) == len(x) for x, y in batches)

    # A volume's logits are the 2D U-Net's on each of its slice stacks, in place.
    model.eval()
    with torch.no_grad():
        volume = model(images)
        assert volume.shape == (8, 3, 16, 16, 12)
        x, _ = views[-1]
        for i, z in enumerate(heights[-8:]):
            assert torch.allclose(volume[i, :, :, :, z], model(x[i : i + 1])[0], atol=1e-5)

    # A DP step: per-sample gradients are per case (one slice each), every layer updated.
    before = [p.detach().clone() for p in model.parameters()]
    result = sgd(model.train(), images, masks, batch_size=4, loss_fn=task.loss_fn())
    assert result.history and result.history[0][2] == 2 and np.isfinite(result.loss)
    after = list(model.parameters())
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, after, strict=True))
    metrics = task.evaluate(model, images, masks).metrics  # evaluation takes whole volumes
    assert set(metrics) >= {"dice-lung", "dice-nodule", "dice-mean", "loss"}


@pytest.mark.parametrize("dims", [2, 3])
def test_augmentation_moves_a_mask_with_its_image(dims):
    from client.train import augment

    torch.manual_seed(0)
    masks = torch.zeros(16, 1, *(24,) * dims, dtype=torch.long)
    masks[(slice(None), 0, *(slice(6, 15),) * dims)] = 1
    masks[(slice(None), 0, *(slice(9, 12),) * dims)] = 2
    images = masks.float() * 100.0  # the image is its mask, scaled
    moved, moved_masks = augment(images, masks)
    assert moved_masks.dtype == masks.dtype and moved_masks.shape == masks.shape
    assert not torch.equal(moved_masks, masks)  # the cases did move
    agree = (torch.round(moved / 100.0).long() == moved_masks).float().mean()
    assert agree > 0.97, float(agree)  # ... and their masks moved with them
    labels = torch.arange(16)  # class labels are not spatial: left alone
    assert torch.equal(augment(images, labels)[1], labels)


class _Threshold(torch.nn.Module):
    """A fixed 'model': class k where the image is nearest to k (logits = -|x - k|)."""

    def forward(self, x):
        return torch.cat([-(x - k).abs() for k in range(3)], dim=1)


def test_evaluate_reports_per_class_dice_from_monai():
    target = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    target[:, :, 0:4, 0:4] = 1  # 16 lung voxels per case
    target[0, :, 6:8, 6:8] = 2  # nodule only in case 0
    pred = target.clone()
    pred[0, :, 0, 0:4] = 0  # case 0 misses 4 lung voxels: Dice 2*12/(12+16) = 6/7
    ev = task_for(type("Spec", (), {"task": "segmentation", "class_names": CLASSES})()).evaluate(
        _Threshold(), pred.float(), target
    )
    m = ev.metrics
    assert m["dice-lung"] == pytest.approx((6 / 7 + 1.0) / 2)
    assert m["dice-nodule"] == pytest.approx(1.0)  # case 1 has no nodule: ignored, not 1 or 0
    assert m["dice-mean"] == pytest.approx((m["dice-lung"] + 1.0) / 2)
    assert np.isfinite(m["loss"])
    assert task_for("segmentation").score(m) == m["dice-mean"]


def test_lung_ct_phantom_hospitals_differ_and_validate(tmp_path):
    counts = make_phantom_sites(
        "lung-ct", tmp_path / "d", hospitals=2, cases_per_site=3, holdout_cases=2, seed=3,
        image_size=(32, 32, 32),
    )  # fmt: skip
    assert set(counts) == {"hospital-1", "hospital-2", "holdout"}
    zooms = {}
    for site in counts:
        report = validate_site(tmp_path / "d" / site)
        assert report.n_bad == 0 and not report.warnings, report.format(only_bad=True)
        assert report.spec.task == "segmentation" and report.spec.image_size == (32, 32, 32)
        img = nib.load(report.cases[0].image)
        msk = nib.load(report.cases[0].mask)
        assert np.allclose(img.affine, msk.affine) and img.shape == msk.shape
        hu, lab = img.get_fdata(), msk.get_fdata()
        assert np.median(hu[lab == 1]) < -600 and np.median(hu[lab == 2]) > -400  # HU
        zooms[site] = (img.header.get_zooms(), img.shape)
    assert zooms["hospital-1"] != zooms["hospital-2"]  # scanners differ in spacing / slices
    assert PHANTOMS["lung-ct-2d"].task == "segmentation"


@pytest.mark.parametrize(
    "phantom, size, arch",
    [("lung-ct-2d", (32, 32), "unet"), ("lung-ct", (32, 32, 32), "slice-unet")],
)
def test_two_round_two_hospital_segmentation_simulation(tmp_path, phantom, size, arch):
    """2D and 3D: the 3D recipe ("auto") trains slice-unet and scores whole volumes."""
    clear_memory_cache()
    make_phantom_sites(
        phantom, tmp_path / "data", hospitals=2, cases_per_site=12, holdout_cases=6,
        seed=0, image_size=size,
    )  # fmt: skip
    with LocalFederation(tmp_path / "sim") as fed:
        result = fed.run(
            {
                "data-dir": str(tmp_path / "data"),
                "output-dir": str(tmp_path / "runs"),
                "run-name": "seg",
                "num-server-rounds": 2,
                "batch-size": 4,
                "learning-rate": 0.1,
                "target-epsilon": 8.0,
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
    assert summary["model"]["arch"] == arch and summary["model"]["image_size"] == list(size)
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    # The 3D recipe scores its holdout after round 0, every 4th round and the last one only.
    scored = [True, arch == "unet", True]
    assert [r["holdout_scored"] for r in summary["rounds"]] == scored
    assert all(r["central"] == {} for r in summary["rounds"] if not r["holdout_scored"])
    holdout_files = sorted(p.name for p in (tmp_path / "runs" / "seg" / "holdout").iterdir())
    assert holdout_files == [f"round-{r:03d}.npz" for r, s in enumerate(scored) if s]
    for r in (r for r in summary["rounds"] if r["holdout_scored"]):
        c = r["central"]
        assert set(c) >= {"dice-lung", "dice-nodule", "dice-mean", "loss"}, c
        assert 0.0 <= c["dice-lung"] <= 1.0 and 0.0 <= c["dice-mean"] <= 1.0
    for r in summary["rounds"][1:]:
        for site in ("hospital-1", "hospital-2"):
            h = r["hospitals"][site]
            assert h["status"] == "ok" and 0 < h["epsilon_run"] <= 8.0
    # Hospitals release (DP) validation counts after the last round only, by default.
    assert all("eval" not in h for h in summary["rounds"][1]["hospitals"].values())
    for h in summary["rounds"][2]["hospitals"].values():
        assert "dice-lung" in h["eval"] and "dice-mean" in h["eval"]
    # The 3D recipe evaluates its last round as predict will use the model: mirrored (8 passes).
    flips = arch == "slice-unet"
    assert [r["test_time_flips"] for r in summary["rounds"]] == [False, False, flips]
    best = torch.load(tmp_path / "runs" / "seg" / "checkpoints" / "best.pt", weights_only=True)
    assert best["predict"]["test_time_flips"] is flips
    card = (tmp_path / "runs" / "seg" / "model-card.md").read_text()
    assert ("Predicted with test-time mirroring" in card) is flips
    means = {r["round"]: r["central"]["dice-mean"] for r in summary["rounds"] if r["central"]}
    assert best["round"] == max(means, key=means.get) == summary["best"]["round"]


def test_the_segmentation_loss_is_per_case_and_weights_structures_against_background():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    task = SegmentationTask(tuple(CLASSES))
    logits = torch.randn(4, 3, 8, 8, requires_grad=True)
    target = torch.zeros(4, 1, 8, 8, dtype=torch.long)
    target[:, :, 1:5, 1:5] = 1  # an organ: 16 of 64 voxels (48 background: weight 3)
    target[:2, :, 2, 2] = 2  # a small structure in two cases, 1 voxel (48: capped at 10)
    monai = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)
    assert torch.allclose(task.loss_fn()(logits, target), monai(logits, target))  # weight 1

    def case0_gradient(loss_fn, labels):
        return torch.autograd.grad(loss_fn(logits, labels), logits)[0][0]

    other = target.clone()
    other[1:] = 2  # the other cases' labels change; case 0's own gradient must not
    weighted = task.loss_fn(10.0)
    assert torch.allclose(case0_gradient(weighted, target), case0_gradient(weighted, other))
    # torch's weight= normalises by the whole batch's weights: cases would leak into each other.
    pooled = DiceCELoss(
        to_onehot_y=True, softmax=True, batch=False, weight=torch.tensor([1.0, 10.0, 10.0])
    )
    assert not torch.allclose(case0_gradient(pooled, target), case0_gradient(pooled, other))
    # Per case, a structure weighs background voxels / its voxels, within [1, 10].
    weights = weighted.class_weights(target[:, 0], 3)
    expected = torch.tensor([[1.0, 48 / 15, 10.0]] * 2 + [[1.0, 3.0, 1.0]] * 2)  # absent: 1
    assert torch.allclose(weights, expected)
    # reduction "none" (Opacus' ghost clipping asks for it): each case's own term, mean = the loss.
    weighted.reduction = "none"
    per_case = weighted(logits, target)
    weighted.reduction = "mean"
    assert per_case.shape == (4,) and torch.allclose(per_case.mean(), weighted(logits, target))
    assert torch.allclose(per_case[0], weighted(logits[:1], target[:1]))
    # The small structure's share of the case's gradient grows with the weight.
    g1, g10 = case0_gradient(task.loss_fn(), target), case0_gradient(weighted, target)
    small = target[0, 0] == 2
    share = [g[:, small].norm() / g.norm() for g in (g1, g10)]
    assert share[1] > 2 * share[0]
    # Over a run the weight decays along the run's cosine to 1 (plain Dice + CE) at the end.
    decayed = [task.loss_fn(10.0, progress).structure_weight for progress in (0.0, 0.5, 1.0)]
    assert decayed == pytest.approx([10.0, 5.5, 1.0])
    with pytest.raises(ValueError, match="structure-weight"):
        task.loss_fn(0.5)
