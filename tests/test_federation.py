"""End-to-end federated DP runs on a real Flower simulation (issue 3).

One private simulation SuperLink for the module; three `flwr run`s in order:
a first run (stopped after round 2 of a 3-round privacy plan), its resume, and a
second run over the same persistent node ledgers where one hospital's lifetime
budget is spent. Every process is ended by PID when the module finishes.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from opacus.accountants import RDPAccountant

from common.tasks import ModelSpec, build_task_model
from common.weights import fingerprint
from simulations.harness.local import LocalFederation
from simulations.phantoms.sites import make_phantom_sites

TARGET_EPS = 8.0
DELTA = 1e-5


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    make_phantom_sites(
        "blobs-2d", root / "data", hospitals=2, cases_per_site=48, holdout_cases=40, seed=1
    )
    with LocalFederation(root / "sim") as federation:
        federation.root = root
        federation.base = {
            "data-dir": str(root / "data"),
            "output-dir": str(root / "runs"),
            "state-dir": str(root / "node-state"),
            "batch-size": 16,
            "target-epsilon": TARGET_EPS,
            "target-delta": DELTA,
            "seed": 0,
            # Hospitals release DP validation counts after every round (default: the last).
            "local-evaluation": "every",
        }
        yield federation
        # Nothing the runs started may outlive them (a leftover SuperLink holds CI open).
    assert federation.procs.alive_pids() == []


def _run(fed, name: str, **overrides):
    result = fed.run({**fed.base, **overrides}, num_supernodes=2, timeout=600, name=name)
    assert result.returncode == 0, result.output[-6000:]
    return result


def _summary(fed, run_name: str) -> dict:
    return json.loads((fed.root / "runs" / run_name / "summary.json").read_text())


@pytest.fixture(scope="module")
def first_run(fed):
    _run(fed, "first", **{"run-name": "first", "num-server-rounds": 2, "total-rounds": 3})
    return _summary(fed, "first")


def test_summary_has_central_metrics_for_rounds_0_to_2(first_run):
    assert [r["round"] for r in first_run["rounds"]] == [0, 1, 2]
    for r in first_run["rounds"]:
        assert set(r["central"]) >= {"auc", "accuracy", "sensitivity", "specificity", "loss"}
        assert 0.0 <= r["central"]["auc"] <= 1.0
    assert first_run["rounds"][0]["hospitals"] == {}  # round 0 = the initial model
    assert first_run["status"] == "finished"


def test_checkpoints_every_round_and_best(fed, first_run):
    ckpt = fed.root / "runs" / "first" / "checkpoints"
    for name in ("round-000.pt", "round-001.pt", "round-002.pt", "best.pt", "last.pt"):
        assert (ckpt / name).is_file(), name
    best = torch.load(ckpt / "best.pt", weights_only=True)
    aucs = {r["round"]: r["central"]["auc"] for r in first_run["rounds"]}
    assert best["round"] == max(aucs, key=aucs.get) == first_run["best"]["round"]
    assert (fed.root / "runs" / "first" / "roc" / "round-002.json").is_file()


def test_global_weights_load_into_a_fresh_model_without_key_fixups(fed, first_run):
    ck = torch.load(fed.root / "runs" / "first" / "checkpoints" / "last.pt", weights_only=True)
    # The checkpoint says which model (the run's resolved recipe: scatter-cnn for 2D images).
    spec = ModelSpec(**{**ck["model"], "image_size": tuple(ck["model"]["image_size"])})
    assert spec.arch == "scatter-cnn"
    model = build_task_model(spec)
    model.load_state_dict(ck["state_dict"], strict=True)  # no "_module." prefix
    assert not any(k.startswith("_module") for k in ck["state_dict"])
    assert fingerprint(model.state_dict()) == first_run["rounds"][-1]["weights_sha256"]


def test_each_hospital_epsilon_rises_every_round_and_stays_within_target(first_run):
    for site in ("hospital-1", "hospital-2"):
        eps = [r["hospitals"][site]["epsilon_run"] for r in first_run["rounds"][1:]]
        assert all(
            h["status"] == "ok" for r in first_run["rounds"][1:] for h in r["hospitals"].values()
        )
        assert eps[0] > 0 and eps[1] > eps[0], eps
        assert eps[-1] <= TARGET_EPS
        assert first_run["rounds"][1]["hospitals"][site]["num_examples"] > 0
        assert "auc" in first_run["rounds"][1]["hospitals"][site]["eval"]


def _ledger(fed, site: str) -> dict:
    return json.loads((fed.root / "node-state" / site / "privacy_ledger.json").read_text())


def test_reported_epsilon_equals_independent_recomputation_from_ledger(fed, first_run):
    for site in ("hospital-1", "hospital-2"):
        entries = _ledger(fed, site)["entries"]
        assert [(e["round"], e["phase"]) for e in entries] == [
            (0, "count"),  # the noisy training-set size, released once per run
            (1, "train"),
            (1, "evaluate"),
            (2, "train"),
            (2, "evaluate"),
        ]
        assert all(e["status"] == "released" for e in entries)
        acc = RDPAccountant()  # Opacus' own accountant, fed straight from the file
        for e in entries[:4]:  # what was spent when round 2's update left the node
            acc.history.append((e["noise_multiplier"], e["sample_rate"], e["steps"]))
        reported = first_run["rounds"][-1]["hospitals"][site]["epsilon_lifetime"]
        assert reported == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)


@pytest.fixture(scope="module")
def resumed(fed, first_run):
    _run(fed, "resume", **{"resume-from": str(fed.root / "runs" / "first"), "num-server-rounds": 1})
    return _summary(fed, "first")


def test_resume_runs_round_3_from_the_round_2_weights(fed, first_run, resumed):
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2, 3]
    assert resumed["resumed"][0]["at_round"] == 2
    round2 = torch.load(
        fed.root / "runs" / "first" / "checkpoints" / "round-002.pt", weights_only=True
    )
    assert resumed["resumed"][0]["initial_weights_sha256"] == fingerprint(round2["state_dict"])
    assert (fed.root / "runs" / "first" / "checkpoints" / "round-003.pt").is_file()
    for site in ("hospital-1", "hospital-2"):
        h2, h3 = resumed["rounds"][2]["hospitals"][site], resumed["rounds"][3]["hospitals"][site]
        assert h3["status"] == "ok"
        # Same run, same calibration: the run's epsilon keeps counting, within the 3-round plan.
        assert h2["epsilon_run"] < h3["epsilon_run"] <= TARGET_EPS
        assert h3["noise_multiplier"] == h2["noise_multiplier"]
    trained = [e["round"] for e in _ledger(fed, "hospital-1")["entries"] if e["phase"] == "train"]
    assert trained == [1, 2, 3]


def test_spent_budget_refuses_and_the_round_finishes_with_the_others(fed, resumed):
    lifetime_before = resumed["rounds"][3]["hospitals"]["hospital-1"]["epsilon_lifetime"]
    # hospital-2 gets a fresh dataset history; hospital-1's ledger is the one it spent, and
    # hospital-1 states its own lifetime limit (a simulated node's node.toml).
    shutil.rmtree(fed.root / "node-state" / "hospital-2")
    (fed.root / "node-state" / "hospital-1" / "node.toml").write_text("max-epsilon = 8.0\n")
    _run(fed, "second", **{"run-name": "second", "num-server-rounds": 1, "strategy": "fedprox"})
    s = _summary(fed, "second")
    h = s["rounds"][1]["hospitals"]
    assert h["hospital-1"]["status"] == "refused"
    assert "lifetime" in h["hospital-1"]["reason"]
    # A fresh process picked the lifetime epsilon up from the ledger file, not from zero
    # (round 3's validation release came after round 3's training reply).
    acc = RDPAccountant()
    for e in _ledger(fed, "hospital-1")["entries"]:
        acc.history.append((e["noise_multiplier"], e["sample_rate"], e["steps"]))
    assert h["hospital-1"]["epsilon_lifetime"] == pytest.approx(acc.get_epsilon(DELTA))
    assert h["hospital-1"]["epsilon_lifetime"] > lifetime_before
    assert h["hospital-2"]["status"] == "ok" and h["hospital-2"]["epsilon_run"] > 0
    assert s["rounds"][1]["central"]["auc"] is not None
    assert s["status"] == "finished"


def test_more_hospital_folders_than_virtual_nodes_is_a_clear_error(fed):
    make_phantom_sites(
        "blobs-2d", fed.root / "data3", hospitals=3, cases_per_site=16, holdout_cases=12, seed=2
    )
    fed.run(
        {
            **fed.base,
            "data-dir": str(fed.root / "data3"),
            "run-name": "mismatch",
            "num-server-rounds": 1,
        },
        num_supernodes=2,
        timeout=600,
        name="mismatch",
    )
    s = _summary(fed, "mismatch")
    assert s["status"] == "failed"
    assert "3 hospital folders" in s["error"] and "num-supernodes=3" in s["error"]
