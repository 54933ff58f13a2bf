"""The aggregation strategy named by the run config: Flower's own (`flwr.serverapp.strategy`).

fedvox never aggregates by itself. The round loop (server/rounds.py) hands the chosen
strategy only the replies of hospitals that trained; refusals and failures are recorded, not
averaged.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as fl

from common.config import RunConfig

STRATEGIES: dict[str, type[fl.FedAvg]] = {
    "fedavg": fl.FedAvg,
    "fedprox": fl.FedProx,
    "fedadam": fl.FedAdam,
    "fedyogi": fl.FedYogi,
    "fedadagrad": fl.FedAdagrad,
    "fedavgm": fl.FedAvgM,
    "fedmedian": fl.FedMedian,
    "fedtrimmedavg": fl.FedTrimmedAvg,
}


def build_strategy(cfg: RunConfig) -> fl.FedAvg:
    """The Flower strategy `cfg.strategy` with the run config's settings."""
    kwargs: dict[str, Any] = {
        "min_train_nodes": cfg.min_nodes,
        "min_evaluate_nodes": cfg.min_nodes,
        "min_available_nodes": cfg.min_nodes,
    }
    if cfg.strategy == "fedprox":
        kwargs["proximal_mu"] = cfg.proximal_mu
    if cfg.strategy in ("fedadam", "fedyogi", "fedadagrad"):
        kwargs["eta"] = cfg.server_learning_rate
    if cfg.strategy == "fedavgm":
        # FedAvgM applies the averaged update with momentum at its full size (lr 1.0).
        kwargs["server_learning_rate"] = 1.0
        kwargs["server_momentum"] = cfg.server_momentum
    if cfg.strategy == "fedtrimmedavg":
        kwargs["beta"] = cfg.trim_beta
    return STRATEGIES[cfg.strategy](**kwargs)
