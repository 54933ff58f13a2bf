"""Every aggregation strategy the `strategy` run-config key can name: Flower's own.

One entry per strategy: the Flower class (a name in `flwr.serverapp.strategy`, or a class),
its traits and a function from the run config to the class's keyword arguments, so each
strategy owns its hyper-parameters (as Flower's strategies do). `common.config` reads names
and traits from here; `server/strategy.py` builds the class. Adding a strategy is one
`register(StrategyEntry(...))` (docs/architecture.md, "Extending fedvox"). No Flower import
here: the config is parsed without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _none(cfg: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class StrategyEntry:
    name: str
    flower_class: str | type  # a name in flwr.serverapp.strategy, or a Strategy subclass
    options: Callable[[Any], dict[str, Any]] = _none  # RunConfig -> the class's keywords
    # a robust aggregate (median, trimmed mean) needs every hospital's update: secure
    # aggregation shows the server only their sum, so the two are refused together
    robust: bool = False
    server_optimiser: bool = False  # steps the model with its own optimiser (Adam, momentum)


STRATEGIES: dict[str, StrategyEntry] = {}


def register(entry: StrategyEntry) -> StrategyEntry:
    """Adds (or replaces) `entry`; the run config accepts its name from then on."""
    STRATEGIES[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    STRATEGIES.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(STRATEGIES)


def get(name: str) -> StrategyEntry:
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r}: expected one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def _eta(cfg: Any) -> dict[str, Any]:
    return {"eta": cfg.server_learning_rate}


def _momentum(cfg: Any) -> dict[str, Any]:
    # FedAvgM applies the averaged update with momentum at its full size (lr 1.0).
    return {"server_learning_rate": 1.0, "server_momentum": cfg.server_momentum}


for _entry in (
    StrategyEntry("fedavg", "FedAvg"),
    StrategyEntry("fedprox", "FedProx", lambda cfg: {"proximal_mu": cfg.proximal_mu}),
    StrategyEntry("fedadam", "FedAdam", _eta, server_optimiser=True),
    StrategyEntry("fedyogi", "FedYogi", _eta, server_optimiser=True),
    StrategyEntry("fedadagrad", "FedAdagrad", _eta, server_optimiser=True),
    StrategyEntry("fedavgm", "FedAvgM", _momentum, server_optimiser=True),
    StrategyEntry("fedmedian", "FedMedian", robust=True),
    # beta is the requested share; server/strategy.py fits the cut to each round's count
    StrategyEntry(
        "fedtrimmedavg", "FedTrimmedAvg", lambda cfg: {"beta": cfg.trim_beta}, robust=True
    ),
):
    register(_entry)
