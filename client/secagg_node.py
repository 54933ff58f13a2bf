"""The node's side of SecAgg+ (run config secure-aggregation = true): Flower's `secaggplus_mod`.

`secagg_mod` sits first in the ClientApp's mods. A training message that carries SecAgg+'s
configs goes to Flower's `secaggplus_mod`, which runs the protocol's four stages (keys, key
shares, masked vector, unmask shares). Only in the masked-vector stage does it call the
app, and then through `_train_masked`, which:

1. hands fedvox's own `train` handler the message it always gets (`arrays` + `config`,
   rebuilt from the legacy `fitins.*` records the workflow sends): the privacy gate, the
   ledger, DP-SGD and the node's policy run exactly as without secure aggregation;
2. turns the reply into the legacy fit result `secaggplus_mod` masks: the update (trained -
   global weights) and the weight (the noisy training-set count the run already released,
   capped at max_weight). A hospital that refused or failed sends a zero update of weight 0,
   so it stays in the protocol (its masks still cancel) and adds nothing to the sum;
3. keeps `metrics` (status, epsilon, timings: common.protocol.MANIFEST) and `node` in the
   clear, WITHOUT `num-examples`.

After `secaggplus_mod` has masked the vector it leaves the plain count it read in the reply;
`secagg_mod` overwrites it with 0, so the weight, like the update, leaves the node only masked.
Every other message passes through untouched.
"""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat

from client.message_log import append_record, message_log_path
from common.protocol import ARRAYS, CONFIG, METRICS, NODE, OK
from common.secagg_settings import ARRAY_NAMES, QUANTIZATION

log = logging.getLogger("fedvox.client")

FITINS, FITRES = "fitins", "fitres"
# secaggplus_mod reads the weight from this record and then returns it with the reply.
PLAIN_COUNT = f"{FITRES}.num_examples"


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+ for training messages that carry its configs; everything else untouched."""
    if not _is_secagg(msg):
        return call_next(msg, context)
    _audit_stage(msg, context)

    def masked_stage(inner: Message, ctx: Context) -> Message:
        return _train_masked(inner, ctx, call_next)

    reply = secaggplus_mod(msg, context, masked_stage)
    if reply.has_content() and PLAIN_COUNT in reply.content.metric_records:
        # Masked inside the vector already. The workflow still reads a legacy fit result
        # (recorddict_to_fitres) from this reply, so the record stays, saying nothing.
        reply.content.metric_records[PLAIN_COUNT] = MetricRecord({"num_examples": 0})
    return reply


def _audit_stage(msg: Message, context: Context) -> None:
    """One audit line per SecAgg+ stage as it arrives (the masked-vector stage's train
    message and reply are audited by message_log_mod as always)."""
    path = message_log_path(context)
    if path is None:
        return
    stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_id": msg.metadata.run_id,
        "node_id": context.node_id,
        "message_id": msg.metadata.message_id,
        "action": f"secagg.{stage}",
        "round": int(msg.metadata.group_id) if msg.metadata.group_id.isdigit() else None,
        "site": context.node_config.get("site-name"),
        "status": "received",
    }
    append_record(path, record)


def _is_secagg(msg: Message) -> bool:
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and msg.has_content()
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )


def _train_masked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """fedvox's train handler on the workflow's fit instructions; its reply as a fit result."""
    content = msg.content
    config = dict(content.config_records[f"{FITINS}.config"])
    names = [str(n) for n in config.pop(ARRAY_NAMES)]
    sent = content.array_records[f"{FITINS}.parameters"]
    global_arrays = [bytes_to_ndarray(a.data) for a in sent.values()]
    arrays = ArrayRecord(
        array_dict={n: Array(a) for n, a in zip(names, global_arrays, strict=True)}
    )
    inner = Message(
        RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(config)}),
        metadata=copy.copy(msg.metadata),
    )
    reply = call_next(inner, context)
    if reply.has_error():
        raise RuntimeError(f"the train handler failed: {reply.error.reason}")
    update, weight = _update_and_weight(reply.content, names, global_arrays)
    out = RecordDict()
    for key in (METRICS, NODE):
        if key in reply.content:
            out[key] = reply.content[key]
    metrics = out.get(METRICS, MetricRecord())
    metrics.pop("num-examples", None)  # leaves only masked, as the vector's weight
    status = Status(Code.OK, "")
    fitres = FitRes(status, ndarrays_to_parameters(update), weight, {})
    for key, record in compat.fitres_to_recorddict(fitres, keep_input=True).items():
        out[key] = record
    return Message(out, reply_to=msg)


def _update_and_weight(
    content: RecordDict, names: list[str], global_arrays: list[np.ndarray]
) -> tuple[list[np.ndarray], int]:
    """(trained - global, weight) of an ok reply; (zeros, 0) of a refusal or failure."""
    node = content.config_records.get(NODE, ConfigRecord())
    if node.get("status", OK) != OK or ARRAYS not in content.array_records:
        return [np.zeros_like(g, dtype=np.float64) for g in global_arrays], 0
    trained = content.array_records[ARRAYS]
    update = [
        trained[n].numpy().astype(np.float64) - g.astype(np.float64)
        for n, g in zip(names, global_arrays, strict=True)
    ]
    q = QUANTIZATION
    largest = max((float(np.abs(u).max()) for u in update if u.size), default=0.0)
    if largest > q.clipping_range:  # the sum stays right for the rest; say so here only
        log.warning(
            "update coordinate %.3g is clipped to the secure aggregation range +-%g",
            largest,
            q.clipping_range,
        )
    count = float(content.metric_records[METRICS].get("num-examples", 0.0))
    if count > q.max_weight:
        log.warning("training-set weight capped at max_weight %g", q.max_weight)
    return update, int(min(count, q.max_weight))
