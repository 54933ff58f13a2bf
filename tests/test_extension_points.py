"""Extending fedvox through its registries alone: a model, a strategy and a held-out metric.

The toy entries are registered at run time and removed afterwards (the `registries` fixture).
The federation runs in this process (`simulations.harness.inprocess`: the real ServerApp
`main`, round loop, update checks and recorder; the real ClientApp with Opacus DP-SGD; the
registered Flower strategy): a `flwr run` simulation starts its apps in Ray worker processes,
which a registration made here would not reach.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.serverapp import strategy as fl
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from common import metric_registry, model_registry, strategy_registry
from common.config import ConfigError, RunConfig
from server.holdout_record import load_round
from server.report_data import RunView, site_table
from server.strategy import build_strategy
from simulations.harness import inprocess as ip
from simulations.phantoms.sites import make_phantom_sites

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
]


class ToyLinear(nn.Module):
    """A linear classifier on the raw pixels (Opacus and the fast DP path know nn.Linear)."""

    def __init__(self, size: tuple[int, ...], in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_channels * int(np.prod(size)), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))


class CountingFedAvg(fl.FedAvg):
    """FedAvg that counts its aggregations: proof the run used this class."""

    aggregations = 0

    def aggregate_train(self, server_round, replies):  # noqa: D102
        type(self).aggregations += 1
        return super().aggregate_train(server_round, replies)


def _balanced_accuracy(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    pred = metric_registry.predicted(probs, threshold)
    return float(balanced_accuracy_score(labels, pred)) if len(labels) else float("nan")


@pytest.fixture
def registries():
    """The three registries as they were, restored after the test (even on failure)."""
    saved = [(r, dict(r)) for r in (model_registry.MODELS, strategy_registry.STRATEGIES)]
    saved.append((metric_registry.METRICS, dict(metric_registry.METRICS)))
    model_registry.register(
        model_registry.ModelEntry(
            "toy-linear",
            {"classification": lambda s: ToyLinear(s.image_size, s.in_channels, s.num_classes)},
            spatial_dims=(2,),
            summary="classifies 2D images with one linear layer",
            server_optimiser=False,
        )
    )
    strategy_registry.register(
        strategy_registry.StrategyEntry(
            "toy-avg", CountingFedAvg, lambda cfg: {"fraction_evaluate": 1.0}
        )
    )
    metric_registry.register(
        metric_registry.Metric(
            "balanced-accuracy", "balanced accuracy", "classification", _balanced_accuracy
        )
    )
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)


def test_toy_entries_reach_the_config_and_its_rules(registries):
    cfg = RunConfig.parse({"model": "toy-linear", "strategy": "toy-avg"})
    assert type(build_strategy(cfg)) is CountingFedAvg
    with pytest.raises(ConfigError, match='use strategy="fedavg", .*strategy="toy-avg"'):
        RunConfig.parse({"model": "toy-linear", "strategy": "fedadam"})  # server_optimiser=False
    assert metric_registry.label("balanced-accuracy") == "balanced accuracy"


def test_unregistered_names_are_refused_again(registries):
    model_registry.unregister("toy-linear")
    strategy_registry.unregister("toy-avg")
    with pytest.raises(ConfigError, match="model='toy-linear': expected one of cnn"):
        RunConfig.parse({"model": "toy-linear"})
    with pytest.raises(ConfigError, match="strategy='toy-avg'"):
        RunConfig.parse({"strategy": "toy-avg"})


def test_one_round_trains_the_toy_model_with_the_toy_strategy_and_reports_the_metric(
    registries, tmp_path: Path
):
    make_phantom_sites("blobs-2d", tmp_path / "data", 2, cases_per_site=30, holdout_cases=24)
    config = {
        "data-dir": str(tmp_path / "data"),
        "output-dir": str(tmp_path / "runs"),
        "state-dir": str(tmp_path / "state"),
        "run-name": "toys",
        "num-server-rounds": 1,
        "batch-size": 16,
        "local-epochs": 1,
        "augmentation": False,
        "model": "toy-linear",
        "strategy": "toy-avg",
    }
    CountingFedAvg.aggregations = 0
    run = ip.run_in_process(config, hospitals=2)
    assert run.error is None, run.error
    summary = run.summary
    assert summary["status"] == "finished" and summary["model"]["arch"] == "toy-linear"
    assert summary["config"]["strategy"] == "toy-avg" and CountingFedAvg.aggregations == 1
    last = summary["rounds"][-1]
    assert last["round"] == 1 and all(h["status"] == "ok" for h in last["hospitals"].values())
    # the toy metric is in the run summary, and it is what its function gives on the holdout
    record = load_round(tmp_path / "runs" / "toys", 1)
    probs, labels = np.asarray(record["probs"]), np.asarray(record["labels"])
    expected = _balanced_accuracy(probs, labels, record.get("threshold", 0.5))
    assert last["central"]["balanced-accuracy"] == pytest.approx(expected)
    view = RunView.load(tmp_path / "runs" / "toys")
    assert "balanced-accuracy" in view.metric_keys()
    assert site_table(view)[0][0] == "hospital"


def test_every_recipe_names_a_registered_model_for_its_task_and_dimensionality():
    from common.recipes import RECIPES

    for (task, dims), recipe in RECIPES.items():
        assert recipe.values["model"] in model_registry.serving(task, dims), recipe.name
