"""What a run leaves a person, end to end on real Flower simulations (issue 17).

One private simulation SuperLink for the module and two 2-round runs on tiny phantoms, 2
hospitals: a classification run (blobs-2d) and a segmentation run (lung-ct-2d at 32x32). Then:
report.html renders in a real headless Chromium with every image decoded; the model card is
there; `flwr run --stream` shows one line per round and no line twice; `fedvox predict` on the
holdout reproduces the server's held-out AUC; segmentation masks from predict sit on the
input's own grid, also for an input that is neither RAS nor at the model's size.
"""

from __future__ import annotations

import csv
import json
from collections import Counter

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from simulations.cli import main as fedvox
from simulations.harness.local import LocalFederation
from simulations.phantoms.sites import make_phantom_sites
from tests import browser
from tests.nifti_factory import write_nifti


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    make_phantom_sites("blobs-2d", root / "blobs", 2, cases_per_site=48, holdout_cases=40, seed=1)
    make_phantom_sites(
        "lung-ct-2d",
        root / "lung",
        2,
        cases_per_site=16,
        holdout_cases=8,
        seed=2,
        image_size=(32, 32),
    )
    base = {
        "output-dir": str(root / "runs"),
        "batch-size": 16,
        "num-server-rounds": 2,
        "local-epochs": 1,
        "seed": 0,
    }
    outputs = {}
    with LocalFederation(root / "sim") as fed:
        for name, data in (("cls", "blobs"), ("seg", "lung")):
            config = {
                **base,
                "data-dir": str(root / data),
                "run-name": name,
                "state-dir": str(root / f"state-{name}"),
            }
            result = fed.run(config, num_supernodes=2, timeout=600, name=name)
            assert result.returncode == 0, result.output[-6000:]
            outputs[name] = result.output
    assert fed.procs.alive_pids() == []  # every process the runs started is gone
    return root, outputs


def test_report_and_model_card_are_written_with_the_run(runs):
    root, _ = runs
    for name in ("cls", "seg"):
        run = root / "runs" / name
        assert (run / "report.html").stat().st_size > 10_000, name
        card = (run / "model-card.md").read_text()
        for heading in ("## Intended use", "## Privacy", "## Held-out performance", "## Known"):
            assert heading in card, (name, heading)
        assert "| hospital-1 |" in card and "| hospital-2 |" in card
    card = (root / "runs" / "cls" / "model-card.md").read_text()
    auc_row = next(line for line in card.splitlines() if line.startswith("| auc |"))
    estimate, low, high = (float(x) for x in auc_row.replace("–", "|").split("|")[2:5])
    assert low <= estimate <= high
    assert sorted(p.name for p in (root / "runs" / "cls" / "report").glob("*.png")) == [
        "confusion.png",
        "epsilon.png",
        "metrics.png",
        "reliability.png",
        "roc.png",
    ]
    assert (root / "runs" / "seg" / "report" / "slices.png").is_file()


@pytest.mark.parametrize("name, images", [("cls", 5), ("seg", 3)])
def test_report_renders_in_headless_chromium(runs, tmp_path, name, images):
    if browser.chromium() is None:
        pytest.skip("no chromium found and none could be installed")
    root, _ = runs
    decoded, shot = browser.render(root / "runs" / name / "report.html", tmp_path)
    assert len(decoded) == images, decoded
    assert all(w > 100 and h > 100 for w, h, _ in decoded), decoded  # no broken image
    assert shot.stat().st_size > 20_000


def test_stream_shows_one_line_per_round_and_nothing_twice(runs):
    root, outputs = runs
    lines = [line for line in outputs["cls"].splitlines() if line.strip()]
    rounds = [line for line in lines if "fedvox round" in line]
    assert len(rounds) == 3, rounds
    for i, line in enumerate(rounds):
        assert f"fedvox round {i}/2 · held-out AUC" in line
    assert "max ε" in rounds[2] and "round " in rounds[2].split("·")[-1]
    assert "ETA" in rounds[1]
    assert not [line for line, n in Counter(lines).items() if n > 1]
    # The server's own work starts only once the simulation's Ray is up (server/grid.py
    # wait_for_simulation_runtime: a fork inside ray.init() beside it hung two CI runs).
    up = [i for i, line in enumerate(lines) if "simulation runtime up after" in line]
    assert up and up[0] < lines.index(rounds[0]), lines[:40]
    assert "configure_train" not in outputs["cls"] and "Sampled" not in outputs["cls"]
    log = (root / "runs" / "cls" / "server.log").read_text()
    assert "configure_train: Sampled 2 nodes" in log and "held-out auc" in log
    assert "Dice" in [line for line in outputs["seg"].splitlines() if "round 2/2" in line][0]


