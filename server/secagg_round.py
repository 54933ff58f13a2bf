"""Secure aggregation of a training round: Flower's SecAgg+ (run config secure-aggregation).

With `secure-aggregation = true` every training round runs Flower's `SecAggPlusWorkflow`
(flwr.server.workflow.secure_aggregation) instead of one "train" message per hospital:

    setup          hospitals send two public keys
    share keys     each sends its neighbours encrypted Shamir shares of its two secrets
    masked vectors each trains as always (client/app.py, DP-SGD, ledger) and sends its update
                   (trained - global weights) times its weight, quantised and masked, plus its
                   weight, masked; status and epsilon travel beside it in the clear
    unmask         the survivors send the shares that cancel the masks of the sum

The server ends up with the weighted SUM of the updates and the sum of the weights, never one
hospital's (tests/test_secagg.py records every array it receives). A hospital that drops out
after the key-sharing stage is recovered from its neighbours' shares, so a round survives
losing (shares - threshold) hospitals; fewer left than the threshold stops the run with a
reason in summary.json (`SecureAggregationFailed`).

Flower's workflow is written for legacy strategies (`configure_fit` / `aggregate_fit` on a
`LegacyContext`). `_OneRound` is that legacy strategy, reduced to handing the workflow this
round's nodes and instructions and keeping the unmasked mean it returns. That mean then goes
through the run's own Message-API strategy as one reply of weight 1, so fedprox, fedadam,
fedyogi, fedadagrad and fedavgm still apply their server step to it; median and trimmed mean
cannot (common/config.py refuses them with secure aggregation).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.config import RunConfig
from common.protocol import ARRAYS, CONFIG, FAILED, METRICS, NodeReply, read_reply
from common.secagg_settings import ARRAY_NAMES, QUANTIZATION

STAGES = Stage.all()


class SecureAggregationFailed(RuntimeError):
    """Too few hospitals were left to unmask the round's sum (or the protocol broke off)."""


@dataclass(frozen=True)
class Sharing:
    """How many hospitals hold shares of each one's secrets, and how many rebuild them."""

    shares: int
    threshold: int

    @classmethod
    def for_round(cls, hospitals: int, shares: int, threshold: int) -> Sharing:
        """0 = every hospital of the round / a majority of the shares (docs/privacy.md)."""
        n = min(shares, hospitals) if shares else hospitals
        if n < hospitals and n % 2 == 0:
            n += 1  # SecAgg+ places each hospital in the middle of an odd neighbourhood
        if hospitals > QUANTIZATION.max_hospitals:
            raise SecureAggregationFailed(
                f"{hospitals} hospitals in one round: the masked sum holds at most "
                f"{QUANTIZATION.max_hospitals} (common/secagg_settings.py)"
            )
        t = threshold or n // 2 + 1
        if t > n:
            raise SecureAggregationFailed(
                f"secagg-threshold={threshold} is more than the {n} shares of a round with "
                f"{hospitals} hospitals: no key could be rebuilt"
            )
        return cls(n, max(t, 2))

    @property
    def tolerated_dropouts(self) -> int:
        return self.shares - self.threshold

    def workflow(self, hospitals: int, timeout: float) -> SecAggPlusWorkflow:
        # Fractions of the round's hospitals / shares: the workflow turns them back into
        # exactly these counts, and unlike ints they may equal the number of hospitals.
        return SecAggPlusWorkflow(
            num_shares=self.shares / hospitals,
            reconstruction_threshold=self.threshold / self.shares,
            max_weight=QUANTIZATION.max_weight,
            clipping_range=QUANTIZATION.clipping_range,
            quantization_range=QUANTIZATION.quantization_range,
            modulus_range=QUANTIZATION.modulus_range,
            timeout=timeout,
        )


@dataclass
class SecAggRound:
    """What one secure round left: the new global model and every hospital's status."""

    arrays: ArrayRecord
    replies: list[NodeReply]
    stage_replies: dict[str, int] = field(default_factory=dict)


