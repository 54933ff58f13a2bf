"""The run config, parsed once: every key, its type, its default and its allowed values.

Flower hands apps the run config as a flat dict of TOML values (`pyproject.toml`
`[tool.flwr.app.config]`, overridden with `flwr run -c 'key=value'`). The server and every
node parse it into one frozen `RunConfig` the moment a message arrives, so the rest of fedvox
reads typed attributes (`cfg.local_epochs`) instead of `.get("local-epochs", 4)` with a cast.
A wrong type, an unknown key or a value outside its range fails here, with the key named.

The defaults below are the ones in `pyproject.toml` (a test keeps the two equal).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from common import model_registry, recipes, strategy_registry
from common.config_values import (
    ConfigError,
    at_least_zero,
    choice,
    coerce,
    dashed,
    in_range,
    positive_float,
    positive_int,
    undashed,
)
from common.recipes import AUTO, AUTO_KEYS

ACCOUNTANTS = ("rdp", "prv")  # Opacus' approximate "gdp" under-reports epsilon: never offered
SCHEDULES = ("constant", "cosine")
LOCAL_EVALUATION = ("last", "every")  # rounds in which hospitals release validation counts


@dataclass(frozen=True)
class RunConfig:
    """Keys in `common.recipes.AUTO_KEYS` may be "auto" (their default): `resolved` fills them
    from the recipe for the data's task, before anything trains."""

    # -- training
    num_server_rounds: int | str = AUTO
    total_rounds: int = 0  # rounds the privacy budget is planned for; 0 = num-server-rounds
    local_epochs: int | str = AUTO
    batch_size: int | str = AUTO
    learning_rate: float | str = AUTO
    learning_rate_schedule: str = AUTO
    momentum: float = 0.9
    augmentation: bool | str = AUTO
    structure_weight: float | str = AUTO  # segmentation loss: a small structure's top weight
    test_time_flips: bool | str = AUTO  # segmentation: predict with test-time mirroring
    holdout_every: int | str = AUTO  # the server scores its holdout after every k-th round
    max_physical_batch: int | str = AUTO
    fedbn: bool = False
    finetune_epochs: int = 0
    local_evaluation: str = "last"
    # -- aggregation
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    server_momentum: float = 0.9
    trim_beta: float = 0.2
    min_nodes: int = 2
    round_timeout: float = 3600.0
    # -- secure aggregation (Flower SecAgg+, server/secagg_round.py, client/secagg_node.py)
    secure_aggregation: bool = False
    secagg_shares: int = 0  # 0 = every hospital of the round holds a share of every other's keys
    secagg_threshold: int = 0  # 0 = a majority of the shares
    # -- model
    model: str = AUTO
    model_width: int | str = AUTO  # 0 = the model's own default width
    model_depth: int = 3
    image_size: str = AUTO
    seed: int = 0
    # -- privacy (the server proposes; a node's policy can only tighten it)
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    dp: bool = True
    accountant: str = "rdp"
    # -- data and outputs (absolute paths; "" = default)
    data_dir: str = ""
    holdout_dir: str = ""
    output_dir: str = ""
    run_name: str = ""
    resume_from: str = ""
    state_dir: str = ""
    demo_hospitals: int = 5
    demo_alpha: float = 0.5

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> RunConfig:
        """The config from Flower's run config (dashed keys); ConfigError names a bad key."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {', '.join(unknown)}; known keys: "
                f"{', '.join(sorted(known))}"
            )
        values = {
            f.name: AUTO
            if key in AUTO_KEYS and raw[key] == AUTO
            else coerce(key, raw[key], f.type.split(" |")[0])
            for key, f in known.items()
            if key in raw
        }
        cfg = cls(**values)
        cfg.check()
        return cfg

    # -- "auto" keys ----------------------------------------------------------------------
    @property
    def is_resolved(self) -> bool:
        return all(getattr(self, undashed(k)) != AUTO for k in AUTO_KEYS)

    def resolved(self, task: str, spatial_dims: int) -> RunConfig:
        """Every "auto" key filled by the recipe for `task` in `spatial_dims` dimensions."""
        cfg = self.with_values(recipes.resolve(self.as_dict(), task, spatial_dims))
        if cfg.test_time_flips and task != "segmentation":
            # a mirrored scan is another patient's anatomy to a classifier (heart on the right)
            raise ConfigError(
                f"test-time-flips=true is for segmentation; this data's task is {task}"
            )
        return cfg

    def with_values(self, values: Mapping[str, Any]) -> RunConfig:
        """This config with `values` (dashed keys, e.g. the server's resolved recipe) set."""
        return RunConfig.parse({**self.as_dict(), **values})

    def recipe_values(self) -> dict[str, Any]:
        """The resolved values of the "auto"-able keys (what the server sends to nodes)."""
        return {k: getattr(self, undashed(k)) for k in AUTO_KEYS}

    def as_dict(self) -> dict[str, Any]:
        """Dashed keys, as in pyproject.toml (what summary.json records)."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def check(self) -> None:
        """Every range and choice; raises ConfigError naming the first bad key ("auto" keys
        are checked once resolved)."""
        placeholders = {undashed(k): PLACEHOLDERS[k] for k in AUTO_KEYS}
        self = replace(self, **{k: v for k, v in placeholders.items() if getattr(self, k) == AUTO})
        positive_int(self, "num_server_rounds", "local_epochs", "batch_size", "min_nodes")
        at_least_zero(self, "total_rounds", "max_physical_batch", "finetune_epochs")
        at_least_zero(self, "model_width", "seed", "demo_hospitals")
        positive_int(self, "model_depth", "holdout_every")
        positive_float(self, "max_grad_norm", "round_timeout", "demo_alpha")
        if not (self.structure_weight >= 1 and math.isfinite(self.structure_weight)):
            raise ConfigError(f"structure-weight={self.structure_weight}: expected a number >= 1")
        at_least_zero(self, "learning_rate")  # 0 = weights stay (tests use it as a probe)
        positive_float(self, "server_learning_rate")
        for key in ("momentum", "server_momentum"):
            in_range(self, key, 0.0, 1.0, high_open=True)
        in_range(self, "trim_beta", 0.0, 0.5, high_open=True)
        at_least_zero(self, "proximal_mu")
        choice(self, "strategy", strategy_registry.names())
        _check_secure_aggregation(self)
        choice(self, "accountant", ACCOUNTANTS)
        choice(self, "learning_rate_schedule", SCHEDULES)
        choice(self, "local_evaluation", LOCAL_EVALUATION)
        choice(self, "model", model_registry.names())
        _check_server_optimiser(self)
        if not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise ConfigError(
                f"target-epsilon={self.target_epsilon}: expected a positive finite number"
            )
        in_range(self, "target_delta", 0.0, 1.0, low_open=True, high_open=True)
        for key in ("data_dir", "holdout_dir", "output_dir", "resume_from", "state_dir"):
            value = getattr(self, key)
            if value and not Path(value).expanduser().is_absolute():
                raise ConfigError(
                    f"{dashed(key)}={value!r} is a relative path; Flower runs apps in the "
                    "SuperLink's working directory, so give an absolute path"
                )
        if "/" in self.run_name or self.run_name in (".", ".."):
            raise ConfigError(f"run-name={self.run_name!r}: a folder name, not a path")
        _ = self.input_size  # raises on a malformed image-size

    # -- derived values -----------------------------------------------------------------
    @property
    def planned_rounds(self) -> int:
        """Rounds the privacy plan and learning-rate schedule are made for."""
        return max(self.num_server_rounds, self.total_rounds)

    @property
    def input_size(self) -> tuple[int, ...] | None:
        """`image-size` as ints ("28,28" or "32x32x32"); None = from the data."""
        raw = self.image_size.strip()
        if not raw or raw == AUTO:
            return None
        try:
            size = tuple(int(s) for s in raw.replace("x", ",").split(",") if s.strip())
        except ValueError:
            size = ()
        if len(size) not in (2, 3) or min(size) < 1:
            raise ConfigError(f'image-size={raw!r}: expected e.g. "28,28" or "32,32,32"')
        return size

    def path(self, key: str) -> Path | None:
        """An absolute path setting (e.g. "data-dir") or None when left empty."""
        value = getattr(self, key.replace("-", "_"))
        return Path(value).expanduser() if value else None

    def evaluates_in(self, global_round: int, total_rounds: int) -> bool:
        """Do hospitals evaluate (and spend a DP release) after this round?"""
        return self.local_evaluation == "every" or global_round >= total_rounds

    def planned_releases(self, total_rounds: int) -> int:
        """Validation releases a hospital makes in a run: its evaluations (+ the fine-tuned
        model's). Every one is planned into the run's epsilon from round 1."""
        evaluations = total_rounds if self.local_evaluation == "every" else 1
        return evaluations + (1 if self.finetune_epochs else 0)

    @property
    def model_options(self) -> dict[str, Any]:
        """`build_model` keywords: server, nodes and the pooled reference build one model."""
        if AUTO in (self.model, self.model_width):  # models are built from the recipe's values
            raise ConfigError('model_options of a config with "auto" keys: resolve it first')
        return {"arch": self.model, "width": self.model_width or None, "depth": self.model_depth}


@dataclass(frozen=True)
class NodePolicy:
    """What a hospital's own node config says (flower-supernode --node-config).

    The privacy keys are the node's, not the server's: the run config can only tighten
    them. A deployed node must state all of `POLICY_KEYS` or it refuses every run. In
    simulation the node config holds only Flower's `partition-id`/`num-partitions`; the
    simulated hospital serves `<data-dir>/hospital-<partition-id + 1>` and takes its policy from
    `node.toml` in its state dir when there is one, else the documented defaults
    (`common.privacy.resolve_budget`).
    """

    data_dir: str = ""
    state_dir: str = ""
    site_name: str = ""
    accountant: str = ""  # rdp | prv: the node, not the server, picks how epsilon is counted
    max_epsilon: float | None = None  # the dataset's lifetime limit; tightens every run
    delta: float | None = None
    max_evaluations: int | None = None  # validation releases per run
    allow_non_dp: bool = False
    partition_id: int | None = None  # simulation only
    num_partitions: int | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> NodePolicy:
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values = {}
        for key, f in known.items():
            value = raw.get(key)
            if value is None or value == "":
                continue
            values[f.name] = coerce(f"node config {key}", value, f.type.split(" |")[0])
        policy = cls(**values)
        for key in ("max_epsilon", "delta"):
            value = getattr(policy, key)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"node config {dashed(key)}={value}: expected a positive number")
        if policy.delta is not None and policy.delta >= 1:
            raise ConfigError(f"node config delta={policy.delta}: expected a value below 1")
        if policy.accountant and policy.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"node config accountant={policy.accountant!r}: expected one of "
                f"{', '.join(ACCOUNTANTS)}"
            )
        if policy.max_evaluations is not None and policy.max_evaluations < 0:
            raise ConfigError("node config max-evaluations: expected a whole number >= 0")
        return policy

    def missing(self) -> list[str]:
        """Policy keys a deployed node has not set (it then refuses every run)."""
        return [k for k in POLICY_KEYS if getattr(self, k.replace("-", "_")) in (None, "")]

    @property
    def simulated(self) -> bool:
        return self.partition_id is not None

    @property
    def may_train_without_dp(self) -> bool:
        """An explicit opt-in, or a simulated hospital that states no policy at all (the
        benchmarks' epsilon = inf reference). A hospital with a policy releases nothing
        without DP unless that policy says allow-non-dp."""
        stated = len(self.missing()) < len(POLICY_KEYS)
        return self.allow_non_dp or (self.simulated and not stated)


POLICY_KEYS = ("accountant", "max-epsilon", "delta", "max-evaluations")


# Stand-ins for unresolved "auto" keys, so that every other key can be checked at parse time.
PLACEHOLDERS = {
    "model": "cnn",
    "learning-rate": 0.01,
    "learning-rate-schedule": "constant",
    "local-epochs": 1,
    "batch-size": 1,
    "max-physical-batch": 0,
    "num-server-rounds": 1,
    "augmentation": False,
    "image-size": "",
    "model-width": 0,
    "structure-weight": 1.0,
    "test-time-flips": False,
    "holdout-every": 1,
}


def _check_server_optimiser(cfg: Any) -> None:
    if strategy_registry.get(cfg.strategy).server_optimiser and not (
        model_registry.get(cfg.model).server_optimiser
    ):
        averaged = [n for n, e in strategy_registry.STRATEGIES.items() if not e.server_optimiser]
        raise ConfigError(
            f'strategy="{cfg.strategy}" with model="{cfg.model}": the model\'s weights must be '
            "averaged, not stepped by a server optimiser; use "
            + " or ".join(", ".join(f'strategy="{n}"' for n in averaged).rsplit(", ", 1))
        )


def _check_secure_aggregation(cfg: Any) -> None:
    at_least_zero(cfg, "secagg_shares", "secagg_threshold")
    # A masked sum has no per-hospital values left to take a median of or to trim.
    if cfg.secure_aggregation and strategy_registry.get(cfg.strategy).robust:
        raise ConfigError(
            f'strategy="{cfg.strategy}" with secure-aggregation=true: a robust aggregate '
            "(median, trimmed mean) needs every hospital's update, and secure aggregation shows "
            'the server only their sum; use strategy="fedavg" (or fedprox, fedadam, ...) or '
            "secure-aggregation=false"
        )
    if cfg.secagg_shares in (1, 2):
        raise ConfigError(
            f"secagg-shares={cfg.secagg_shares}: expected 0 (every hospital) or at least 3"
        )
    if cfg.secagg_threshold == 1:
        raise ConfigError("secagg-threshold=1: expected 0 (a majority of the shares) or >= 2")
    if cfg.secagg_shares and cfg.secagg_threshold > cfg.secagg_shares:
        raise ConfigError(
            f"secagg-threshold={cfg.secagg_threshold} is more than secagg-shares="
            f"{cfg.secagg_shares}: a key could never be rebuilt"
        )
