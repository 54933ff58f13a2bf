"""Adding an importer is one registry entry: a toy importer (a folder of .npy images + a labels
file -> a site), registered through `client.importers.registry` alone, is a `fedvox import`
subcommand; the site it writes loads, passes `fedvox validate` and trains a real round."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from client.importers.registry import IMPORTERS, Importer, register, unregister
from client.importers.site import ImportInputError, ImportReport
from common.site import load_site
from common.site.writer import open_site
from simulations.cli import main as fedvox
from simulations.phantoms.sites import HOLDOUT_STYLE, generate_blobs


def _add_toy(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, help="folder of <case>.npy (H, W) and labels.txt")


def _run_toy(args: argparse.Namespace) -> ImportReport:
    labels_file = args.src / "labels.txt"
    if not labels_file.is_file():
        raise ImportInputError(f"{labels_file}: missing")
    labels = dict(line.split() for line in labels_file.read_text().splitlines())
    report = ImportReport(f"fedvox import toy {args.src} -> {args.out}")
    with open_site(args.out, "fedvox import toy") as writer:
        for f in sorted(args.src.glob("*.npy")):
            writer.add_arrays(f.stem, np.load(f).T, np.eye(4), label=int(labels[f.stem]))
            report.ok(f"case {f.stem}")
        report.imported = len(report.lines)
        spec = {"task": "classification", "class_names": ["no-blob", "blob"], "modality": "MR"}
        report.site_cases = writer.commit({**spec, "spatial_dims": 2})
    return report


@pytest.fixture
def toy():
    importer = register(Importer("toy", _add_toy, _run_toy, "a folder of .npy images -> a site"))
    yield importer
    unregister("toy")


def _npy_folder(folder: Path, n: int, seed: int) -> None:
    images, labels = generate_blobs(np.random.default_rng(seed), n, (28, 28), HOLDOUT_STYLE)
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        np.save(folder / f"c{i:03d}.npy", image)
    (folder / "labels.txt").write_text("".join(f"c{i:03d} {y}\n" for i, y in enumerate(labels)))


def test_a_toy_importer_from_the_registry_alone_writes_a_site_that_trains(toy, tmp_path, capsys):
    from simulations.harness.inprocess import run_in_process

    data = tmp_path / "data"
    for seed, site in enumerate(("hospital-1", "hospital-2", "holdout")):
        _npy_folder(tmp_path / "npy" / site, 24, seed)
        argv = ["import", "toy", str(tmp_path / "npy" / site), "--out", str(data / site)]
        assert fedvox(argv) == 0, capsys.readouterr()
        assert "24 case(s) imported, 0 skipped; 24 case(s) in the site" in capsys.readouterr().out
        assert fedvox(["validate", str(data / site)]) == 0, capsys.readouterr().out
        assert len(load_site(data / site, "all", log=lambda _m: None)) == 24
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register(Importer("toy", _add_toy, _run_toy, "another toy"))
    run = run_in_process(
        {
            "data-dir": str(data),
            "output-dir": str(tmp_path / "runs"),
            "state-dir": str(tmp_path / "state"),
            "run-name": "toy",
            "num-server-rounds": 1,
            "batch-size": 8,
            "local-epochs": 1,
            "model-width": 4,
            "model-depth": 1,
            "augmentation": False,
        },
        2,
    )
    assert run.error is None and run.summary["status"] == "finished", run.summary.get("reason")
    assert 0.0 <= run.summary["rounds"][1]["central"]["auc"] <= 1.0


def test_an_unknown_importer_is_an_argparse_error_naming_it(capsys):
    assert "png" not in IMPORTERS
    with pytest.raises(SystemExit) as exc:
        fedvox(["import", "png", "photos", "--out", "site"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'png'" in err and "dicom" in err and "nnunet" in err
