"""The real ServerApp and the real ClientApp in one process, for fault tests and benchmarks.

`InProcessGrid` is a Flower `Grid` whose hospitals are fedvox's own ClientApp
(`client.app.app`) called in this process, each with its own simulated node `Context` (the
hospital folder `<data-dir>/hospital-<i>`, its ledger under the run's state-dir). Only the
transport is replaced: the round loop, the update checks, Flower's strategies, the privacy
gate and the recorder are the ones a deployment runs. `tamper` changes one hospital's replies
on their way back — what a broken or malicious node would send:

    run = run_in_process(run_config, hospitals=3, tamper={3: scale_arrays(1e6)})
    run.summary["rounds"][1]["rejected"]   # [{"site": "hospital-3", "reason": ...}]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

Tamper = Callable[[Message, Message, int], Message]  # (reply, request, global round) -> sent
RUN_ID = 1501


class InProcessGrid(Grid):
    """Hospitals 1..n answering in this process; every reply is kept in `replies`."""

    def __init__(self, run_config: dict[str, Any], hospitals: int, tamper: dict[int, Tamper]):
        from client.app import app as client_app

        self.client_app = client_app
        self.tamper = tamper
        self.contexts = {
            i: Context(
                run_id=RUN_ID,
                node_id=i,
                node_config={"partition-id": i - 1, "num-partitions": hospitals},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(1, hospitals + 1)
        }
        self._answers: dict[str, Message] = {}
        self.replies: list[Message] = []
        # (node, global round) -> the arrays its training reply carried, copied before Flower's
        # strategies see them (FedTrimmedAvg empties the replies it aggregates)
        self.updates: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def set_run(self, run: Any) -> None:  # noqa: D102
        self._run = run

    @property
    def run(self) -> Any:  # noqa: D102
        return getattr(self, "_run", None)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102
        raise NotImplementedError("fedvox builds its messages itself")

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            msg.metadata.__dict__["_run_id"] = RUN_ID
            node = msg.metadata.dst_node_id
            answer = self.client_app(message=msg, context=self.contexts[node])
            answer.metadata.__dict__["_src_node_id"] = node
            config = msg.content.config_records.get("config", {})
            global_round = int(config.get("server-round", 0)) + int(config.get("round-offset", 0))
            if node in self.tamper:
                answer = self.tamper[node](answer, msg, global_round)
            if not answer.has_error() and "arrays" in answer.content.array_records:
                arrays = answer.content.array_records["arrays"]
                self.updates[(node, global_round)] = {
                    k: np.array(v.numpy()) for k, v in arrays.items()
                }
            self._answers[msg.metadata.message_id] = answer
            self.replies.append(answer)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._answers.pop(i) for i in list(message_ids) if i in self._answers]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


@dataclass
class InProcessRun:
    summary: dict[str, Any]
    grid: InProcessGrid
    error: BaseException | None = None
    ledgers: dict[str, dict] = field(default_factory=dict)


def run_in_process(
    run_config: dict[str, Any], hospitals: int, tamper: dict[int, Tamper] | None = None
) -> InProcessRun:
    """The ServerApp's `main` over an InProcessGrid; the run's summary.json and ledgers."""
    from flwr.supercore.task_identity import TaskIdentity

    from server.app import main

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    grid = InProcessGrid(run_config, hospitals, tamper or {})
    context = Context(
        run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    error = None
    try:
        main(grid, context)
    except Exception as exc:  # noqa: BLE001 - the summary says what happened
        error = exc
    path = Path(run_config["output-dir"]) / run_config["run-name"] / "summary.json"
    state = Path(run_config["state-dir"])
    ledgers = {
        p.parent.name: json.loads(p.read_text()) for p in state.glob("*/privacy_ledger.json")
    }
    return InProcessRun(json.loads(path.read_text()), grid, error, ledgers)


# -- what a broken or malicious hospital sends ----------------------------------------------


def _with_arrays(
    reply: Message, request: Message, change: Callable[[dict[str, np.ndarray]], dict]
) -> Message:
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return reply
    arrays = {k: np.array(v.numpy()) for k, v in reply.content.array_records["arrays"].items()}
    content = RecordDict(dict(reply.content.items()))
    content["arrays"] = ArrayRecord({k: Array(v) for k, v in change(arrays).items()})
    return Message(content, reply_to=request)


def nan_arrays(reply: Message, request: Message, global_round: int) -> Message:
    def change(a: dict) -> dict:
        first = sorted(a)[0]
        a[first] = a[first].astype(np.float32)
        a[first].flat[0] = np.nan
        return a

    return _with_arrays(reply, request, change)


def scale_arrays(factor: float) -> Tamper:
    def tamper(reply: Message, request: Message, global_round: int) -> Message:
        return _with_arrays(reply, request, lambda a: {k: v * factor for k, v in a.items()})

    return tamper


def wrong_shape(reply: Message, request: Message, global_round: int) -> Message:
    def change(a: dict) -> dict:
        first = sorted(a)[0]
        a[first] = np.zeros(a[first].shape + (2,), dtype=a[first].dtype)
        return a

    return _with_arrays(reply, request, change)


def claim_examples(count: float) -> Tamper:
    def tamper(reply: Message, request: Message, global_round: int) -> Message:
        if reply.has_error() or reply.metadata.message_type != "train":
            return reply
        metrics = dict(reply.content.metric_records["metrics"])
        metrics["num-examples"] = float(count)
        content = RecordDict(dict(reply.content.items()))
        content["metrics"] = MetricRecord(metrics)
        return Message(content, reply_to=request)

    return tamper


def crash_in_round(crash_round: int) -> Tamper:
    """A Flower-level error reply (the ClientApp process died) in one round: only a node id."""

    def tamper(reply: Message, request: Message, global_round: int) -> Message:
        if global_round != crash_round:
            return reply
        return Message(Error(code=0, reason="ClientApp exited"), reply_to=request)

    return tamper
