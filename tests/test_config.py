"""The run config is parsed once, with every bad key named (common/config.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import ConfigError, NodePolicy, RunConfig
from server.recorder import scores_holdout

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_are_the_dataclass_defaults():
    assert RunConfig.parse(PYPROJECT) == RunConfig()
    assert set(RunConfig().as_dict()) == set(PYPROJECT)  # every key declared in both places


@pytest.mark.parametrize(
    "override, message",
    [
        ({"learning-rte": 0.1}, "unknown run-config key(s) learning-rte"),
        ({"num-server-rounds": 0}, "num-server-rounds=0: expected a whole number >= 1"),
        ({"num-server-rounds": "ten"}, "num-server-rounds='ten': expected a whole number"),
        ({"local-epochs": 2.5}, "local-epochs=2.5: expected a whole number"),
        ({"target-epsilon": -1.0}, "target-epsilon=-1.0: expected a positive finite number"),
        ({"target-delta": 1.0}, "target-delta=1.0: expected a value in (0, 1)"),
        ({"strategy": "fedfoo"}, "strategy='fedfoo': expected one of fedavg"),
        ({"accountant": "gdp"}, "accountant='gdp': expected one of rdp, prv"),
        ({"dp": "maybe"}, "dp='maybe': expected true or false"),
        ({"augmentation": "yes"}, "augmentation='yes': expected true or false"),
        ({"data-dir": "data/here"}, "data-dir='data/here' is a relative path"),
        ({"image-size": "28;28"}, "image-size='28;28': expected"),
        ({"trim-beta": 0.5}, "trim-beta=0.5: expected a value in [0, 0.5)"),
        ({"model": 3}, "model=3: expected a string"),
        ({"structure-weight": 0.5}, "structure-weight=0.5: expected a number >= 1"),
    ],
)
def test_a_bad_value_is_refused_with_its_key_named(override, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.parse({**PYPROJECT, **override})
    assert message in str(err.value)


def test_values_are_typed_and_derived_values_computed_once():
    cfg = RunConfig.parse(
        {
            "dp": "false",
            "augmentation": 0,
            "learning-rate": 1,
            "image-size": "32x32x32",
            "num-server-rounds": 3,
            "total-rounds": 5,
            "model": "scatter-cnn",
            "model-width": 16,
        }
    )
    assert cfg.dp is False and cfg.augmentation is False
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.input_size == (32, 32, 32)
    assert cfg.planned_rounds == 5
    assert cfg.model_options == {"arch": "scatter-cnn", "width": 16, "depth": 3}
    assert RunConfig().input_size is None


def test_node_policy_reads_strings_as_toml_cli_values_arrive():
    policy = NodePolicy.parse(
        {"data-dir": "/d", "state-dir": "/s", "max-epsilon": "8.0", "allow-non-dp": "true"}
    )
    assert policy.max_epsilon == 8.0 and policy.allow_non_dp and not policy.simulated
    assert NodePolicy.parse({"partition-id": 0, "num-partitions": 2}).may_train_without_dp
    with pytest.raises(ConfigError, match="node config max-epsilon"):
        NodePolicy.parse({"max-epsilon": "lots"})
    with pytest.raises(ConfigError, match="node config delta=2.0"):
        NodePolicy.parse({"delta": 2.0})


@pytest.mark.parametrize(
    "task, dims, model, rounds",
    [
        ("classification", 2, "scatter-cnn", 20),
        ("classification", 3, "filterbank-3d", 30),
        ("segmentation", 2, "unet", 20),
        ("segmentation", 3, "slice-unet", 40),
    ],
)
def test_auto_keys_take_the_recipe_of_the_data_and_explicit_keys_stay(task, dims, model, rounds):
    cfg = RunConfig.parse(PYPROJECT)
    assert not cfg.is_resolved
    resolved = cfg.resolved(task, dims)
    assert resolved.is_resolved
    assert (resolved.model, resolved.num_server_rounds) == (model, rounds)
    mine = RunConfig.parse({**PYPROJECT, "learning-rate": 0.3, "num-server-rounds": 2})
    kept = mine.resolved(task, dims)
    assert (kept.learning_rate, kept.num_server_rounds, kept.model) == (0.3, 2, model)


def test_the_2d_recipe_lowers_the_learning_rate_and_head_width_with_epsilon():
    runs = [
        RunConfig.parse({**PYPROJECT, "target-epsilon": eps}).resolved("classification", 2)
        for eps in (8.0, 3.0, 1.0)
    ]
    assert [r.learning_rate for r in runs] == [0.05, 0.02, 0.01]
    assert [r.model_options["width"] for r in runs] == [None, None, 16]
    # 2 local epochs a round; below epsilon 2 twice the rounds (docs/benchmarks.md)
    assert [(r.num_server_rounds, r.local_epochs) for r in runs] == [(20, 2), (20, 2), (40, 2)]
    no_dp = RunConfig.parse({**PYPROJECT, "dp": False, "target-epsilon": 1.0})
    assert (
        no_dp.resolved("classification", 2).learning_rate,
        no_dp.resolved("classification", 2).model_width,
    ) == (0.05, 0)
    mine = RunConfig.parse({**PYPROJECT, "target-epsilon": 1.0, "model-width": 24})
    assert mine.resolved("classification", 2).model_width == 24


def test_a_node_takes_the_servers_resolved_recipe():
    server = RunConfig.parse(PYPROJECT).resolved("classification", 2)
    node = RunConfig.parse(PYPROJECT).with_values(server.recipe_values())
    assert node == server


def test_test_time_flips_are_the_3d_segmentation_recipes_and_refused_for_a_classifier():
    flips = {
        (task, dims): RunConfig.parse(PYPROJECT).resolved(task, dims).test_time_flips
        for task in ("classification", "segmentation")
        for dims in (2, 3)
    }
    assert flips == {
        ("classification", 2): False,
        ("classification", 3): False,
        ("segmentation", 2): False,
        ("segmentation", 3): True,
    }
    off = RunConfig.parse({**PYPROJECT, "test-time-flips": "false"})
    assert off.resolved("segmentation", 3).test_time_flips is False
    on = RunConfig.parse({**PYPROJECT, "test-time-flips": True})
    assert on.resolved("segmentation", 2).test_time_flips is True
    with pytest.raises(ConfigError, match="test-time-flips=true is for segmentation"):
        on.resolved("classification", 2)


def test_holdout_every_is_4_for_3d_segmentation_1_elsewhere_and_at_least_1():
    every = {
        (task, dims): RunConfig.parse(PYPROJECT).resolved(task, dims).holdout_every
        for task in ("classification", "segmentation")
        for dims in (2, 3)
    }
    assert every == {
        ("classification", 2): 1,
        ("classification", 3): 1,
        ("segmentation", 2): 1,
        ("segmentation", 3): 4,
    }
    assert (
        RunConfig.parse({**PYPROJECT, "holdout-every": 2}).resolved("segmentation", 3).holdout_every
        == 2
    )
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="holdout-every"):
            RunConfig.parse({**PYPROJECT, "holdout-every": bad})
    # round 0, every k-th, and the invocation's last round (or every round if it is unknown)
    assert [r for r in range(11) if scores_holdout(r, 4, 10)] == [0, 4, 8, 10]
    assert [r for r in range(4) if scores_holdout(r, 4, None)] == [0, 1, 2, 3]
    assert [r for r in range(4) if scores_holdout(r, 1, 3)] == [0, 1, 2, 3]
