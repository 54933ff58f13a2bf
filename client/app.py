"""The hospital node: a Flower ClientApp that trains with DP-SGD on local NIfTI data.

Three actions, each a Flower handler below:

- `train`: the global model from the message, trained on this site's training cases
  (`client.train.local_sgd`) after the privacy gate granted the steps (`client.gate`); the
  ledger is on disk before the weights leave;
- `evaluate`: the global model on this site's validation cases; metrics plus calibration
  aggregates (never a per-case score);
- `finetune` (message type "train.finetune", sent once after the last round): a private,
  DP-trained copy of the final model for this site; the copy stays here, its metrics leave.

Only weights and aggregate metrics leave this node. Anything that could carry a path, a file
name or a case id (data errors, tracebacks) is logged locally and replaced by a generic reason.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.audit import audit_mod
from client.gate import PrivacyGate
from client.node import Node, NodeConfigError
from client.train import LocalTraining, local_sgd
from common.calibration import validation_summary
from common.privacy import PrivacyRefusal
from common.protocol import (
    EVAL_METRIC_KEYS,
    FAILED,
    OK,
    REFUSED,
    TRAIN_METRIC_KEYS,
    reply,
)
from common.site import SiteData
from common.tasks import task_for
from common.weights import to_record

log = logging.getLogger("fedvox.client")

# Every message this node handles is appended to <state-dir>/audit.jsonl (deployment).
app = ClientApp(mods=[audit_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer(msg, context, TRAIN_METRIC_KEYS, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _answer(msg, context, EVAL_METRIC_KEYS, _evaluate)


@app.train("finetune")
def finetune(msg: Message, context: Context) -> Message:
    return _answer(msg, context, EVAL_METRIC_KEYS, _finetune)


def _answer(
    msg: Message,
    context: Context,
    keys: tuple[str, ...],
    action: Callable[[Message, Node], Message],
) -> Message:
    """Run `action`; every failure becomes a clean reply whose reason names no file."""
    site_name = str(context.node_config.get("site-name", "")) or "unknown-site"
    try:
        node = Node.from_message(msg, context)
        site_name = node.site_name
        return action(msg, node)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clean reply
        log.error("fedvox node failed:\n%s", traceback.format_exc())  # full error stays here
        reason = (
            str(exc)
            if isinstance(exc, NodeConfigError)
            else f"{type(exc).__name__} (details in the node's log)"
        )
        return reply(msg, site_name, FAILED, dict.fromkeys(keys, 0.0), reason)


# -- train --------------------------------------------------------------------------------


def _train(msg: Message, node: Node) -> Message:
    t0 = time.perf_counter()
    data = node.load("train")
    t1 = time.perf_counter()  # compute-s: everything after loading (accounting included)
    metrics = dict.fromkeys(TRAIN_METRIC_KEYS, 0.0)
    metrics.update({"num-examples": len(data), "data-s": t1 - t0})
    if not node.cfg.dp:
        return _train_without_dp(msg, node, data, metrics, t1)
    try:
        gate = _open_gate(node, len(data))
    except PrivacyRefusal as exc:
        return _refuse(msg, node, str(exc), metrics, None)
    steps = node.steps(len(data))
    try:
        plan = gate.plan(len(data), steps.sample_rate, steps.planned)
        grant = gate.grant(plan, steps.per_round)
    except PrivacyRefusal as exc:
        return _refuse(msg, node, str(exc), metrics, gate)
    model = node.global_model(msg, data)
    result = local_sgd(
        model,
        data.images,
        data.labels,
        node.round_training(),
        grant.noise_multiplier,
        task_for(data.spec).loss_fn(),
    )
    node.remember(model)
    # The ledger is on disk before the weights leave the node.
    eps_run, eps_life = gate.spend(grant, node.plan.global_round, result.history)
    metrics.update(
        {
            "train-loss": result.loss,
            "epsilon-run": eps_run,
            "epsilon-lifetime": eps_life,
            "delta": gate.budget.delta,
            "noise-multiplier": grant.noise_multiplier,
            "sample-rate": grant.sample_rate,
            "steps": float(sum(s for _, _, s in result.history)),
            "compute-s": time.perf_counter() - t1,
        }
    )
    return reply(msg, node.site_name, OK, metrics, arrays=to_record(model))


def _refuse(
    msg: Message, node: Node, reason: str, metrics: dict, gate: PrivacyGate | None
) -> Message:
    """A refusal is an answer, not an error: the round goes on with the other hospitals."""
    log.warning("refusing to train: %s", reason)
    if gate is not None:
        delta = gate.budget.delta
        eps_run, eps_life = gate.spent()
    else:  # the budget itself was unusable: report what the ledger holds at the run's delta
        from client.ledger import PrivacyLedger

        delta = node.cfg.target_delta
        ledger = PrivacyLedger.open(node.state_dir, node.cfg.accountant)
        eps_run, eps_life = ledger.epsilon(delta, node.plan.run_uid), ledger.epsilon(delta)
    metrics = {**metrics, "num-examples": 0.0, "data-s": 0.0}
    metrics.update({"refused": 1.0, "delta": delta, "epsilon-run": eps_run})
    metrics["epsilon-lifetime"] = eps_life
    return reply(msg, node.site_name, REFUSED, metrics, reason)


def _train_without_dp(
    msg: Message, node: Node, data: SiteData, metrics: dict, t1: float
) -> Message:
    """One round WITHOUT differential privacy (run config dp=false): no ledger entry, and
    the reply says epsilon = inf so nobody mistakes the result for a private one."""
    # The benchmarks' non-private reference. The server's run config alone cannot switch a
    # hospital's privacy off: only simulated hospitals or an explicit node opt-in comply.
    if not node.policy.may_train_without_dp:
        reason = (
            "the server asked for training without DP (dp=false); this hospital trains "
            "only with DP (node config allow-non-dp is not set)"
        )
        return _refuse(msg, node, reason, metrics, None)
    model = node.global_model(msg, data)
    result = local_sgd(
        model, data.images, data.labels, node.round_training(), None, task_for(data.spec).loss_fn()
    )
    node.remember(model)
    metrics.update(
        {
            "train-loss": result.loss,
            "epsilon-run": math.inf,
            "epsilon-lifetime": math.inf,
            "compute-s": time.perf_counter() - t1,
        }
    )
    return reply(msg, node.site_name, OK, metrics, arrays=to_record(model))


# -- evaluate -----------------------------------------------------------------------------


def _evaluate(msg: Message, node: Node) -> Message:
    t0 = time.perf_counter()
    data = node.load("val")
    t1 = time.perf_counter()
    model = node.global_model(msg, data)
    metrics = _validation_metrics(model, data)
    metrics.update({"data-s": t1 - t0, "compute-s": time.perf_counter() - t1})
    return reply(msg, node.site_name, OK, metrics)


def _validation_metrics(model: torch.nn.Module, data: SiteData) -> dict:
    """Metrics of `model` on this site's validation part, plus the calibration aggregates
    (case counts per score bin, loss per temperature) the server picks its threshold from."""
    evaluation = task_for(data.spec).evaluate(model, data.images, data.labels)
    metrics = {k: float(v) for k, v in evaluation.metrics.items() if v is not None}
    metrics["num-examples"] = len(data)
    metrics.update(validation_summary(evaluation.logits, data.labels))
    return metrics


# -- fine-tune ----------------------------------------------------------------------------


def _finetune(msg: Message, node: Node) -> Message:
    """Local fine-tuning of the run's final global model for this site (finetune-epochs > 0).

    Under DP it trains with the run's noise multiplier; its steps were part of the run's
    privacy plan from round 1 (each round's noise was calibrated for them), so the run's
    epsilon still ends at its target. The fine-tuned model stays on the node
    (`Node.personalised_model_path`); only its metrics on the validation part leave, prefixed
    "finetuned-". A re-sent message reuses the saved model and spends nothing more.
    """
    val = node.load("val")
    model = node.global_model(msg, val)
    path = node.personalised_model_path()
    try:
        if node.cfg.finetune_epochs == 0:
            raise PrivacyRefusal("finetune-epochs is 0 in this run's config")
        if node.plan.global_round != node.plan.total_rounds:
            raise PrivacyRefusal("fine-tuning comes once, after the run's last planned round")
        if path.is_file():
            model.load_state_dict(torch.load(path, weights_only=True))
        else:
            _finetune_and_save(node, model)
    except PrivacyRefusal as exc:
        log.warning("not fine-tuning the final model: %s", exc)
        return reply(msg, node.site_name, REFUSED, {"finetune-refused": 1.0}, str(exc))
    metrics = _validation_metrics(model, val)
    out = {f"finetuned-{k}": v for k, v in metrics.items()}
    if node.cfg.dp:
        gate = _open_gate(node, len(node.load("train")))
        out["finetuned-epsilon-run"] = gate.spent()[0]
    return reply(msg, node.site_name, OK, out)


def _finetune_and_save(node: Node, model: torch.nn.Module) -> None:
    """Train `model` in place for finetune-epochs (DP through the gate) and keep it here."""
    data = node.load("train")
    settings = LocalTraining.from_config(node.cfg, epochs=node.cfg.finetune_epochs)
    if node.cfg.dp:
        gate = _open_gate(node, len(data))
        plan = gate.existing_plan(len(data))
        grant = gate.grant(plan, node.steps(len(data)).per_epoch * node.cfg.finetune_epochs)
        result = local_sgd(
            model, data.images, data.labels, settings, grant.noise_multiplier,
            task_for(data.spec).loss_fn(),
        )  # fmt: skip
        # On disk before anything about the fine-tuned model leaves the node.
        gate.spend(grant, node.plan.global_round, result.history, phase="finetune")
    elif not node.policy.may_train_without_dp:
        raise PrivacyRefusal("this hospital trains only with DP (allow-non-dp is not set)")
    else:
        local_sgd(model, data.images, data.labels, settings, None, task_for(data.spec).loss_fn())
    path = node.personalised_model_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)


def _open_gate(node: Node, num_examples: int) -> PrivacyGate:
    return PrivacyGate.open(
        node.state_dir,
        node.plan.run_uid,
        accountant=node.cfg.accountant,
        server_epsilon=node.cfg.target_epsilon,
        server_delta=node.cfg.target_delta,
        node_max_epsilon=node.policy.max_epsilon,
        node_delta=node.policy.delta,
        num_examples=num_examples,
    )
