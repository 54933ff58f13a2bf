"""Small segmentation classes: a class the model never marks is named "not learned" in
summary.json, report.html and the model card, and a run too small for its epsilon is warned
about from the hospitals' first released counts (server/learnability.py)."""

from __future__ import annotations

import pytest

from common.protocol import OK, NodeReply
from server.learnability import (
    NOT_LEARNED_DICE,
    SMALL_CLASS_SNR,
    learnability,
    not_learned,
    not_learned_warning,
    run_signal_to_noise,
)
from simulations.harness import inprocess as ip
from simulations.phantoms.sites import make_phantom_sites


def test_only_classes_under_the_floor_are_named():
    central = {"dice-mean": 0.5, "dice-lung": 0.95, "dice-nodule": 0.0, "dice-vessel": float("nan")}
    assert not_learned(central) == {"nodule": 0.0}  # NaN: no holdout case has it, not judged
    assert not_learned({**central, "dice-nodule": NOT_LEARNED_DICE}) == {}
    assert not_learned_warning({**central, "dice-nodule": 0.3}) is None
    assert "Not learned: nodule (held-out Dice 0.000)" in not_learned_warning(central)


def test_signal_to_noise_grows_with_the_cases_and_falls_with_the_noise():
    # the 3D recipe at epsilon 8 (40 rounds x 2 epochs, batch 96): the released training counts
    # of 3 hospitals of 200 and of 120 cases, and the noise multipliers their plans calibrate
    at_200 = run_signal_to_noise([170] * 3, [4.14] * 3, 96, 80)
    at_120 = run_signal_to_noise([100] * 3, [4.14] * 3, 96, 80)
    assert at_200 == pytest.approx(85 * (3 * 160) ** 0.5 / 4.14)  # B sqrt(K T) / sigma
    assert at_120 < SMALL_CLASS_SNR <= at_200
    assert run_signal_to_noise([170] * 3, [8.28] * 3, 96, 80) == pytest.approx(at_200 / 2)
    assert run_signal_to_noise([0, 0], [1.0, 1.0], 96, 80) is None


def test_the_estimate_needs_dp_segmentation_and_released_counts():
    summary = {
        "model": {"task": "segmentation"},
        "config": {"dp": True, "batch-size": 96, "local-epochs": 2, "target-epsilon": 8.0},
        "planned_rounds": 40,
    }
    replies = [
        NodeReply(f"hospital-{i}", OK, "", {"num-examples": 170.0, "noise-multiplier": 4.14})
        for i in (1, 2, 3)
    ]
    entry = learnability(summary, replies)
    assert entry["signal_to_noise"] == pytest.approx(449.8, abs=0.1) and entry["warning"] is None
    few = [NodeReply(r.site, OK, "", {**r.metrics, "num-examples": 100.0}) for r in replies]
    assert "signal-to-noise is 265" in learnability(summary, few)["warning"]
    assert learnability({**summary, "model": {"task": "classification"}}, replies) is None
    assert learnability({**summary, "config": {**summary["config"], "dp": False}}, replies) is None
    # secure aggregation: the count leaves a node only masked, so no estimate
    masked = [NodeReply(r.site, OK, "", {"noise-multiplier": 4.14}) for r in replies]
    assert learnability(summary, masked) is None


def test_a_run_that_misses_a_class_names_it_and_warned_before(tmp_path):
    """2 hospitals x 16 tiny 2D lung-CT slices, one DP round: the nodule is not learned."""
    make_phantom_sites(
        "lung-ct-2d", tmp_path / "data", 2, cases_per_site=16, holdout_cases=12, seed=2,
        image_size=(32, 32),
    )  # fmt: skip
    config = {
        "data-dir": str(tmp_path / "data"),
        "output-dir": str(tmp_path / "runs"),
        "state-dir": str(tmp_path / "state"),
        "run-name": "small",
        "num-server-rounds": 1,
        "batch-size": 8,
        "local-epochs": 1,
        "seed": 0,
    }
    run = ip.run_in_process(config, hospitals=2)
    assert run.error is None and run.summary["status"] == "finished", run.summary.get("reason")
    central = run.summary["rounds"][-1]["central"]
    assert central["dice-nodule"] < NOT_LEARNED_DICE
    missed = run.summary["not_learned"]
    assert missed["round"] == 1 and missed["classes"]["nodule"] == central["dice-nodule"]
    early = run.summary["learnability"]
    assert (
        early["signal_to_noise"] < SMALL_CLASS_SNR
        and "Small structures at risk" in (early["warning"])
    )
    assert len(early["released_counts"]) == 2  # from the replies: released, rounded to 10s
    assert all(c % 10 == 0 for c in early["released_counts"])
    run_dir = tmp_path / "runs" / "small"
    for page in ("report.html", "model-card.md"):
        text = (run_dir / page).read_text()
        named = text[text.index("Not learned:") :].split(". ")[0]
        assert "nodule (held-out Dice 0.0" in named and "Small structures at risk" in text, page
    assert "Not learned:" in (run_dir / "server.log").read_text()
