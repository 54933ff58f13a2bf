"""The hospital node: a Flower ClientApp that trains with DP-SGD on local NIfTI data.

Three actions, each a Flower handler below, and each through the privacy gate
(`client/gate.py`) before anything derived from local data leaves:

- `train`: the global model from the message, trained on this site's training cases
  (`client.train.local_sgd`) with the run's noise; the release is on the ledger before the
  weights leave;
- `evaluate`: one differentially private release of counts about this site's validation cases
  (`common.eval_release`); the server computes local metrics and the threshold from it;
- `finetune` (message type "train.finetune", sent once after the last round): a DP-trained
  copy of the final model for this site; the copy stays here, a release about it leaves.

What may leave is listed, key by key, in `common.protocol.MANIFEST`. Anything that could carry
a path, a file name or a case id (data errors, tracebacks) is logged locally and replaced by a
generic reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import replace

import torch
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from client.gate import (
    EVALUATE,
    FINETUNE,
    FINETUNE_EVALUATE,
    TRAIN,
    PrivacyGate,
    release_entry,
)
from client.message_log import message_log_mod
from client.node import Node, NodeConfigError, RunRefused
from client.releases import settle_releases
from client.secagg_node import secagg_mod
from client.statistics import ensure_statistics
from client.train import LocalTraining, local_sgd
from common import model_registry
from common.eval_release import release
from common.feature_cache import FEATURES_FILE, persisted
from common.files import atomic_write
from common.privacy import PrivacyRefusal
from common.protocol import FAILED, OK, REFUSED, reply
from common.site import SiteData
from common.tasks import task_for
from common.weights import fingerprint, to_record, unwrap

log = logging.getLogger("fedvox.client")
NO_DP_REFUSAL = (
    "the server asked for a computation without DP (dp=false); this hospital releases "
    "nothing without DP (node config allow-non-dp is not set)"
)


class NodeFailure(RuntimeError):
    """What Flower reports to the server when anything below the shield fails."""


def shield_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The outermost mod: a failure anywhere below it (a SecAgg+ stage, a mod, a handler)
    reaches the server as its exception type alone; the details (paths, file names, counts)
    stay in the node's log. Flower would send the exception's text."""
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a generic one
        log.error("fedvox node: a message failed:\n%s", traceback.format_exc())
        raise NodeFailure(f"{type(exc).__name__} (details in the node's log)") from None
    if reply.has_error():
        log.error("fedvox node: error reply: %s", reply.error.reason)
        generic = Error(reply.error.code, "the node failed (details in its log)")
        reply = Message(generic, reply_to=msg)
    return reply