@pytest.mark.parametrize("checkpoint, index", [("last", -1), ("round-1", 1)])
def test_predict_on_the_holdout_reproduces_the_servers_auc(runs, tmp_path, checkpoint, index):
    root, _ = runs
    run, holdout = root / "runs" / "cls", root / "blobs" / "holdout"
    argv = ["predict", "--run", str(run), "--checkpoint", checkpoint, str(holdout)]
    assert fedvox([*argv, "--out", str(tmp_path)]) == 0
    rows = {r["case"]: r for r in csv.DictReader(open(tmp_path / "predictions.csv"))}
    truth = {r["case"]: int(r["label"]) for r in csv.DictReader(open(holdout / "labels.csv"))}
    y = np.array([truth[c] for c in rows])
    p = np.array([float(r["probability"]) for r in rows.values()])
    pred = np.array([int(r["label"]) for r in rows.values()])
    central = json.loads((run / "summary.json").read_text())["rounds"][index]["central"]
    assert abs(roc_auc_score(y, p) - central["auc"]) <= 0.005
    assert (pred[y == 1] == 1).mean() == pytest.approx(central["sensitivity"])
    assert (pred[y == 0] == 0).mean() == pytest.approx(central["specificity"])


def _reoriented(img):
    """The same scan in another voxel order: axes swapped, both flipped (LPS-like)."""
    data = np.asarray(img.dataobj)[::-1, ::-1].T.copy()
    nx, ny = img.shape[:2]
    # new voxel (i, j) = old voxel (nx-1-j, ny-1-i): compose that map with the old affine.
    to_old = np.array([[0, -1, 0, nx - 1], [-1, 0, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    return data, img.affine @ to_old


def _upsampled(img):
    """The same scan at twice the resolution (half the voxel size, same field of view)."""
    data = np.kron(np.asarray(img.dataobj), np.ones((2, 2))).astype(np.int16)
    affine = img.affine @ np.diag([0.5, 0.5, 1.0, 1.0])
    affine[:2, 3] -= 0.25 * np.diag(img.affine)[:2]  # voxel centres of the finer grid
    return data, affine


def test_segmentation_masks_sit_on_the_inputs_own_grid(runs, tmp_path):
    root, _ = runs
    source = sorted((root / "lung" / "holdout" / "images").glob("*.nii.gz"))[0]
    img = nib.load(source)
    inputs = {"orig": (np.asarray(img.dataobj), img.affine)}
    inputs["lps"], inputs["fine"] = _reoriented(img), _upsampled(img)
    paths = [str(write_nifti(tmp_path / "in" / f"{k}.nii.gz", *v)) for k, v in inputs.items()]
    out = tmp_path / "out"
    argv = ["predict", "--run", str(root / "runs" / "seg"), *paths, "--out", str(out)]
    assert fedvox([*argv, "--saliency"]) == 0
    masks = {}
    for key, (data, affine) in inputs.items():
        mask = nib.load(out / f"{key}_mask.nii.gz")
        assert mask.shape == data.shape and np.allclose(mask.affine, affine), key
        assert nib.load(out / f"{key}_saliency.nii.gz").shape == data.shape
        masks[key] = np.asarray(mask.dataobj)
    # Same world grid in another voxel order: the very same labels once put back in order.
    assert np.array_equal(_reoriented(nib.Nifti1Image(masks["orig"], img.affine))[0], masks["lps"])
    # Twice the resolution: each coarse voxel's label is the majority of its 2x2 fine voxels.
    fine = masks["fine"].reshape(masks["orig"].shape[0], 2, masks["orig"].shape[1], 2)
    votes = np.stack([(fine == k).sum(axis=(1, 3)) for k in range(3)]).argmax(0)
    assert (votes == masks["orig"]).mean() >= 0.9


def test_fedvox_report_rebuilds_the_page_from_the_run_folder(runs):
    root, _ = runs
    run = root / "runs" / "cls"
    (run / "report.html").unlink()
    assert fedvox(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5
    assert "hospital-1" in page and "Best–worst site gap" in page