def secure_training(
    grid: Grid, strategy: FedAvg, cfg: RunConfig
) -> Callable[[int, ArrayRecord, ConfigRecord], tuple[ArrayRecord, list[NodeReply]]] | None:
    """The round loop's training step under SecAgg+, or None when the run config says no."""
    if not cfg.secure_aggregation:
        return None

    def train(
        server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> tuple[ArrayRecord, list[NodeReply]]:
        sharing = (cfg.secagg_shares, cfg.secagg_threshold)
        done = secure_train_round(
            grid, strategy, arrays, config, server_round, cfg.round_timeout, sharing
        )
        return done.arrays, done.replies

    return train


def secure_train_round(
    grid: Grid,
    strategy: FedAvg,
    arrays: ArrayRecord,
    config: ConfigRecord,
    server_round: int,
    timeout: float,
    sharing: tuple[int, int],
) -> SecAggRound:
    """One training round under SecAgg+; `sharing` = run config (secagg-shares, -threshold)."""
    messages = list(strategy.configure_train(server_round, arrays, config, grid))
    node_ids = [m.metadata.dst_node_id for m in messages]
    if len(node_ids) < 2:
        raise SecureAggregationFailed(
            f"round {server_round}: secure aggregation needs at least 2 hospitals, "
            f"{len(node_ids)} connected"
        )
    plan = Sharing.for_round(len(node_ids), *sharing)
    # The strategy's own per-round config (FedProx adds proximal-mu) plus the weights' names.
    fit_config = dict(messages[0].content.config_records.get(CONFIG, config))
    fit_config[ARRAY_NAMES] = list(arrays.keys())
    legacy = _OneRound(grid, node_ids, fit_config)
    context = _legacy_context(legacy, server_round, arrays)
    recording = _StageGrid(grid)
    log(INFO, "round %d: SecAgg+ over %d hospitals (%s)", server_round, len(node_ids), plan)
    plan.workflow(len(node_ids), timeout)(recording, context)
    replies = _statuses(node_ids, recording.replies.get(Stage.COLLECT_MASKED_VECTORS, []))
    if legacy.mean is None:
        raise SecureAggregationFailed(_why_stopped(server_round, node_ids, plan, recording))
    new = _apply(strategy, server_round, arrays, legacy.mean, replies)
    return SecAggRound(new, replies, {s: len(r) for s, r in recording.replies.items()})


def _apply(
    strategy: FedAvg,
    server_round: int,
    arrays: ArrayRecord,
    mean_update: list[np.ndarray],
    replies: list[NodeReply],
) -> ArrayRecord:
    """global + mean update, through the run's strategy (its server step) as one reply."""
    trained = [r for r in replies if r.ok]
    if not trained:
        if replies and all(r.status == FAILED for r in replies):
            reasons = "; ".join(f"{r.site}: {r.reason}" for r in replies)
            raise SecureAggregationFailed(
                f"round {server_round}: every hospital failed ({reasons})"
            )
        log(WARNING, "round %d: no hospital trained; the global model stays", server_round)
        return arrays
    if len(trained) < len(replies):
        log(
            WARNING,
            "round %d: %d of %d hospitals refused, failed or dropped out; the sum is the rest's",
            server_round,
            len(replies) - len(trained),
            len(replies),
        )
    state = arrays.to_torch_state_dict()
    new = {}
    for (name, value), update in zip(state.items(), mean_update, strict=True):
        base = value.numpy()
        new[name] = Array((base.astype(np.float64) + update).astype(base.dtype))
    one_reply = {ARRAYS: ArrayRecord(array_dict=new), METRICS: MetricRecord({"num-examples": 1.0})}
    content = RecordDict(one_reply)
    template = trained[0].message
    one = Message(content, metadata=copy.copy(template.metadata))
    aggregated, _ = strategy.aggregate_train(server_round, [one])
    return aggregated if aggregated is not None else arrays


def _statuses(node_ids: list[int], masked: list[Message]) -> list[NodeReply]:
    """Each hospital's status and epsilon from its masked-vector reply (sent in the clear);
    a hospital that never sent one dropped out of the round."""
    replies = {m.metadata.src_node_id: read_reply(m) for m in masked}
    out = []
    for nid in node_ids:
        if nid in replies:
            out.append(replies[nid])
        else:
            out.append(
                NodeReply(
                    f"node-{nid}",
                    FAILED,
                    "dropped out of the secure aggregation before sending its masked update",
                )
            )
    return out


def _why_stopped(server_round: int, node_ids: list[int], plan: Sharing, grid: _StageGrid) -> str:
    """The reason summary.json gives: where the protocol stopped and how many were left."""
    answered = {s: len([m for m in r if not m.has_error()]) for s, r in grid.replies.items()}
    last = next((s for s in reversed(STAGES) if s in answered), STAGES[0])
    left = answered.get(last, 0)
    return (
        f"round {server_round}: secure aggregation stopped at stage '{last}': {left} of "
        f"{len(node_ids)} hospitals left, but unmasking the sum needs {plan.threshold} "
        f"(secagg-threshold; a round survives losing at most {plan.tolerated_dropouts})"
    )


def _legacy_context(legacy: Strategy, server_round: int, arrays: ArrayRecord) -> LegacyContext:
    """A throwaway LegacyContext for one round (the ServerApp's own context is left alone)."""
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=legacy,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = arrays
    return context


class _StageGrid(Grid):
    """The round's grid, remembering each SecAgg+ stage's replies (statuses, reasons)."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.replies: dict[str, list[Message]] = {}

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201, D102
        messages = list(messages)
        stage = messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
        got = list(self.inner.send_and_receive(messages, timeout=timeout))
        self.replies[str(stage)] = got
        return got

    # Everything else is the wrapped grid's.
    def set_run(self, run):  # noqa: ANN001, ANN201, D102
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: ANN201, D102
        return self.inner.run

    def create_message(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201, D102
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self):  # noqa: ANN201, D102
        return self.inner.get_node_ids()

    def push_messages(self, messages):  # noqa: ANN001, ANN201, D102
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201, D102
        return self.inner.pull_messages(message_ids)


class _OneRound(Strategy):
    """The legacy strategy SecAggPlusWorkflow drives: this round's nodes and instructions in,
    the unmasked mean update out. Nothing else of the legacy API is used."""

    def __init__(self, grid: Grid, node_ids: list[int], fit_config: dict) -> None:
        self.grid = grid
        self.node_ids = node_ids
        self.fit_config = fit_config
        self.mean: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        run_id = self.grid.run.run_id
        ins = FitIns(parameters, dict(self.fit_config))
        return [(GridClientProxy(nid, self.grid, run_id), ins) for nid in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        # The workflow has put the unmasked weighted mean into every result.
        if not results:
            return None, {}
        params: Parameters = results[0][1].parameters
        self.mean = [np.asarray(a, dtype=np.float64) for a in parameters_to_ndarrays(params)]
        return ndarrays_to_parameters(self.mean), {}

    def initialize_parameters(self, client_manager):  # noqa: ANN001, ANN201
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, ANN201
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001, ANN201
        return None
