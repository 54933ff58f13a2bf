"""`fedvox audit privacy` (issue 19): the statistics on constructed cases, the auditor catches
broken DP (no noise, no clipping, a wrong sample rate in the accountant) and does not flag the
real code. Real Opacus, real fast DP, the real privacy gate and ledger; a small phantom site."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from simulations.audit.faults import NO_CLIPPING, NO_NOISE, NONE, WRONG_SAMPLE_RATE
from simulations.audit.privacy import (
    AuditSettings,
    audit_config,
    audit_privacy,
)
from simulations.audit.stats import (
    attack_metrics,
    dp_auc_bound,
    dp_tpr_bound,
    one_run_ceiling,
    one_run_epsilon,
)
from simulations.cli import main
from simulations.phantoms.sites import make_phantom_sites

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
]
DELTA = 1e-5
# Small enough for CI (seconds a run), large enough that each fault is visible at epsilon = 1:
# 10 rounds x 2 local epochs, batch 64 over ~190 cases (q = 1/3). Depth 3: the last conv (3x3
# maps) takes fast DP's ghost-norm path, the others materialise per-sample gradients, so both
# ways a canary's gradient is replaced are exercised.
SMALL = (
    'model="cnn" learning-rate=0.01 batch-size=64 local-epochs=2 num-server-rounds=10 '
    "model-width=8 model-depth=3 augmentation=false"
)
CANARIES = 300


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit")
    make_phantom_sites(
        "blobs-2d", root, hospitals=1, cases_per_site=60, holdout_cases=10, seed=3,
        image_size=(12, 12),
    )  # fmt: skip
    return root / "hospital-1"


def _audit(site: Path, tmp: Path, epsilon: float, fault: str = NONE) -> dict:
    cfg, _ = audit_config([SMALL, f"target-epsilon={epsilon}"])
    return audit_privacy(site, cfg, AuditSettings(canaries=CANARIES, fault=fault), tmp)


# -- the statistics ---------------------------------------------------------------------------


def test_all_canaries_guessed_right_the_bound_rises_with_their_number():
    counts = (20, 50, 100, 200, 500, 1000)
    bounds = [one_run_epsilon(np.ones(m // 2), np.zeros(m // 2), DELTA) for m in counts]
    assert bounds[0] > 0
    assert all(b < c for b, c in zip(bounds, bounds[1:], strict=False)), bounds
    assert bounds[-1] == pytest.approx(one_run_ceiling(500, 500, DELTA))
    # ...and falls as the confidence asked for rises.
    assert one_run_epsilon(np.ones(100), np.zeros(100), DELTA, 0.99) < bounds[3]


def test_random_guesses_give_a_bound_near_zero():
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores, members = rng.normal(size=1000), rng.random(1000) < 0.5
        assert one_run_epsilon(scores[members], scores[~members], DELTA) < 0.1
        assert attack_metrics(scores[members], scores[~members])["attack_auc"] == pytest.approx(
            0.5, abs=0.06
        )


def test_a_known_leak_is_bounded_on_both_sides():
    """Scores of an epsilon = 2 randomised response: members say "in" with e^2/(1+e^2)."""
    rng = np.random.default_rng(1)
    members = rng.random(2000) < 0.5
    truthful = rng.random(2000) < math.exp(2) / (1 + math.exp(2))
    scores = np.where(truthful, members, ~members).astype(float)
    bound = one_run_epsilon(scores[members], scores[~members], 1e-6)
    assert 1.0 < bound <= 2.0


def test_the_dp_limits_of_an_attack():
    assert dp_tpr_bound(0.0, 0.0) == pytest.approx(0.01)
    assert dp_tpr_bound(1.0, 1e-5) == pytest.approx(math.e * 0.01 + 1e-5)
    assert dp_tpr_bound(math.inf, 0.0) == 1.0
    aucs = [dp_auc_bound(e, 1e-5) for e in (0.0, 0.5, 1.0, 8.0)]
    assert aucs[0] == pytest.approx(0.5, abs=1e-3)
    assert all(a < b for a, b in zip(aucs, aucs[1:], strict=False)) and aucs[-1] < 1.0
    perfect = attack_metrics(np.ones(50), np.zeros(50))
    assert perfect == {"attack_auc": 1.0, "tpr_at_1pct_fpr": 1.0}


# -- the auditor on fedvox's own DP-SGD -------------------------------------------------------


@pytest.mark.parametrize("fault", [NO_NOISE, NO_CLIPPING, WRONG_SAMPLE_RATE])
def test_broken_dp_is_detected(site, tmp_path, fault):
    result = _audit(site, tmp_path, 1.0, fault)
    assert 0.95 < result["claimed_epsilon"] <= 1.0  # the ledger is fooled
    assert result["lower_bound_epsilon"] > result["claimed_epsilon"], result
    assert result["flagged"]


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_the_real_code_is_not_flagged(site, tmp_path, epsilon):
    result = _audit(site, tmp_path, epsilon)
    # The claim is the training's share of the run's epsilon: the planned validation releases
    # (which the audit does not make) hold back a few percent of the target.
    assert 0.95 * epsilon < result["claimed_epsilon"] <= epsilon
    assert result["lower_bound_epsilon"] < result["claimed_epsilon"], result
    assert not result["flagged"]
    assert result["canaries_in"] + result["training_cases"] > CANARIES // 2


def test_the_command_writes_the_audit(site, tmp_path):
    out = tmp_path / "audit.json"
    argv = ["audit", "privacy", "--data", str(site), "-c", SMALL, "-c", "target-epsilon=1"]
    assert main([*argv, "--canaries", "100", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("claimed_epsilon", "lower_bound_epsilon", "confidence", "canaries"):
        assert isinstance(result[key], int | float), key
    assert result["canaries"] == 100 and result["confidence"] == 0.95
    assert "every round's weight update" in result["threat_model"]
    assert result["wall_s"] >= 0 and result["run_config"]["target-epsilon"] == 1
    assert str(site) not in out.read_text()  # a hospital's path never lands in a report


def test_the_harness_trains_exactly_as_the_node_does(site, tmp_path, monkeypatch):
    """Without canaries, one audited round and one round of the real ClientApp handler, from the
    same weights and random state, release the very same weights, sigma and epsilon: the audit
    measures the node's own path. (A node's DP draws are fresh OS entropy: only a test pins
    them, here to the same generators and released count for both.)"""
    import torch
    from node_messages import context, message

    from client import gate
    from client.app import train
    from common import privacy

    monkeypatch.setattr(gate, "_noisy_count", lambda n, noise: 10 * round(n / 10 + 1))
    from simulations.audit.canaries import Canaries
    from simulations.audit.privacy import _node, _round

    cfg, overrides = audit_config([SMALL, "num-server-rounds=1 target-epsilon=1"])
    node = _node(site, cfg, tmp_path / "harness")
    node.plan = replace(node.plan, server_round=1)
    data = node.load("train")
    weights = node.build_model(data).state_dict()
    canaries = Canaries(2, rounds=1)
    canaries.members[:] = False  # no canary in the data: the node's own training set
    torch.manual_seed(5)
    with privacy.pinned_generators(5):
        audited, run = _round(node, data, data.images, data.labels, weights, canaries, NONE)
    torch.manual_seed(5)
    run_config = {**overrides, "data-dir": str(site.parent), "state-dir": str(tmp_path / "node")}
    with privacy.pinned_generators(5):
        reply = train(message(weights, 1), context(run_config))
    metrics = reply.content.metric_records["metrics"]
    assert metrics["noise-multiplier"] == pytest.approx(run["sigma"], rel=1e-3)
    assert metrics["epsilon-run"] == pytest.approx(run["epsilon_run"], rel=1e-9)
    released = reply.content.array_records["arrays"].to_torch_state_dict()
    assert set(released) == set(audited)
    assert all(torch.equal(released[k], audited[k]) for k in audited)


# -- the canary count follows the recipe it audits -------------------------------------------

# The recipe's own settings (what `-c "target-epsilon=1"` gives), with fewer rounds and epochs.
SHORT = "num-server-rounds=1 local-epochs=1"


@pytest.fixture(scope="module")
def demo_sized_site(tmp_path_factory) -> Path:
    """28 x 28 like the demo hospitals: which layers fast DP ghost-norms depends on map size."""
    root = tmp_path_factory.mktemp("audit-28")
    make_phantom_sites("blobs-2d", root, hospitals=1, cases_per_site=40, holdout_cases=4, seed=4)
    return root / "hospital-1"


def test_the_default_canaries_fit_the_epsilon_1_recipe(demo_sized_site, tmp_path):
    """At epsilon 1 the recipe's scatter-cnn has a narrower head: fewer weights have per-sample
    gradients of their own than at epsilon 8, and the default canary count follows."""
    out = tmp_path / "audit.json"
    argv = ["audit", "privacy", "--data", str(demo_sized_site), "-c", f"target-epsilon=1 {SHORT}"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["canaries_asked"] is None
    assert 2 <= result["canaries"] == min(result["canary_weights"], 1000)
    assert result["canaries"] < 400  # the fixed default this recipe no longer had room for
    members = result["canaries_in"]
    ceiling = one_run_ceiling(members, result["canaries"] - members, result["delta"])
    assert result["ceiling_epsilon"] == pytest.approx(ceiling)
    assert result["lower_bound_epsilon"] <= result["claimed_epsilon"] <= 1.0


def test_too_many_canaries_asked_for_is_a_one_line_error(demo_sized_site, tmp_path, capsys):
    out = tmp_path / "audit.json"
    out.write_text("an earlier audit\n")
    argv = ["audit", "privacy", "--data", str(demo_sized_site), "-c", f"target-epsilon=1 {SHORT}"]
    assert main([*argv, "--canaries", "5000", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("fedvox audit privacy: error: --canaries 5000: at most "), err
    assert out.read_text() == "an earlier audit\n"  # nothing good on disk is lost


def test_a_segmentation_site_is_audited(tmp_path):
    root = tmp_path / "sites"
    make_phantom_sites(
        "lung-ct-2d", root, hospitals=1, cases_per_site=12, holdout_cases=2, seed=1,
        image_size=(32, 32),
    )  # fmt: skip
    cfg, _ = audit_config([f"target-epsilon=8 {SHORT}"])
    result = audit_privacy(root / "hospital-1", cfg, AuditSettings(canaries=20), tmp_path / "w")
    assert result["canaries"] == 20 and result["canary_weights"] >= 20
    assert result["lower_bound_epsilon"] <= result["claimed_epsilon"] <= 8.0
