"""Strategy selection, metrics and run folder pieces of the server."""

from __future__ import annotations

import math
import os
import stat

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp import strategy as fl
from node_messages import message as train_message
from sklearn.metrics import roc_auc_score

from common import strategy_registry
from common.config import ConfigError, RunConfig
from common.files import atomic_write_json
from common.metrics import classification_metrics, roc_points
from common.protocol import NodeReply
from server.checks import UpdateChecker
from server.run_dir import STOPPED, RunDir, check_resume_config
from server.strategy import build_strategy, strategy_class


@pytest.mark.parametrize(
    "name",
    [
        "fedavg",
        "fedprox",
        "fedadam",
        "fedmedian",
        "fedtrimmedavg",
        "fedyogi",
        "fedavgm",
        "fedadagrad",
    ],
)
def test_every_named_strategy_is_the_flower_one(name):
    s = build_strategy(RunConfig.parse({"strategy": name, "proximal-mu": 0.1, "min-nodes": 3}))
    flower = getattr(fl, strategy_registry.get(name).flower_class)
    assert type(s) is strategy_class(name) and isinstance(s, flower)
    assert s.min_available_nodes == 3
    if name == "fedprox":
        assert isinstance(s, fl.FedProx) and s.proximal_mu == 0.1


def test_unknown_strategy_names_the_setting_and_choices():
    with pytest.raises(ConfigError, match="strategy='fedsgd'.*fedavg"):
        RunConfig.parse({"strategy": "fedsgd"})


def test_binary_metrics_agree_with_sklearn_and_confusion_counts():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.4, 0.6, 0.8, 0.3, 0.9, 0.7, 0.2])
    m = classification_metrics(np.stack([1 - p1, p1], 1), labels)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, p1))
    assert m["sensitivity"] == pytest.approx(3 / 4)  # 0.8, 0.9, 0.7 >= 0.5; 0.3 missed
    assert m["specificity"] == pytest.approx(3 / 4)  # 0.6 is a false positive
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert math.isnan(classification_metrics(np.stack([1 - p1, p1], 1), np.zeros(8, int))["auc"])
    pts = roc_points(np.stack([1 - p1, p1], 1), labels)
    assert pts["fpr"][0] == 0.0 and pts["tpr"][-1] == 1.0


def test_multiclass_macro_auc():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    probs = rng.dirichlet([1, 1, 1], 60)
    probs[np.arange(60), labels] += 1.0
    probs /= probs.sum(1, keepdims=True)
    m = classification_metrics(probs, labels)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    assert "sensitivity" not in m


def test_summary_json_is_valid_json_with_nan_as_null(tmp_path):
    atomic_write_json(tmp_path / "s.json", {"auc": float("nan"), "x": [1.0, float("inf")]})
    assert (tmp_path / "s.json").read_text().replace(" ", "").replace(
        "\n", ""
    ) == '{"auc":null,"x":[1.0,null]}'


def test_resume_from_a_folder_without_a_run_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        RunDir.resume(tmp_path)


def test_resume_refuses_a_changed_key_and_names_it(tmp_path):
    cfg = RunConfig.parse({"target-epsilon": 8.0, "num-server-rounds": 3, "run-name": "r"})
    cfg = cfg.resolved("classification", 2)
    run = RunDir.create(cfg, tmp_path, {}, {})
    run.save_checkpoint(0, {}, {}, best=False)
    run.end(STOPPED, "killed")
    again, _ = RunDir.resume(run.path)
    # How long to wait and for how many hospitals may change; rounds stay the run's plan.
    same = cfg.with_values({"round-timeout": 60.0, "min-nodes": 1, "num-server-rounds": 1})
    check_resume_config(again, {**same.as_dict(), "resume-from": str(run.path)}, run.path)
    looser = cfg.with_values({"target-epsilon": 16.0, "seed": 1})
    with pytest.raises(ValueError, match=r"target-epsilon=16\.0 \(the run had 8\.0\)") as err:
        check_resume_config(again, looser.as_dict(), run.path)
    assert "seed=1" in str(err.value) and str(run.path) in str(err.value)
    # `fedvox status RUN --resume-config` prints the -c values a resume passes the check with.
    from flwr.common.config import parse_config_args

    from simulations.status import resume_config

    printed = RunConfig.parse(parse_config_args([resume_config(run.path)]))
    assert printed.resume_from == str(run.path.resolve())
    check_resume_config(again, printed.resolved("classification", 2).as_dict(), run.path)


def test_run_folder_follows_the_umask_other_atomic_writes_stay_private(tmp_path):
    # The SuperLink unit's UMask=0027: the operator's group reads summary.json (fedvox run).
    cfg = RunConfig.parse({"run-name": "r"}).resolved("classification", 2)
    before = os.umask(0o027)
    try:
        run = RunDir.create(cfg, tmp_path, {}, {})
        run.write_summary()
        run.save_checkpoint(1, {}, {}, best=False)
        private = atomic_write_json(tmp_path / "ledger.json", {})
    finally:
        os.umask(before)
    assert stat.S_IMODE((run.path / "summary.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((run.checkpoints / "last.pt").stat().st_mode) == 0o640
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def _train_reply(site: str, count: float, sigma: float, arrays: dict) -> NodeReply:
    message = train_message(
        {k: Array(v) for k, v in arrays.items()}, 1
    )  # a real Flower message carrying `arrays`
    metrics = {"num-examples": count, "noise-multiplier": sigma}
    return NodeReply(site=site, status="ok", reason="", metrics=metrics, message=message)


def test_a_large_site_among_small_noisy_counts_is_accepted_an_inflated_one_is_not():
    # Small sites' released counts sit at the floor of 10 (their noise is larger than they are);
    # a real 300-case site next to them is honest, a claim of 1e5 is not.
    cfg = RunConfig.parse({"target-epsilon": 8.0, "num-server-rounds": 3}).resolved(
        "classification", 2
    )
    weights = {"w": np.zeros((4, 3), dtype=np.float32)}
    checker = UpdateChecker(cfg, total_rounds=3)
    sigma = checker.sigma_max / 2
    small = [_train_reply(f"h{i}", 10.0, sigma, weights) for i in range(4)]
    big = _train_reply("big", 270.0, sigma, weights)
    accepted, rejected = checker.check([*small, big], ArrayRecord({"w": Array(weights["w"])}))
    assert sorted(r.site for r in accepted) == ["big", "h0", "h1", "h2", "h3"] and not rejected

    checker = UpdateChecker(cfg, total_rounds=3)
    liar = _train_reply("liar", 1e5, sigma, weights)
    accepted, rejected = checker.check([*small, liar], ArrayRecord({"w": Array(weights["w"])}))
    assert [r.site for r in rejected] == ["liar"] and "over 20x the median" in rejected[0].reason
