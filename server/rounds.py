"""The path of a federated round, as the server drives it.

    for each round:
        strategy.configure_train  -> grid.send_and_receive  (hospitals train, client/app.py)
        keep the hospitals that trained -> strategy.aggregate_train  (Flower's FedAvg & co.)
        strategy.configure_evaluate -> grid.send_and_receive (hospitals validate the new model)
        recorder.record  (held-out evaluation, checkpoint, summary.json)
    after the last planned round, if finetune-epochs > 0: one "train.finetune" message each

The loop is Flower's `Strategy.start` spelled out, so fedvox sees every reply before it is
aggregated (refusals and failures are recorded, never averaged) and can send the fine-tuning
message once at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.protocol import ARRAYS, CONFIG, FINETUNE, NodeReply, RoundPlan, read_reply
from server.recorder import RoundRecorder

# One secure training round: (round, global model, config) -> (new model, hospitals' replies).
SecureTrain = Callable[[int, ArrayRecord, ConfigRecord], tuple[ArrayRecord, list[NodeReply]]]


class EveryHospitalFailed(RuntimeError):
    """No hospital could train in a round: more rounds cannot help."""


def run_rounds(
    grid: Grid,
    strategy: FedAvg,
    arrays: ArrayRecord,
    plan: RoundPlan,
    rounds: int,
    timeout: float,
    recorder: RoundRecorder,
    evaluate_after: Callable[[int], bool] = lambda global_round: True,
    secure: SecureTrain | None = None,
) -> ArrayRecord:
    """Rounds 1..`rounds` from `arrays`; returns the final global model. Hospitals evaluate
    (each evaluation is a DP release charged to them) after the rounds `evaluate_after` says.
    `secure` (issue 18, server/secagg.py) trains each round under SecAgg+ instead."""
    for server_round in range(1, rounds + 1):
        config = replace(plan, server_round=server_round).record()
        if secure is not None:  # issue 18: the server sees only the sum of the updates
            arrays, train = secure(server_round, arrays, config)
        else:
            messages = strategy.configure_train(server_round, arrays, config, grid)
            train = [read_reply(m) for m in grid.send_and_receive(messages, timeout=timeout)]
            arrays = _aggregate(strategy, server_round, arrays, train)
        evaluate = []
        if evaluate_after(plan.round_offset + server_round):
            config = replace(plan, server_round=server_round).record()
            messages = strategy.configure_evaluate(server_round, arrays, config, grid)
            evaluate = [read_reply(m) for m in grid.send_and_receive(messages, timeout=timeout)]
        recorder.record(server_round, arrays.to_torch_state_dict(), train, evaluate)
    return arrays


def _aggregate(
    strategy: FedAvg, server_round: int, arrays: ArrayRecord, replies: list[NodeReply]
) -> ArrayRecord:
    """Flower's aggregation of the hospitals that trained; the old model if none did."""
    failed = [r for r in replies if r.status == "failed"]
    if replies and len(failed) == len(replies):
        reasons = "; ".join(f"{r.site}: {r.reason}" for r in failed)
        raise EveryHospitalFailed(f"round {server_round}: every hospital failed ({reasons})")
    good = [r.message for r in replies if r.ok and float(r.metrics.get("num-examples", 0)) > 0]
    if len(good) < len(replies):
        log(
            WARNING,
            "round %d: %d of %d hospitals refused or failed; aggregating the rest",
            server_round,
            len(replies) - len(good),
            len(replies),
        )
    if not good:
        log(WARNING, "round %d: no hospital trained; the global model stays", server_round)
        return arrays
    new, _ = strategy.aggregate_train(server_round, good)
    return new if new is not None else arrays


def finetune_round(
    grid: Grid, arrays: ArrayRecord, plan: RoundPlan, timeout: float
) -> list[NodeReply]:
    """Ask every hospital once to fine-tune the final model for itself (its copy stays there)."""
    content = RecordDict({ARRAYS: arrays, CONFIG: plan.record()})
    messages = [
        Message(content=content, dst_node_id=node_id, message_type=FINETUNE)
        for node_id in grid.get_node_ids()
    ]
    return [read_reply(m) for m in grid.send_and_receive(messages, timeout=timeout)]
