"""`fedvox bench utility --quick`: real Flower simulations on phantom data (issue 6 mechanics).

One quick benchmark for the module (2 phantom hospitals, 2 rounds, epsilon 8 and inf, plus
the in-process centralised reference); the tests read its JSON, table and run summaries.
No accuracy numbers are asserted: only that the table is complete and honest.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from common.models import build_model
from simulations.benchmarks.utility import parse_epsilons, parse_overrides, summarise
from simulations.cli import main as fedvox

ROW_KEYS = {
    "setting",
    "epsilon",
    "seeds",
    "auc_mean",
    "auc_sd",
    "acc_mean",
    "acc_sd",
    "worst_site_auc",
    "site_auc_gap",
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-utility")
    out = root / "utility.json"
    # finetune-epochs=1: each hospital also fine-tunes the final model (real Flower run).
    args = ["--quick", "--out", str(out), "--workdir", str(root / "work")]
    rc = fedvox(["bench", "utility", *args, "-c", "finetune-epochs=1"])
    assert rc == 0
    return root, json.loads(out.read_text())


def test_quick_bench_writes_every_row_with_the_issue_keys(bench):
    root, result = bench
    assert {"machine", "date", "rows", "runs"} <= set(result)
    assert result["quick"] is True
    settings = {(r["setting"], r["epsilon"]) for r in result["rows"]}
    assert settings == {("centralised", None), ("fl", None), ("fl-dp", 8.0)}
    for row in result["rows"]:
        assert ROW_KEYS <= set(row), row
        assert row["seeds"] == [0]
        assert 0.0 <= row["auc_mean"] <= 1.0 and 0.0 <= row["acc_mean"] <= 1.0
        assert row["auc_sd"] is None  # one seed: no spread to report
    table = (root / "utility.md").read_text()
    assert "| fl-dp | 8 |" in table and "| fl | ∞ |" in table and "| centralised |" in table


def test_fl_rows_come_from_real_runs_with_validation_chosen_thresholds(bench):
    root, result = bench
    runs_dir = root / "work" / "runs"
    summaries = {p.parent.name: json.loads(p.read_text()) for p in runs_dir.glob("*/summary.json")}
    assert len(summaries) == 2  # epsilon 8 and inf, one seed
    for name, s in summaries.items():
        assert s["status"] == "finished"
        last = s["rounds"][-1]
        assert last["round"] == 2
        # Round 0 has no hospital reports, so no calibration; later rounds have one.
        assert "threshold" not in s["rounds"][0]["central"]
        # The releases were used, not kept; every hospital released about the final model.
        for h in last["hospitals"].values():
            assert "val-hist-pos" not in h["eval"] and "auc" in h["eval"]
            assert "finetuned-auc" in h["eval"]  # its fine-tuned copy's, from its release
        # Fine-tuning happens once, after the last round only; so do evaluations (default).
        assert all("eval" not in h for h in s["rounds"][1]["hospitals"].values())
        eps = [h["epsilon_run"] for h in last["hospitals"].values()]
        if name.endswith("eps8-seed0"):
            assert s["config"]["dp"] is True
            assert all(0 < e <= 8.0 + 1e-6 for e in eps)
            tuned = [h["eval"]["finetuned-epsilon-run"] for h in last["hospitals"].values()]
            assert all(e < t <= 8.0 + 1e-6 for e, t in zip(eps, tuned, strict=True))
        else:
            assert s["config"]["dp"] is False
            # No DP: the node reports epsilon = inf (JSON null), never a finite epsilon, and
            # its validation counts are exact: the threshold is chosen on them.
            assert eps and all(e is None for e in eps)
            assert {"threshold", "temperature", "ece", "ece-raw"} <= set(last["central"])
    fl_row = next(r for r in result["rows"] if r["setting"] == "fl")
    assert fl_row["worst_site_auc_finetuned"] is not None
    assert "worst-site AUC fine-tuned" in (root / "utility.md").read_text()
    dp_row = next(r for r in result["rows"] if r["setting"] == "fl-dp")
    dp_run = next(s for n, s in summaries.items() if n.endswith("eps8-seed0"))
    assert dp_row["auc_mean"] == pytest.approx(dp_run["rounds"][-1]["central"]["auc"])


def test_summarise_means_sds_and_site_spread():
    runs = [
        {"setting": "fl-dp", "epsilon": 8.0, "seed": s, "auc": a, "acc": 0.8, "site_auc": sites}
        for s, a, sites in [
            (0, 0.90, {"h1": 0.7, "h2": 0.9}),
            (1, 0.94, {"h1": 0.8, "h2": math.nan, "h3": 0.95}),
        ]
    ]
    (row,) = summarise(runs)
    assert row["auc_mean"] == pytest.approx(0.92)
    assert row["auc_sd"] == pytest.approx(0.028284, rel=1e-4)
    assert row["acc_sd"] == pytest.approx(0.0)
    assert row["worst_site_auc"] == pytest.approx(0.75)  # mean over seeds of the worst site
    assert row["site_auc_gap"] == pytest.approx((0.2 + 0.15) / 2)


def test_cli_parsing_helpers():
    assert parse_epsilons("1, 3,8,inf") == [1.0, 3.0, 8.0, math.inf]
    with pytest.raises(SystemExit):
        parse_epsilons("0")
    assert parse_overrides('num-server-rounds=5 strategy="fedadam" dp=false') == {
        "num-server-rounds": 5,
        "strategy": "fedadam",
        "dp": False,
    }


def test_non_private_training_leaves_no_privacy_history(sgd):
    torch.manual_seed(0)
    model = build_model(2, 1, 2, width=4, depth=1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 2, (16,))
    before = [p.detach().clone() for p in model.parameters()]
    result = sgd(model, x, y, noise_multiplier=None)
    assert result.history == [] and math.isfinite(result.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # The same call with DP records its (sigma, q, steps) and works after an eval() too.
    model.eval()
    dp = sgd(model, x, y)
    assert [h[0] for h in dp.history] == [1.0]


def test_segmentation_runs_make_per_class_dice_rows_and_a_dice_table():
    from simulations.benchmarks.utility import format_table

    def run(setting, eps, seed, lung, nodule):
        return {
            "setting": setting,
            "epsilon": eps,
            "seed": seed,
            "auc": None,
            "acc": None,
            "site_auc": {},
            "wall_s": 10.0,
            "dice": {"lung": lung, "nodule": nodule, "mean": (lung + nodule) / 2},
            "site_dice": {"hospital-1": 0.8, "hospital-2": 0.6},
        }

    runs = [
        run("fl-dp", 8.0, 0, 0.96, 0.70),
        run("fl-dp", 8.0, 1, 0.98, 0.74),
        run("centralised", None, 0, 0.99, 0.90),
    ]
    rows = summarise(runs)
    assert [(r["setting"], r["epsilon"]) for r in rows] == [("centralised", None), ("fl-dp", 8.0)]
    dp = rows[1]
    assert dp["dice_mean"]["lung"] == pytest.approx(0.97)
    assert dp["dice_sd"]["nodule"] == pytest.approx(0.0283, abs=1e-3)
    assert dp["worst_site_dice"] == pytest.approx(0.6)
    assert dp["auc_mean"] is None
    table = format_table(
        {
            "rows": rows,
            "date": "d",
            "machine": {"cpu": "c", "cores": 2},
            "data": "lung-ct-2d",
            "run_config_overrides": {},
        }
    )
    assert "Dice lung" in table and "Dice nodule" in table and "Dice mean" in table
    assert "| fl-dp | 8 | 2 | 0.970 ± 0.014 |" in table
