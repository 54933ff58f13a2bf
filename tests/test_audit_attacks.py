"""`fedvox audit attacks` (issue 19): the curious server's membership attacks through the real
ClientApp handlers, reported per attack with the DP limit of what the node claimed."""

from __future__ import annotations

import json

import pytest

from simulations.cli import main
from simulations.phantoms.sites import make_phantom_sites

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
]
TINY = 'model="cnn" batch-size=16 local-epochs=1 model-width=4 model-depth=1 augmentation=false'


def test_every_attack_is_reported_with_its_dp_limit(tmp_path):
    make_phantom_sites(
        "blobs-2d", tmp_path / "data", 1, cases_per_site=40, holdout_cases=10, seed=8,
        image_size=(12, 12),
    )  # fmt: skip
    site, out = tmp_path / "data" / "hospital-1", tmp_path / "attacks.json"
    argv = ["audit", "attacks", "--data", str(site), "-c", TINY, "--trials", "8", "--workers", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    attacks = result["attacks"]
    expected = {
        "weights/loss-threshold",
        "weights/gradient-alignment",
        "validation-release/target-bin",
        "training-reply/num-examples",
        "training-reply/epsilon-run",
    }
    assert expected <= set(attacks)
    assert not any(key.endswith(("data-s", "compute-s")) for key in attacks)  # timing: not DP
    for name, attack in attacks.items():
        assert 0.5 <= attack["attack_auc"] <= 1.0, name  # oriented the attacker's best way
        assert 0.0 <= attack["tpr_at_1pct_fpr"] <= 1.0, name
        assert attack["trials"] == 8
        bound = attack["dp_bound"]
        assert 0 < bound["epsilon"] <= 8.0 and bound["delta"] == 1e-5, name
        assert bound["tpr_at_1pct_fpr"] >= 0.01 and 0.5 <= bound["attack_auc"] <= 1.0
    # One validation release costs less than a round of training: its limit is lower.
    val, weights = attacks["validation-release/target-bin"], attacks["weights/loss-threshold"]
    assert val["dp_bound"]["epsilon"] < weights["dp_bound"]["epsilon"]
    assert str(tmp_path) not in out.read_text()  # no hospital path in a report
    assert result["workers"] == 2  # the trials were split over two processes
