"""What travels between the server and a hospital node, in one place.

Server -> node (every message): `arrays` (the global model) and `config` (`RoundPlan`: which
run, which round, what the privacy plan is made for). Node -> server: `metrics` (a
MetricRecord), `node` (site name, status ok | refused | failed, reason) and, after training,
`arrays`. Client, server, audit log and benchmarks build and read replies only through
`reply` and `read_reply`, so a key is spelled once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

ARRAYS, METRICS, NODE, CONFIG = "arrays", "metrics", "node", "config"
OK, REFUSED, FAILED = "ok", "refused", "failed"

# Message types. Fine-tuning is its own action, sent once after the last round.
TRAIN, EVALUATE, FINETUNE = "train", "evaluate", "train.finetune"

# Every training reply carries these keys (Flower aggregates only replies with equal keys).
TRAIN_METRIC_KEYS = (
    "num-examples",
    "train-loss",
    "epsilon-run",
    "epsilon-lifetime",
    "delta",
    "refused",
    "noise-multiplier",
    "sample-rate",
    "steps",
    "data-s",
    "compute-s",
)
EVAL_METRIC_KEYS = (
    "num-examples",
    "loss",
    "auc",
    "accuracy",
    "sensitivity",
    "specificity",
    "data-s",
    "compute-s",
)


@dataclass(frozen=True)
class RoundPlan:
    """The server's per-message instructions (ConfigRecord `config`).

    `server_round` is Flower's count within this invocation; `round_offset` shifts it for a
    resumed run, so `global_round` numbers rounds over the whole run. `total_rounds` is what
    every node's noise is calibrated for (a run may be planned beyond one invocation).
    """

    run_name: str
    run_uid: str
    total_rounds: int
    image_size: tuple[int, ...] = ()
    round_offset: int = 0
    server_round: int = 0
    proximal_mu: float = 0.0  # FedProx's strategy adds it to every training message

    @property
    def global_round(self) -> int:
        return self.server_round + self.round_offset

    def record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "run-name": self.run_name,
                "run-uid": self.run_uid,
                "total-rounds": self.total_rounds,
                "image-size": list(self.image_size),
                "round-offset": self.round_offset,
                "server-round": self.server_round,
            }
        )

    @classmethod
    def from_message(cls, msg: Message) -> RoundPlan:
        config = dict(msg.content.config_records.get(CONFIG, ConfigRecord()))
        return cls(
            run_name=str(config.get("run-name") or f"run-{msg.metadata.run_id}"),
            run_uid=str(config.get("run-uid") or "unnamed-run"),
            total_rounds=int(config.get("total-rounds") or 0),
            image_size=tuple(int(s) for s in config.get("image-size") or ()),
            round_offset=int(config.get("round-offset", 0)),
            server_round=int(config.get("server-round", 0)),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
        )


def reply(
    msg: Message,
    site: str,
    status: str,
    metrics: dict[str, float],
    reason: str = "",
    arrays: ArrayRecord | None = None,
) -> Message:
    """A node's answer to `msg` (weights only with status ok)."""
    content = RecordDict(
        {
            METRICS: MetricRecord(metrics),
            NODE: ConfigRecord({"site": site, "status": status, "reason": reason}),
        }
    )
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(content, reply_to=msg)


@dataclass
class NodeReply:
    """What the server reads of one reply."""

    site: str
    status: str
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)
    message: Message | None = None  # the reply itself, for Flower's aggregation

    @property
    def ok(self) -> bool:
        return self.status == OK

    def summary(self) -> dict[str, Any]:
        return {"site": self.site, "status": self.status, "reason": self.reason}


def read_reply(msg: Message) -> NodeReply:
    """The server's view of a reply; a Flower-level error (the app crashed) is `failed`."""
    if msg.has_error():
        return NodeReply(
            f"node-{msg.metadata.src_node_id}", FAILED, "node error (details in the node's log)"
        )
    content = msg.content
    node = dict(content.config_records.get(NODE, {}))
    metrics = dict(content.metric_records.get(METRICS, {}))
    return NodeReply(
        site=str(node.get("site") or f"node-{msg.metadata.src_node_id}"),
        status=str(node.get("status", OK)),
        reason=str(node.get("reason", "")),
        metrics=metrics,
        message=msg,
    )
