"""Secure aggregation (issue 18): Flower's SecAgg+ in a real simulation, and its config rules.

The simulation runs fedvox's ServerApp inside tests/secagg_recording_server.py, which keeps
every message the server receives. Three phantom hospitals; hospital-3 states a lifetime limit
below the run's epsilon, so it refuses and stays in the protocol with a zero update. After
round 1 (of a 2-round plan) the test checks what the server held against what each node
released (its kept update and its ledger), then resumes the run for round 2.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError, RunConfig
from common.protocol import _ROUNDING
from common.secagg_settings import QUANTIZATION, SECAGG_REPLY_RECORDS
from server.secagg_round import SecureAggregationFailed, Sharing
from simulations.harness.local import LocalFederation
from simulations.phantoms.sites import make_phantom_sites

ROOT = Path(__file__).resolve().parents[1]
SITES = ("hospital-1", "hospital-2", "hospital-3")


# -- config -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg"])
def test_robust_aggregation_with_secure_aggregation_is_refused_naming_both_keys(strategy):
    with pytest.raises(ConfigError) as err:
        RunConfig.parse({"strategy": strategy, "secure-aggregation": True})
    assert f'strategy="{strategy}"' in str(err.value)
    assert "secure-aggregation=true" in str(err.value)
    RunConfig.parse({"strategy": strategy})  # each alone is fine
    RunConfig.parse({"strategy": "fedadam", "secure-aggregation": True})


@pytest.mark.parametrize(
    "hospitals, shares, threshold, expected",
    [
        (3, 0, 0, (3, 2)),  # everyone holds shares; a majority rebuilds: survives 1 loss
        (5, 0, 0, (5, 3)),
        (20, 0, 0, (20, 11)),
        (20, 4, 0, (5, 3)),  # SecAgg+ neighbourhoods are odd
        (3, 0, 3, (3, 3)),  # no loss tolerated
        (2, 0, 0, (2, 2)),
    ],
)
def test_shares_and_threshold_per_round(hospitals, shares, threshold, expected):
    plan = Sharing.for_round(hospitals, shares, threshold)
    assert (plan.shares, plan.threshold) == expected
    assert plan.tolerated_dropouts == expected[0] - expected[1]


def test_docs_list_what_a_secagg_reply_carries():
    text = (ROOT / "docs" / "privacy.md").read_text()
    for key in SECAGG_REPLY_RECORDS:
        assert f"`{key}`" in text, key


def test_a_threshold_above_the_shares_is_refused():
    with pytest.raises(ConfigError, match="secagg-threshold=5 is more than secagg-shares=3"):
        RunConfig.parse({"secagg-shares": 3, "secagg-threshold": 5})
    with pytest.raises(SecureAggregationFailed, match="secagg-threshold=4"):
        Sharing.for_round(3, 0, 4)


# -- a real simulation --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg")
    make_phantom_sites(
        "blobs-2d", root / "data", hospitals=3, cases_per_site=48, holdout_cases=40, seed=3
    )
    state = root / "node-state"
    (state / "hospital-3").mkdir(parents=True)
    (state / "hospital-3" / "node.toml").write_text("max-epsilon = 1.0\n")  # it refuses
    app = root / "app"  # fedvox's pyproject; the recording ServerApp around fedvox's main
    app.mkdir()
    text = (ROOT / "pyproject.toml").read_text()
    text, n = re.subn(r'serverapp = "[^"]*"', 'serverapp = "secagg_recording_server:app"', text)
    assert n == 1
    (app / "pyproject.toml").write_text(text)
    shutil.copy(ROOT / "tests" / "secagg_recording_server.py", app)
    record = root / "received"
    env = {"FEDVOX_TEST_RECORD": str(record)}
    with LocalFederation(root / "sim", app_dir=app, extra_env=env) as fed:
        fed.root, fed.record = root, record
        fed.base = {
            "data-dir": str(root / "data"),
            "output-dir": str(root / "runs"),
            "state-dir": str(state),
            "batch-size": 16,
            "seed": 0,
            "target-epsilon": 8.0,
            "secure-aggregation": True,
        }
        yield fed
    assert fed.procs.alive_pids() == []


def _summary(sim, name: str) -> dict:
    return json.loads((sim.root / "runs" / name / "summary.json").read_text())


@pytest.fixture(scope="module")
def first(sim):
    res = sim.run(
        {**sim.base, "run-name": "sa", "num-server-rounds": 1, "total-rounds": 2},
        num_supernodes=3,
        timeout=600,
        name="sa",
    )
    assert res.returncode == 0, res.output[-6000:]
    summary = _summary(sim, "sa")
    assert summary["status"] == "finished", (summary.get("error"), res.output[-6000:])
    uid = summary["run_uid"]
    updates, weights = {}, {}
    ckpt = sim.root / "runs" / "sa" / "checkpoints"
    start = torch.load(ckpt / "round-000.pt", weights_only=True)["state_dict"]
    for site in SITES[:2]:  # what each training node released (kept until the next round)
        node = sim.root / "node-state" / site
        trained = torch.load(node / "releases" / f"{uid}-round001-train.pt", weights_only=True)
        updates[site] = {k: (trained[k] - start[k]).double().numpy() for k in start}
        ledger = json.loads((node / "privacy_ledger.json").read_text())
        weights[site] = _ROUNDING["num-examples"](ledger["runs"][uid]["num_examples_released"])
    received = [pickle.loads(p.read_bytes()) for p in sorted(sim.record.glob("*.pkl"))]
    after = torch.load(ckpt / "round-001.pt", weights_only=True)["state_dict"]
    return summary, start, updates, weights, received, after


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def test_the_server_never_holds_one_hospitals_update(first):
    summary, start, updates, weights, received, _ = first
    step = QUANTIZATION.step * QUANTIZATION.max_weight / min(weights.values())
    big = {k: v.numpy() for k, v in start.items() if v.numel() >= 200}
    checked = 0
    for entry in received:
        for x in entry["arrays"]:
            x = x.astype(np.float64).ravel()
            for name, w0 in big.items():
                if x.size not in (w0.size, w0.size + 1):  # +1: a masked vector's weight slot
                    continue
                x_ = x[-w0.size :]
                checked += 1
                for site, update in updates.items():
                    mine = update[name].ravel()
                    for own in (mine, mine + w0.ravel()):  # the update, the trained weights
                        assert np.abs(x_ - own).max() > step, (site, name)
                        assert abs(_corr(x_, own)) < 0.5, (site, name)
    # Each of the three nodes' masked vectors had every large tensor, so none went unchecked.
    assert checked >= 3 * len(big)
    allowed = {"metrics", "node", *SECAGG_REPLY_RECORDS}
    for entry in received:  # the weight leaves only masked
        assert set(entry["records"]) <= allowed, entry["records"]
        assert all("num-examples" not in m for m in entry["metrics"].values())
        assert entry["metrics"].get("fitres.num_examples", {}).get("num_examples", 0) == 0


def test_the_aggregate_is_the_weighted_fedavg_of_the_updates_within_quantization(first):
    _, start, updates, weights, _, after = first
    total = sum(weights.values())
    q = QUANTIZATION
    share = sum(w / q.max_weight for w in weights.values())
    # Each node's scaled update is off by < one step; the mean divides their sum by `share`.
    # The weights themselves are quantised to 1 / quantization_range of max_weight.
    for name, w0 in start.items():
        fedavg = sum(weights[s] * updates[s][name] for s in updates) / total
        largest = max(np.abs(updates[s][name]).max() for s in updates)
        bound = (3 * q.step + 3 * largest / q.quantization_range) / share + 1e-6
        got = after[name].double().numpy() - w0.double().numpy()
        assert np.abs(got - fedavg).max() <= bound, name
    # A plain mean would not pass: the weights differ by a count the server never saw.
    # (When the noisy counts happen to be equal this says nothing, hence no assertion.)


def test_status_and_epsilon_come_back_in_the_clear_and_a_refusal_is_handled(first):
    summary = first[0]
    hospitals = summary["rounds"][1]["hospitals"]
    for site in SITES[:2]:
        h = hospitals[site]
        assert h["status"] == "ok" and 0 < h["epsilon_run"] <= 8.0, h
        assert h["num_examples"] is None  # never seen in the clear
    refused = hospitals["hospital-3"]
    assert refused["status"] == "refused" and "max-epsilon 1" in refused["reason"], refused
    assert summary["rounds"][1]["central"]["auc"] is not None


def test_resume_continues_under_secure_aggregation(sim, first):
    run_dir = sim.root / "runs" / "sa"
    res = sim.run(
        {**sim.base, "resume-from": str(run_dir), "num-server-rounds": 1, "total-rounds": 2},
        num_supernodes=3,
        timeout=600,
        name="sa-resume",
    )
    assert res.returncode == 0, res.output[-6000:]
    summary = _summary(sim, "sa")
    assert summary["status"] == "finished", summary.get("error")
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2], res.output[-3000:]
    assert summary["rounds"][2]["hospitals"]["hospital-1"]["status"] == "ok"
    assert (run_dir / "checkpoints" / "round-002.pt").is_file()
