"""What travels between the server and a hospital node, in one place.

Server -> node (every message): `arrays` (the global model) and `config` (`RoundPlan`: which
run, which round, what the privacy plan is made for). Node -> server: `metrics` (a
MetricRecord), `node` (site name, status ok | refused | failed, reason) and, after training,
`arrays`. Client, server, audit log and benchmarks build and read replies only through
`reply` and `read_reply`, so a key is spelled once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

ARRAYS, METRICS, NODE, CONFIG = "arrays", "metrics", "node", "config"
OK, REFUSED, FAILED = "ok", "refused", "failed"

# Message types. Fine-tuning is its own action, sent once after the last round; "settle"
# tells every node, once the run ended, which of its releases the server used.
TRAIN, EVALUATE, FINETUNE, SETTLE = "train", "evaluate", "train.finetune", "query.settle"

# The outbound manifest: every key a node may send, with its treatment. "dp": computed from
# clipped, noised statistics and charged to the node's ledger; "coarse": rounded as stated;
# "public": the node's policy and accounting, config echoes, status. `reply` refuses any other
# key and applies the rounding, so nothing leaves a node that is not listed here.
# docs/privacy.md publishes this table; tests/test_manifest.py drives every message through
# the real ClientApp against it.
DP, COARSE, PUBLIC = "dp", "coarse", "public"
MANIFEST: dict[str, tuple[str, str]] = {
    ARRAYS: (
        DP,
        "the locally trained model weights (DP-SGD, the run's noise multiplier); with "
        "filterbank-3d also its feature mean, released once per run (Gaussian mechanism, "
        "client/statistics.py)",
    ),
    "val-hist-neg": (DP, "validation cases of class 0 per logit-margin bin, Gaussian noise"),
    "val-hist-pos": (DP, "validation cases of class 1 per logit-margin bin, Gaussian noise"),
    "val-confusion": (DP, "validation (label, prediction) counts, Gaussian noise"),
    "val-dice-sum": (DP, "per class, the validation cases' summed Dice, Gaussian noise"),
    "val-dice-count": (DP, "per class, validation cases that have it, Gaussian noise"),
    "release-noise": (PUBLIC, "the noise std the node added per count (from its run's plan)"),
    "num-examples": (DP, "training cases + Gaussian noise (once per run), rounded to 10s"),
    "noise-multiplier": (COARSE, "the run's DP-SGD noise multiplier, 3 significant digits"),
    # Timing: the server sees when a reply arrives anyway; these only split it into parts.
    "data-s": (COARSE, "seconds spent loading data, 1 significant digit"),
    "compute-s": (COARSE, "seconds spent computing, 1 significant digit"),
    "epsilon-run": (
        PUBLIC,
        "the run's epsilon at this node after this message (its ledger; from the plan, made "
        "from the released count, never the exact one)",
    ),
    "epsilon-lifetime": (PUBLIC, "the dataset's epsilon over all runs (its ledger)"),
    "delta": (PUBLIC, "the delta every epsilon above is stated at"),
    "refused": (PUBLIC, "1 when the node refused to train this round"),
    "site": (PUBLIC, "the node's name: node config site-name (or the simulated folder name)"),
    "status": (PUBLIC, "ok | refused | failed"),
    "reason": (PUBLIC, "why not ok: fixed texts and config values, never a path or a count"),
    # The server echoes the hashes it used, so the node knows which kept update it may drop.
    "release": (PUBLIC, "sha256 of what this reply released (weights or counts), or empty"),
}


def coarse_seconds(seconds: float) -> float:
    """A duration to 1 significant digit (0.03 s, 0.4 s, 7 s, 200 s): it grows with a site's
    cases, so it leaves only this coarse (the server sees when a reply arrives anyway)."""
    if not seconds > 0:
        return 0.0
    return float(f"{seconds:.0e}")


NODE_KEYS = ("site", "status", "reason", "release")  # the `node` ConfigRecord of a reply
_ROUNDING = {
    "num-examples": lambda v: float(max(10, 10 * round(v / 10))) if v > 0 else 0.0,
    "noise-multiplier": lambda v: float(f"{v:.3g}"),
    "data-s": coarse_seconds,
    "compute-s": coarse_seconds,
}


class ManifestError(ValueError):
    """A node was about to send a key the outbound manifest does not list (a bug)."""


@dataclass(frozen=True)
class RoundPlan:
    """The server's per-message instructions (ConfigRecord `config`).

    `server_round` is Flower's count within this invocation; `round_offset` shifts it for a
    resumed run, so `global_round` numbers rounds over the whole run. `total_rounds` is what
    every node's noise is calibrated for (a run may be planned beyond one invocation).

    `settled_round` and `used` tell a node what became of its releases: every release of a
    round <= `settled_round` whose hash is not in `used` was never used and never will be
    (the server went on without it); one in `used` was. A node keeps each released update
    until then, so a server that lost a reply asks again and gets the same update, free.
    """

    run_name: str
    run_uid: str
    total_rounds: int
    image_size: tuple[int, ...] = ()
    round_offset: int = 0
    server_round: int = 0
    proximal_mu: float = 0.0  # FedProx's strategy adds it to every training message
    settled_round: int = -1  # global rounds <= this are over at the server (-1: unknown)
    used: tuple[str, ...] = ()  # hashes of the releases the server used in this run
    recipe: dict = field(default_factory=dict)  # the run config's "auto" keys, resolved

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
                "settled-round": self.settled_round,
                "used": list(self.used),
                "recipe": json.dumps(self.recipe),
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
            settled_round=int(config.get("settled-round", -1)),
            used=tuple(str(u) for u in config.get("used") or ()),
            recipe=json.loads(str(config.get("recipe") or "{}")),
        )


def reply(
    msg: Message,
    site: str,
    status: str,
    metrics: dict[str, Any],
    reason: str = "",
    arrays: ArrayRecord | None = None,
    release: str = "",
) -> Message:
    """A node's answer to `msg` (weights only with status ok), as the manifest allows;
    `release` is the hash the node's ledger recorded for what this reply releases."""
    unlisted = sorted(set(metrics) - set(MANIFEST))
    if unlisted:
        raise ManifestError(f"not in the outbound manifest: {', '.join(unlisted)}")
    metrics = {k: _ROUNDING[k](v) if k in _ROUNDING else v for k, v in metrics.items()}
    content = RecordDict(
        {
            METRICS: MetricRecord(metrics),
            NODE: ConfigRecord(
                {"site": site, "status": status, "reason": reason, "release": release}
            ),
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
    release: str = ""  # the hash of what the reply released (the node's ledger)
    node_id: int = 0

    @property
    def ok(self) -> bool:
        return self.status == OK

    def summary(self) -> dict[str, Any]:
        return {"site": self.site, "status": self.status, "reason": self.reason}


def read_reply(
    msg: Message, names: dict[int, str] | None = None, node_id: int | None = None
) -> NodeReply:
    """The server's view of a reply; a Flower-level error (the app crashed) is `failed`.

    `names` maps node ids to the site names their earlier replies gave: a Flower error reply
    carries only a node id (and one the SuperLink makes for a node that vanished carries the
    SuperLink's: pass the id the request went to as `node_id`). A reply that names its site
    adds it to `names`.
    """
    node_id = int(msg.metadata.src_node_id) if node_id is None else node_id
    known = (names or {}).get(node_id) or f"node-{node_id}"
    if msg.has_error():
        reason = f"node error: {msg.error.reason[:200]} (details in the node's log)"
        return NodeReply(known, FAILED, reason, node_id=node_id)
    content = msg.content
    node = dict(content.config_records.get(NODE, {}))
    metrics = dict(content.metric_records.get(METRICS, {}))
    site = str(node.get("site") or known)
    if names is not None and node.get("site"):
        names[node_id] = site
    return NodeReply(
        site=site,
        status=str(node.get("status", OK)),
        reason=str(node.get("reason", "")),
        metrics=metrics,
        message=msg,
        release=str(node.get("release", "")),
        node_id=node_id,
    )
