"""The path of a federated round, as the server drives it.

    for each round:
        strategy.configure_train  -> grid.send_and_receive  (hospitals train, client/app.py)
        check every update (server/checks.py) -> strategy.aggregate_train (Flower's FedAvg & co.)
        strategy.configure_evaluate -> grid.send_and_receive (hospitals validate the new model)
        recorder.record  (held-out evaluation, checkpoint, summary.json)
    after the last planned round, if finetune-epochs > 0: one "train.finetune" message each

The loop is Flower's `Strategy.start` spelled out, so fedvox sees every reply before it is
aggregated (refusals, failures and refused updates are recorded, never averaged) and can send
the fine-tuning message once at the end. Every message tells the nodes which of their releases
the server used (`RoundPlan.used`, `settled_round`): a node keeps an update until then, so a
lost reply is asked for again instead of trained (and paid for) again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.protocol import (
    ARRAYS,
    CONFIG,
    FAILED,
    FINETUNE,
    SETTLE,
    NodeReply,
    RoundPlan,
    read_reply,
)
from server.checks import UpdateChecker
from server.recorder import RoundRecorder

REJECTED = "rejected"  # a hospital said ok, the server refused its update (server/checks.py)
# One secure training round: (round, global model, config) -> (new model, hospitals' replies).
SecureTrain = Callable[[int, ArrayRecord, ConfigRecord], tuple[ArrayRecord, list[NodeReply]]]


class NoUsableUpdate(RuntimeError):
    """No hospital's update could be used in a round: more rounds cannot help."""


@dataclass
class RoundLoop:
    """One invocation's rounds; `names` and `used` carry over from round to round."""

    grid: Grid
    strategy: FedAvg
    plan: RoundPlan
    timeout: float
    recorder: RoundRecorder
    checker: UpdateChecker
    evaluate_after: Callable[[int], bool] = lambda global_round: True
    names: dict[int, str] = field(default_factory=dict)  # node id -> site name, this run
    used: list[str] = field(default_factory=list)  # hashes of releases used in this run
    # SecAgg+ (server/secagg_round.py): trains each round under it; the server sees only the
    # sum of the updates, so the per-update checks (server/checks.py) cannot apply there.
    secure: SecureTrain | None = None

    def run(self, arrays: ArrayRecord, rounds: int) -> ArrayRecord:
        """Rounds 1..`rounds` from `arrays`; returns the final global model. Hospitals evaluate
        (each evaluation is a DP release charged to them) after the rounds `evaluate_after`
        says."""
        for server_round in range(1, rounds + 1):
            arrays = self.one_round(server_round, arrays)
        return arrays

    def one_round(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        global_round = self.plan.round_offset + server_round
        config = self._plan(server_round, settled=global_round - 1).record()
        if self.secure is not None:
            arrays, train = self.secure(server_round, arrays, config)
            self.used += [r.release for r in train if r.ok and r.release]
        else:
            messages = self.strategy.configure_train(server_round, arrays, config, self.grid)
            train = self._send(messages)
            arrays = self._aggregate(server_round, arrays, train)
        evaluate: list[NodeReply] = []
        if self.evaluate_after(global_round):
            config = self._plan(server_round, settled=global_round - 1).record()
            messages = self.strategy.configure_evaluate(server_round, arrays, config, self.grid)
            evaluate = self._send(messages)
            self.used += [r.release for r in evaluate if r.ok and r.release]
        self.recorder.record(
            server_round, arrays.to_torch_state_dict(), train, evaluate, set(self.used)
        )
        return arrays

    def finetune(self, arrays: ArrayRecord) -> list[NodeReply]:
        """Ask every hospital once to fine-tune the final model for itself (its copy stays
        there), after the last planned round."""
        last = self._plan(
            self.plan.total_rounds - self.plan.round_offset, settled=self.plan.total_rounds
        )
        content = RecordDict({ARRAYS: arrays, CONFIG: last.record()})
        messages = [
            Message(content=content, dst_node_id=node_id, message_type=FINETUNE)
            for node_id in self.grid.get_node_ids()
        ]
        return self._send(messages)

    def settle(self, last_round: int, timeout: float = 120.0) -> None:
        """Tell every node that the run ended at `last_round` and which releases were used
        (a node then marks its last releases and deletes the updates it kept)."""
        plan = self._plan(last_round - self.plan.round_offset, settled=last_round)
        content = RecordDict({CONFIG: plan.record()})
        messages = [
            Message(content=content, dst_node_id=node_id, message_type=SETTLE)
            for node_id in self.grid.get_node_ids()
        ]
        try:
            self.grid.send_and_receive(messages, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - housekeeping: the run itself is done
            log(WARNING, "fedvox: telling the nodes the run ended failed: %s", exc)

    def _plan(self, server_round: int, settled: int) -> RoundPlan:
        return replace(
            self.plan, server_round=server_round, settled_round=settled, used=tuple(self.used)
        )

    def _send(self, messages: list[Message]) -> list[NodeReply]:
        messages = list(messages)
        replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        # Message ids are set when pushed: map each reply to the node its request went to.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        read = [
            read_reply(m, self.names, sent_to.get(m.metadata.reply_to_message_id)) for m in replies
        ]
        answered = {m.metadata.reply_to_message_id for m in replies}
        for message_id, node_id in sent_to.items():
            if message_id not in answered:  # its node went offline or restarted, or timed out
                site = self.names.get(node_id) or f"node-{node_id}"
                reason = "no reply: the node went offline or restarted, or the round timed out"
                read.append(NodeReply(site, FAILED, reason, node_id=node_id))
        return read

    def _aggregate(
        self, server_round: int, arrays: ArrayRecord, replies: list[NodeReply]
    ) -> ArrayRecord:
        """Flower's aggregation of the checked updates of the hospitals that trained."""
        global_round = self.plan.round_offset + server_round
        trained = [r for r in replies if r.ok and float(r.metrics.get("num-examples", 0)) > 0]
        accepted, rejected = self.checker.check(trained, arrays)
        for r in trained:
            why = next((x.reason for x in rejected if x.site == r.site), None)
            if why is not None:
                r.status, r.reason = REJECTED, f"update refused by the server: {why}"
                log(WARNING, "round %d: %s: %s", global_round, r.site, r.reason)
        if not accepted:
            reasons = "; ".join(f"{r.site}: {r.status} ({r.reason})" for r in replies)
            raise NoUsableUpdate(
                f"round {global_round}: no hospital's update could be used "
                f"({reasons or 'no reply arrived'})"
            )
        if len(accepted) < len(replies):
            log(
                WARNING,
                "round %d: %d of %d updates refused, failed or missing; aggregating the rest",
                global_round,
                len(replies) - len(accepted),
                len(replies),
            )
        self.used += [r.release for r in accepted if r.release]
        sites = [r.site for r in accepted]
        new, _ = self.strategy.aggregate_train(server_round, [r.message for r in accepted])
        if new is None:
            return arrays
        _require_finite(new, global_round, sites)
        return new


def _require_finite(arrays: ArrayRecord, global_round: int, sites: list[str]) -> None:
    """The checks keep non-finite updates out; a strategy that still makes one is a bug."""
    for key, value in arrays.items():
        a = np.asarray(value.numpy())
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise ArithmeticError(
                f"round {global_round}: the aggregated model's {key} is not finite "
                f"(aggregated from {', '.join(sites)})"
            )
