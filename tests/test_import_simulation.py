"""An imported DICOM site trains unchanged: 2 hospitals + a holdout, each imported from its own
DICOM export with `fedvox import dicom`, in a real 2-round Flower simulation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from dicom_factory import write_radiograph

from common.site import validate_site
from simulations.cli import main as fedvox


def _xray_export(root: Path, n: int, seed: int) -> str:
    """n one-image DX studies, label 1 = a bright square somewhere; -> labels CSV text."""
    rng = np.random.default_rng(seed)
    rows = ["accession,label"]
    for i in range(n):
        label = i % 2
        pixels = rng.normal(1000, 80, (32, 32))
        if label:
            r, c = rng.integers(2, 20, 2)
            pixels[r : r + 10, c : c + 10] += 900
        acc = f"ACC-{seed}-{i:03d}"
        write_radiograph(
            root / f"st{i:03d}", np.clip(pixels, 0, 4095).astype(np.uint16), accession=acc
        )
        rows.append(f"{acc},{label}")
    return "\n".join(rows) + "\n"


def test_imported_dicom_sites_train_in_a_two_round_simulation(tmp_path, capsys):
    from simulations.harness.local import LocalFederation

    data = tmp_path / "data"
    for seed, site in enumerate(("hospital-1", "hospital-2", "holdout")):
        labels = tmp_path / f"{site}.csv"
        labels.write_text(_xray_export(tmp_path / "pacs" / site, 16, seed))
        argv = ["import", "dicom", str(tmp_path / "pacs" / site), "--out", str(data / site)]
        argv += ["--labels", str(labels), "--state-dir", str(tmp_path / "state" / site)]
        assert fedvox(argv + ["--class-names", "normal,finding"]) == 0, capsys.readouterr().out
        assert validate_site(data / site).exit_code == 0
    with LocalFederation(tmp_path / "sim") as fed:
        result = fed.run(
            {
                "data-dir": str(data),
                "output-dir": str(tmp_path / "runs"),
                "run-name": "dicom",
                "num-server-rounds": 2,
                "local-epochs": 1,
                "batch-size": 8,
                "target-delta": 1e-3,
            },
            num_supernodes=2,
            timeout=600,
        )
        assert result.returncode == 0, result.output[-6000:]
    assert fed.procs.alive_pids() == []
    summary = json.loads((tmp_path / "runs" / "dicom" / "summary.json").read_text())
    assert summary["status"] == "finished", summary.get("error")
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    for r in summary["rounds"][1:]:
        assert 0.0 <= r["central"]["auc"] <= 1.0
        for site in ("hospital-1", "hospital-2"):
            assert r["hospitals"][site]["status"] == "ok", r["hospitals"][site]
