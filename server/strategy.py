"""Aggregation strategies, chosen by run config, that know about hospitals.

The aggregation itself is Flower's (`flwr.serverapp.strategy`). fedvox adds one
thin layer on top of whichever strategy is chosen: it records every hospital's
reply (status, metrics, epsilon) per round for the run summary, and keeps
refused or failed nodes out of aggregation so that one hospital saying "no"
never fails the round for the others.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as fl

log = logging.getLogger("fedvox.server")

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


def hospital_reply(msg: Message) -> dict[str, Any]:
    """What the run summary keeps of one node's reply."""
    if msg.has_error():
        # A Flower-level error (the ClientApp crashed before fedvox could answer).
        return {
            "site": f"node-{msg.metadata.src_node_id}",
            "status": "failed",
            "reason": "node error (details in the node's log)",
        }
    content = msg.content
    node = dict(content.config_records.get("node", {}))
    metrics = dict(next(iter(content.metric_records.values()), {}))
    return {
        "site": str(node.get("site") or f"node-{msg.metadata.src_node_id}"),
        "status": str(node.get("status", "ok")),
        "reason": str(node.get("reason", "")),
        "metrics": metrics,
    }


def _failed(msg: Message) -> bool:
    return msg.has_error() or msg.content.config_records.get("node", {}).get("status") == "failed"


class HospitalAware:
    """Mixin over a Flower strategy: record per-hospital replies, aggregate only good ones."""

    def _keep(self, msg: Message) -> bool:
        if msg.has_error():
            return False
        node = msg.content.config_records.get("node", {})
        metrics = next(iter(msg.content.metric_records.values()), {})
        return node.get("status", "ok") == "ok" and float(metrics.get("num-examples", 0)) > 0

    def _record(self, kind: str, server_round: int, replies: list[Message]) -> None:
        book = self.__dict__.setdefault("hospital_replies", {})
        book.setdefault(server_round, {})[kind] = [hospital_reply(m) for m in replies]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._record("train", server_round, replies)
        failed = [hospital_reply(m) for m in replies if _failed(m)]
        if replies and len(failed) == len(replies):
            # Nothing can come of more rounds: stop with every hospital's reason.
            reasons = "; ".join(f"{h['site']}: {h['reason']}" for h in failed)
            raise RuntimeError(f"round {server_round}: every hospital failed ({reasons})")
        good = [m for m in replies if self._keep(m)]
        if len(good) < len(replies):
            log.warning(
                "round %d: %d of %d hospitals refused or failed; aggregating the rest",
                server_round,
                len(replies) - len(good),
                len(replies),
            )
        if not good:
            log.warning(
                "round %d: no hospital trained; the global model stays as it was", server_round
            )
            return None, None
        return super().aggregate_train(server_round, good)  # type: ignore[misc]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self._record("evaluate", server_round, replies)
        good = [m for m in replies if self._keep(m)]
        return super().aggregate_evaluate(server_round, good) if good else None  # type: ignore[misc]


def build_strategy(name: str, run_config: dict[str, Any], min_nodes: int) -> fl.FedAvg:
    """A hospital-aware instance of the strategy named in the run config."""
    key = name.strip().lower()
    if key not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is not one of {', '.join(sorted(STRATEGIES))}")
    base = STRATEGIES[key]
    kwargs: dict[str, Any] = {
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": min_nodes,
        "min_available_nodes": min_nodes,
    }
    if key == "fedprox":
        kwargs["proximal_mu"] = float(run_config.get("proximal-mu", 0.01))
    if key in ("fedadam", "fedyogi", "fedadagrad"):
        kwargs["eta"] = float(run_config.get("server-learning-rate", 0.01))
    if key == "fedavgm":
        # FedAvgM applies the averaged update with momentum at its full size (lr 1.0).
        kwargs["server_learning_rate"] = 1.0
        kwargs["server_momentum"] = float(run_config.get("server-momentum", 0.9))
    if key == "fedtrimmedavg":
        kwargs["beta"] = float(run_config.get("trim-beta", 0.2))
    cls = type(f"HospitalAware{base.__name__}", (HospitalAware, base), {})
    return cls(**kwargs)