# Every message this node handles is appended to <state-dir>/audit.jsonl (deployment).
# secagg_mod: SecAgg+ training messages go through Flower's secaggplus_mod first; the audit
# log sees the train message and reply the handler sees. shield_mod keeps every error generic.
app = ClientApp(mods=[shield_mod, secagg_mod, message_log_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _evaluate)


@app.train("finetune")
def finetune(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _finetune)


@app.query("settle")
def settle(msg: Message, context: Context) -> Message:
    """The run ended: what became of this node's last releases (`_settle` does the work)."""
    return _answer(msg, context, lambda m, node: reply(m, node.site_name, OK, {}))


def _answer(msg: Message, context: Context, action: Callable[[Message, Node], Message]) -> Message:
    """Run `action`; every failure becomes a clean reply whose reason names no file."""
    site_name = str(context.node_config.get("site-name", "")) or "unknown-site"
    try:
        node = Node.from_message(msg, context)
        site_name = node.site_name
        _settle(msg, node, context)
        return action(msg, node)
    except RunRefused as exc:
        log.warning("refusing the run: %s", exc)
        return reply(msg, site_name, REFUSED, {"refused": 1.0}, str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clean reply
        log.error("fedvox node failed:\n%s", traceback.format_exc())  # full error stays here
        reason = (
            str(exc)
            if isinstance(exc, NodeConfigError)
            else f"{type(exc).__name__} (details in the node's log)"
        )
        return reply(msg, site_name, FAILED, {}, reason)


def _settle(msg: Message, node: Node, context: Context) -> None:
    """Mark what the server did with earlier releases; housekeeping never fails a message."""
    try:
        settle_releases(msg, node, context)
    except Exception:  # noqa: BLE001 - the ledger's own checks run again in the gate
        log.error("fedvox node: settling earlier releases failed:\n%s", traceback.format_exc())


def _open_gate(node: Node, num_train: int) -> tuple[PrivacyGate, dict]:
    """The run's gate at this node and its plan (calibrated once, on the first message);
    PrivacyRefusal if this message's settings are not those the plan was made for."""
    gate = PrivacyGate.open(
        node.state_dir, node.plan.run_uid, node.cfg, node.policy, num_train, node.plan.total_rounds
    )
    statistics = model_registry.get(node.cfg.model).releases_statistic
    terms = node.privacy_terms()
    return gate, gate.plan(num_train, terms, node.planned_steps, statistics)


def _planned(plan: dict, node: Node, epochs: int) -> tuple[float, float, int]:
    """(sigma, q, steps) of `epochs` local epochs under the run's plan."""
    per_epoch = node.steps(int(plan["num_examples_released"])).per_epoch
    return float(plan["noise_multiplier"]), float(plan["sample_rate"]), epochs * per_epoch


def _refuse(msg: Message, node: Node, reason: str, gate: PrivacyGate | None) -> Message:
    """A refusal is an answer, not an error: the round goes on with the other hospitals."""
    log.warning("refusing: %s", reason)
    metrics = {"refused": 1.0}
    if gate is not None:
        eps_run, eps_life = gate.spent()
        metrics.update(
            {"epsilon-run": eps_run, "epsilon-lifetime": eps_life, "delta": gate.budget.delta}
        )
    return reply(msg, node.site_name, REFUSED, metrics, reason)


# -- train --------------------------------------------------------------------------------


def _train(msg: Message, node: Node) -> Message:
    t0 = time.perf_counter()
    data = node.load("train")
    t1 = time.perf_counter()  # compute-s: everything after loading (accounting included)
    metrics = {"data-s": t1 - t0, "refused": 0.0}
    if not node.cfg.dp:
        return _train_without_dp(msg, node, data, metrics, t1)
    gate = None
    try:
        gate, plan = _open_gate(node, len(data))
        planned = _planned(plan, node, node.cfg.local_epochs)
        model = node.global_model(msg, data)
        ensure_statistics(gate, plan, model, data.images)  # once per run (filterbank-3d)
        path = node.release_path(TRAIN)
        settings = node.round_training(int(plan["num_examples_released"]))

        def compute() -> tuple[dict, list, str]:
            with persisted(node.state_dir / "cache" / FEATURES_FILE):
                result = local_sgd(
                    model,
                    data.images,
                    data.labels,
                    settings,
                    planned[0],
                    node.round_loss(data.spec),
                )
            node.remember(model)
            state = unwrap(model).state_dict()
            # Kept until the next round, so a lost reply can be sent again at no cost.
            atomic_write(path, lambda f: torch.save(state, f))
            return {}, result.history, fingerprint(state)

        spent = gate.spend(node.plan.global_round, TRAIN, planned, compute)
        if spent.repeated:  # this round was released before: the very same update again
            model.load_state_dict(node.load_release(path, spent.digest))
    except PrivacyRefusal as exc:
        return _refuse(msg, node, str(exc), gate)
    metrics.update(
        {
            "num-examples": float(plan["num_examples_released"]),  # the noisy, planned count
            "epsilon-run": spent.epsilon_run,
            "epsilon-lifetime": spent.epsilon_lifetime,
            "delta": gate.budget.delta,
            "noise-multiplier": planned[0],
            "compute-s": time.perf_counter() - t1,
        }
    )
    return reply(msg, node.site_name, OK, metrics, arrays=to_record(model), release=spent.digest)


def _train_without_dp(
    msg: Message, node: Node, data: SiteData, metrics: dict, t1: float
) -> Message:
    """One round WITHOUT differential privacy (run config dp=false): no ledger entry, and
    the reply says epsilon = inf so nobody mistakes the result for a private one."""
    # The benchmarks' non-private reference. The server's run config alone cannot switch a
    # hospital's privacy off: only simulated hospitals or an explicit node opt-in comply.
    if not node.policy.may_train_without_dp:
        return _refuse(msg, node, NO_DP_REFUSAL, None)
    model = node.global_model(msg, data)
    ensure_statistics(None, None, model, data.images)
    local_sgd(
        model,
        data.images,
        data.labels,
        node.round_training(),
        None,
        node.round_loss(data.spec),
    )
    node.remember(model)
    metrics.update(
        {
            "num-examples": len(data),  # dp=false: nothing here is private anyway
            "epsilon-run": math.inf,
            "epsilon-lifetime": math.inf,
            "compute-s": time.perf_counter() - t1,
        }
    )
    return reply(msg, node.site_name, OK, metrics, arrays=to_record(model))


# -- evaluate -----------------------------------------------------------------------------


def _evaluate(msg: Message, node: Node) -> Message:
    t0 = time.perf_counter()
    val = node.load("val")
    t1 = time.perf_counter()
    model = node.global_model(msg, val)
    return _release_about(msg, node, model, val, EVALUATE, {"data-s": t1 - t0}, t1)


def _release_about(
    msg: Message,
    node: Node,
    model: torch.nn.Module,
    val: SiteData,
    phase: str,
    metrics: dict,
    t1: float,
) -> Message:
    """One DP release of counts about `model` on the validation part, through the gate."""

    def compute(noise: float) -> tuple[dict, str]:
        evaluation = task_for(val.spec).evaluate(model, val.images, val.labels)
        counts = release(evaluation.logits, val.labels, evaluation.per_case, noise=noise)
        return counts, hashlib.sha256(json.dumps(counts, sort_keys=True).encode()).hexdigest()

    digest = ""
    if not node.cfg.dp:  # the epsilon = inf reference run: nothing private, no noise either
        if not node.policy.may_train_without_dp:
            return _refuse(msg, node, NO_DP_REFUSAL, None)
        counts, _ = compute(0.0)
        metrics.update({**counts, "epsilon-run": math.inf, "epsilon-lifetime": math.inf})
        metrics["release-noise"] = 0.0
    else:
        gate = None
        try:
            gate, plan = _open_gate(node, len(node.load("train")))
            entry = release_entry(plan)

            def spend() -> tuple[dict, list, str]:
                counts, digest = compute(entry[0])
                return counts, [entry], digest

            spent = gate.spend(node.plan.global_round, phase, entry, spend)
        except PrivacyRefusal as exc:
            return _refuse(msg, node, str(exc), gate)
        metrics.update(spent.result)
        digest = spent.digest
        metrics.update(
            {
                "epsilon-run": spent.epsilon_run,
                "epsilon-lifetime": spent.epsilon_lifetime,
                "delta": gate.budget.delta,
                "release-noise": entry[0],
            }
        )
    metrics["compute-s"] = time.perf_counter() - t1
    return reply(msg, node.site_name, OK, metrics, release=digest)


# -- fine-tune ----------------------------------------------------------------------------


def _finetune(msg: Message, node: Node) -> Message:
    """Local fine-tuning of the run's final global model for this site (finetune-epochs > 0).

    Under DP it trains with the run's noise multiplier; its steps were part of the run's
    privacy plan from round 1 (each round's noise was calibrated for them), so the run's
    epsilon still ends at its target. The fine-tuned model stays on the node
    (`Node.personalised_model_path`); one validation release about it leaves. A re-sent
    message reuses the saved model and the earlier release: it spends nothing more.
    """
    t0 = time.perf_counter()
    if node.cfg.finetune_epochs == 0:
        return _refuse(msg, node, "finetune-epochs is 0 in this run's config", None)
    if node.plan.global_round != node.plan.total_rounds:
        reason = "fine-tuning comes once, after the run's last planned round"
        return _refuse(msg, node, reason, None)
    data, val = node.load("train"), node.load("val")
    t1 = time.perf_counter()
    model = node.global_model(msg, val)
    try:
        _finetune_model(node, model, data)
    except PrivacyRefusal as exc:
        return _refuse(msg, node, str(exc), None)
    metrics = {"data-s": t1 - t0}
    return _release_about(msg, node, model, val, FINETUNE_EVALUATE, metrics, t1)


def _finetune_model(node: Node, model: torch.nn.Module, data: SiteData) -> None:
    """Train `model` in place for finetune-epochs (DP through the gate) and keep it here."""
    settings = LocalTraining.from_config(node.cfg, epochs=node.cfg.finetune_epochs, progress=1.0)
    path = node.personalised_model_path()
    loss_fn = task_for(data.spec).loss_fn(node.cfg.structure_weight, progress=1.0)
    if not node.cfg.dp:
        if not node.policy.may_train_without_dp:
            raise PrivacyRefusal(NO_DP_REFUSAL)
        local_sgd(model, data.images, data.labels, settings, None, loss_fn)
        atomic_write(path, lambda f: torch.save(model.state_dict(), f))
        return
    gate, plan = _open_gate(node, len(data))
    planned = _planned(plan, node, node.cfg.finetune_epochs)
    settings = replace(settings, planned_examples=int(plan["num_examples_released"]))

    def compute() -> tuple[dict, list, str]:
        result = local_sgd(model, data.images, data.labels, settings, planned[0], loss_fn)
        state = unwrap(model).state_dict()
        atomic_write(path, lambda f: torch.save(state, f))  # never sent anywhere
        return {}, result.history, fingerprint(state)

    spent = gate.spend(node.plan.global_round, FINETUNE, planned, compute)
    if spent.repeated:
        model.load_state_dict(node.load_release(path, spent.digest))
