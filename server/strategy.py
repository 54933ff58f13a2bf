"""The aggregation strategy named by the run config: Flower's own (`flwr.serverapp.strategy`).

fedvox never aggregates by itself. The round loop (server/rounds.py) hands the chosen
strategy only the replies of hospitals that trained; refusals and failures are recorded, not
averaged. Names, traits and keyword arguments are `common/strategy_registry.py`'s entries.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as fl

from common import strategy_registry
from common.config import RunConfig
from server.checks import trim_fraction


class FittedTrimmedAvg(fl.FedTrimmedAvg):
    """FedTrimmedAvg whose cut is fitted to each round's number of updates (`trim_fraction`):
    Flower's own int(beta n) trims nothing at 3-4 hospitals with beta 0.2."""

    def __init__(self, *, beta: float = 0.2, **kwargs: Any) -> None:
        super().__init__(beta=beta, **kwargs)
        self.requested_beta = beta

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.beta = trim_fraction(len(replies), self.requested_beta)
        return super().aggregate_train(server_round, replies)


# Flower classes fedvox runs as a subclass that fixes one behaviour (same keyword arguments).
SUBCLASSES: dict[type, type] = {fl.FedTrimmedAvg: FittedTrimmedAvg}


def strategy_class(name: str) -> type[fl.FedAvg]:
    """The Flower class the registry names for `name` (fedvox's subclass where there is one)."""
    cls = strategy_registry.get(name).flower_class
    if isinstance(cls, str):
        cls = getattr(fl, cls)
    return SUBCLASSES.get(cls, cls)


def build_strategy(cfg: RunConfig) -> fl.FedAvg:
    """The Flower strategy `cfg.strategy` with the run config's settings."""
    kwargs: dict[str, Any] = {
        "min_train_nodes": cfg.min_nodes,
        "min_evaluate_nodes": cfg.min_nodes,
        "min_available_nodes": cfg.min_nodes,
    }
    kwargs.update(strategy_registry.get(cfg.strategy).options(cfg))
    return strategy_class(cfg.strategy)(**kwargs)
