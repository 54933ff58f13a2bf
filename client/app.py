"""The hospital node: a Flower ClientApp that trains with DP-SGD on local NIfTI data.

Only weights and aggregate metrics leave this node. Anything that could carry a
path, a file name or a case id (data errors, tracebacks) is logged locally and
replaced by a generic reason in the reply.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import audit_mod
from client.ledger import PrivacyLedger
from client.train import TrainResult, scheduled_learning_rate, steps_per_epoch, train_dp
from common.calibration import validation_summary
from common.paths import absolute, default_output_dir, demo_data_dir, list_sites
from common.privacy import Budget, PrivacyRefusal, calibrate_noise_multiplier, resolve_budget
from common.site import SiteData, load_site
from common.tasks import model_options, task_for
from common.weights import keep_local, load_record, norm_parameter_names, restore_local, to_record

log = logging.getLogger("fedvox.client")

# Every message this node handles is appended to <state-dir>/audit.jsonl (deployment).
app = ClientApp(mods=[audit_mod])

# context.state key of the site's own normalisation parameters (run config fedbn = true).
# In memory on the SuperNode: a restarted node starts again from the global ones.
FEDBN_KEY = "fedbn-local-norm"

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


class NodeConfigError(ValueError):
    """A configuration mistake whose message holds only config values: safe to send."""


@dataclass
class Node:
    site: Path
    site_name: str
    state_dir: Path
    run_config: dict
    node_config: dict
    server_config: dict
    state: RecordDict  # context.state: this node's memory across the run's rounds

    @property
    def fedbn(self) -> bool:
        return _flag(self.run_config.get("fedbn", False))

    def global_model(self, msg: Message, data: SiteData) -> torch.nn.Module:
        """The model as the server sent it; with fedbn, this site's own norm parameters."""
        model = self.model(data)
        load_record(model, msg.content.array_records["arrays"])
        if self.fedbn and FEDBN_KEY in self.state.array_records:
            restore_local(model, self.state.array_records[FEDBN_KEY])
        return model

    def remember(self, model: torch.nn.Module) -> None:
        """With fedbn, keep this site's trained norm parameters for its next round."""
        if self.fedbn:
            self.state.array_records[FEDBN_KEY] = keep_local(model, norm_parameter_names(model))

    @property
    def run_uid(self) -> str:
        return str(self.server_config.get("run-uid") or "unnamed-run")

    @property
    def global_round(self) -> int:
        """This round's number over the whole run (a resumed run continues the count)."""
        server = self.server_config
        return int(server.get("server-round", 1)) + int(server.get("round-offset", 0))

    @property
    def total_rounds(self) -> int:
        """The rounds the run's privacy plan and learning-rate schedule are made for."""
        return int(self.server_config.get("total-rounds", self.run_config["num-server-rounds"]))

    @property
    def image_size(self) -> tuple[int, ...] | None:
        size = self.server_config.get("image-size")
        return tuple(int(s) for s in size) if size else None

    def load(self, split: str) -> SiteData:
        return load_site(
            self.site,
            split=split,
            image_size=self.image_size,
            cache_dir=self.state_dir / "cache",
            log=log.info,
        )

    def model(self, data: SiteData) -> torch.nn.Module:
        try:
            return task_for(data.spec).build_model(
                data.spatial_dims,
                data.in_channels,
                data.num_classes,
                image_size=tuple(data.images.shape[2:]),
                **model_options(self.run_config),
            )
        except ValueError as e:  # names the `model` setting and shapes only: safe to send
            raise NodeConfigError(str(e)) from e


def _node(msg: Message, context: Context) -> Node:
    """Which hospital folder this node serves and where it keeps its state."""
    run, node = dict(context.run_config), dict(context.node_config)
    server = dict(msg.content.config_records.get("config", ConfigRecord()))
    run_name = str(server.get("run-name") or f"run-{context.run_id}")
    if "partition-id" in node:  # Flower Simulation Engine: node i serves hospital-(i+1)
        data_dir = (
            absolute(run["data-dir"], "data-dir")
            if run.get("data-dir")
            else demo_data_dir(
                int(run.get("demo-hospitals", 5)),
                float(run.get("demo-alpha", 0.5)),
                int(run.get("seed", 0)),
            )
        )
        sites = list_sites(data_dir)
        if len(sites) != int(node["num-partitions"]):
            raise NodeConfigError(
                f"data-dir has {len(sites)} hospital folders but the simulation has "
                f"{node['num-partitions']} virtual nodes; run with "
                f'--federation-config "num-supernodes={len(sites)}"'
            )
        site = sites[int(node["partition-id"])]
        if run.get("state-dir"):  # persistent ledgers across simulated runs
            state_dir = absolute(run["state-dir"], "state-dir") / site.name
        else:  # one ledger per simulated run, kept with the run's outputs
            out = (
                absolute(run["output-dir"], "output-dir")
                if run.get("output-dir")
                else default_output_dir()
            )
            state_dir = out / run_name / "node-state" / site.name
    else:  # Deployment Engine: the hospital's own node config
        for key in ("data-dir", "state-dir"):
            if not node.get(key):
                raise NodeConfigError(
                    f"node config '{key}' is not set (flower-supernode --node-config)"
                )
        site = absolute(node["data-dir"], "node config data-dir")
        state_dir = absolute(node["state-dir"], "node config state-dir")
    state_dir.mkdir(parents=True, exist_ok=True)
    # The name this node is known by in the server's summary. A real node's folder name
    # could say more than it should, so it is only used for simulated hospitals.
    default_name = site.name if "partition-id" in node else f"node-{context.node_id}"
    name = str(node.get("site-name") or default_name)
    return Node(site, name, state_dir, run, node, server, context.state)


def _optional_float(value) -> float | None:
    return float(value) if value not in (None, "", 0, 0.0) else None


def _status(node_name: str, status: str, reason: str = "") -> ConfigRecord:
    return ConfigRecord({"site": node_name, "status": status, "reason": reason})


def _failed_reply(
    msg: Message, exc: BaseException, site_name: str, keys: tuple[str, ...]
) -> Message:
    # The full error (which may name files) stays in the node's log.
    log.error("fedvox node failed:\n%s", traceback.format_exc())
    metrics = MetricRecord({k: 0.0 for k in keys})
    if isinstance(exc, NodeConfigError):
        reason = str(exc)
    else:
        reason = f"{type(exc).__name__} (details in the node's log)"
    content = RecordDict({"metrics": metrics, "node": _status(site_name, "failed", reason)})
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    site_name = str(context.node_config.get("site-name", "")) or "unknown-site"
    try:
        node = _node(msg, context)
        site_name = node.site_name
        return _train(msg, node)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clean reply
        return _failed_reply(msg, exc, site_name, TRAIN_METRIC_KEYS)


def _train(msg: Message, node: Node) -> Message:
    run = node.run_config
    t0 = time.perf_counter()
    data = node.load("train")
    t1 = time.perf_counter()  # compute-s: everything after loading (accounting included)
    data_s = t1 - t0
    n = len(data)
    epochs, batch = int(run["local-epochs"]), int(run["batch-size"])
    accountant = str(run.get("accountant", "rdp"))
    run_uid, global_round, total_rounds = node.run_uid, node.global_round, node.total_rounds

    ledger = PrivacyLedger.open(node.state_dir, accountant)
    spe = steps_per_epoch(n, batch)
    q = 1.0 / spe
    round_steps = epochs * spe

    def refuse(reason: str, delta: float = math.nan) -> Message:
        log.warning("refusing to train: %s", reason)
        d = delta if not math.isnan(delta) else float(run["target-delta"])
        metrics = {k: 0.0 for k in TRAIN_METRIC_KEYS}
        metrics.update(
            {
                "refused": 1.0,
                "delta": d,
                "epsilon-run": ledger.epsilon(d, run_uid),
                "epsilon-lifetime": ledger.epsilon(d),
            }
        )
        return Message(
            RecordDict(
                {
                    "metrics": MetricRecord(metrics),
                    "node": _status(node.site_name, "refused", reason),
                }
            ),
            reply_to=msg,
        )

    if not _flag(run.get("dp", True)):
        # The benchmarks' non-private reference (epsilon = inf). Only simulated hospitals,
        # or a real node whose own config says `allow-non-dp = true`, ever train without DP:
        # the server's run config alone cannot switch a hospital's privacy off.
        if not non_dp_allowed(node.node_config):
            return refuse(
                "the server asked for training without DP (dp=false); this hospital trains "
                "only with DP (node config allow-non-dp is not set)"
            )
        return _train_plain(msg, node, data)

    try:
        budget = _budget(node, n)
    except PrivacyRefusal as exc:
        return refuse(str(exc))

    # Calibrate once per run, for every step the run may take; later rounds reuse it (the
    # search costs ~0.4 s, which at 5 hospitals was most of a round's federation overhead).
    # The plan covers the local fine-tuning after the last round too (finetune-epochs).
    planned_steps = total_rounds * round_steps + _finetune_epochs(run) * spe
    plan = ledger.runs.get(run_uid) or ledger.plan_run(
        run_uid,
        noise_multiplier=calibrate_noise_multiplier(
            budget.epsilon_run, budget.delta, q, planned_steps, accountant
        ),
        sample_rate=q,
        planned_steps=planned_steps,
        num_examples=n,
        epsilon=budget.epsilon_run,
        delta=budget.delta,
    )
    sigma = float(plan["noise_multiplier"])
    if int(plan["num_examples"]) != n:
        return refuse(
            f"the training set changed during the run ({plan['num_examples']} -> {n} "
            "cases); its privacy calibration no longer holds",
            budget.delta,
        )
    step = [(sigma, q, round_steps)]
    projected_run = ledger.epsilon(budget.delta, run_uid, extra=step)
    projected_life = ledger.epsilon(budget.delta, extra=step)
    slack = 1 + 1e-6
    if projected_life > budget.epsilon_lifetime * slack:
        return refuse(
            f"this round would raise the dataset's lifetime epsilon to "
            f"{projected_life:.2f}, past the hospital's limit {budget.epsilon_lifetime:g}",
            budget.delta,
        )
    if projected_run > budget.epsilon_run * slack:
        return refuse(
            f"this round would raise the run's epsilon to {projected_run:.2f}, past its "
            f"target {budget.epsilon_run:g}",
            budget.delta,
        )

    model, result = _local_training(msg, node, data, sigma)
    # The ledger is on disk before the weights leave the node.
    ledger.record(run_uid, global_round, result.history)
    if result.history != step:  # the projection was for `step`; recompute what was spent
        projected_run = ledger.epsilon(budget.delta, run_uid)
        projected_life = ledger.epsilon(budget.delta)
    metrics = MetricRecord(
        {
            "num-examples": n,
            "train-loss": result.loss,
            "epsilon-run": projected_run,
            "epsilon-lifetime": projected_life,
            "delta": budget.delta,
            "refused": 0.0,
            "noise-multiplier": sigma,
            "sample-rate": q,
            "steps": float(sum(s for _, _, s in result.history)),
            # Where the node's time went (the speed benchmark reads these).
            "data-s": data_s,
            "compute-s": time.perf_counter() - t1,
        }
    )
    return Message(
        RecordDict(
            {"arrays": to_record(model), "metrics": metrics, "node": _status(node.site_name, "ok")}
        ),
        reply_to=msg,
    )


def non_dp_allowed(node_config: dict) -> bool:
    """May this node train without DP when a run asks for it (dp=false)?

    Simulated hospitals (the benchmarks' non-private reference) yes; a real node only when
    its own config says `allow-non-dp = true`.
    """
    return "partition-id" in node_config or _flag(node_config.get("allow-non-dp", False))


def _flag(value) -> bool:
    """A run-config boolean that may arrive as a TOML bool or a string."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value)


def _local_training(
    msg: Message, node: Node, data: SiteData, noise_multiplier: float | None
) -> tuple[torch.nn.Module, TrainResult]:
    """The global model from `msg`, trained on this site (DP unless noise_multiplier is None)."""
    run, server = node.run_config, node.server_config
    try:
        learning_rate = scheduled_learning_rate(
            float(run["learning-rate"]),
            str(run.get("learning-rate-schedule", "constant")),
            node.global_round,
            node.total_rounds,
        )
    except ValueError as exc:  # a run-config mistake: its message holds only config values
        raise NodeConfigError(str(exc)) from None
    model = node.global_model(msg, data)
    result = _fit(
        model,
        node,
        data,
        noise_multiplier,
        epochs=int(run["local-epochs"]),
        learning_rate=learning_rate,
        proximal_mu=float(server.get("proximal-mu", 0.0)),
    )
    node.remember(model)
    return model, result


def _fit(
    model: torch.nn.Module,
    node: Node,
    data: SiteData,
    noise_multiplier: float | None,
    *,
    epochs: int,
    learning_rate: float,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """`train_dp` with the run config's optimiser, clipping and augmentation settings."""
    run = node.run_config
    return train_dp(
        model,
        data.images,
        data.labels,
        epochs=epochs,
        batch_size=int(run["batch-size"]),
        learning_rate=learning_rate,
        noise_multiplier=noise_multiplier,
        max_grad_norm=float(run["max-grad-norm"]),
        accountant=str(run.get("accountant", "rdp")),
        proximal_mu=proximal_mu,
        momentum=float(run.get("momentum", 0.9)),
        loss_fn=task_for(data.spec).loss_fn(),
        augmentation=_flag(run.get("augmentation", False)),
        max_physical_batch=int(run.get("max-physical-batch", 0)),
    )


def _budget(node: Node, num_examples: int) -> Budget:
    """The run's privacy budget at this node: the server's proposal, tightened by the node."""
    run = node.run_config
    return resolve_budget(
        float(run["target-epsilon"]),
        float(run["target-delta"]),
        _optional_float(node.node_config.get("max-epsilon")),
        _optional_float(node.node_config.get("delta")),
        num_examples,
    )


def _finetune_epochs(run: dict) -> int:
    try:
        epochs = int(run.get("finetune-epochs", 0))
    except (TypeError, ValueError):
        raise NodeConfigError(
            f"finetune-epochs={run.get('finetune-epochs')!r}: expected a whole number >= 0"
        ) from None
    if epochs < 0:
        raise NodeConfigError(f"finetune-epochs={epochs}: expected a whole number >= 0")
    return epochs


def personalised_model_path(node: Node, run_uid: str, global_round: int) -> Path:
    """Where a node keeps its fine-tuned copy of a run's final model (never sent anywhere)."""
    return node.state_dir / "personalised" / f"{run_uid}-round{global_round}.pt"


def _finetune(model: torch.nn.Module, node: Node, val: SiteData) -> dict[str, float]:
    """Local fine-tuning of the run's final global model for this site (finetune-epochs > 0).

    Runs once, at the evaluation of the run's last planned round. The fine-tuned model stays
    on the node (`personalised_model_path`); only its metrics on the local validation part
    leave, prefixed "finetuned-", beside the global model's. Under DP it trains with the run's
    noise multiplier and its steps were part of the run's privacy plan from round 1 (each
    round's noise was calibrated for them), so the run's epsilon still ends at its target; the
    ledger records them like a round. A re-sent last evaluation reuses the saved model.
    """
    run = node.run_config
    epochs = _finetune_epochs(run)
    if epochs == 0 or node.global_round != node.total_rounds:
        return {}
    run_uid, global_round = node.run_uid, node.global_round
    path = personalised_model_path(node, run_uid, global_round)
    dp = _flag(run.get("dp", True))
    ledger = PrivacyLedger.open(node.state_dir, str(run.get("accountant", "rdp")))

    def refused(reason: str) -> dict[str, float]:
        log.warning("not fine-tuning the final model: %s", reason)
        return {"finetune-refused": 1.0}

    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        data = node.load("train")
        sigma = None
        if dp:
            plan = ledger.runs.get(run_uid)
            if plan is None or int(plan["num_examples"]) != len(data):
                return refused("this node has no privacy plan for this run's training set")
            try:
                budget = _budget(node, len(data))
            except PrivacyRefusal as exc:
                return refused(str(exc))
            sigma, q = float(plan["noise_multiplier"]), float(plan["sample_rate"])
            step = [(sigma, q, epochs * steps_per_epoch(len(data), int(run["batch-size"])))]
            slack = 1 + 1e-6
            if ledger.epsilon(budget.delta, run_uid, extra=step) > budget.epsilon_run * slack:
                return refused("fine-tuning would take the run past its epsilon")
            if ledger.epsilon(budget.delta, extra=step) > budget.epsilon_lifetime * slack:
                return refused("fine-tuning would take the dataset past its lifetime epsilon")
        elif not non_dp_allowed(node.node_config):
            return refused("this hospital trains only with DP (allow-non-dp is not set)")
        result = _fit(
            model, node, data, sigma, epochs=epochs, learning_rate=float(run["learning-rate"])
        )
        if dp:  # on disk before anything about the fine-tuned model leaves the node
            ledger.record(run_uid, global_round, result.history, phase="finetune")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    metrics = task_for(val.spec).evaluate(model, val.images, val.labels).metrics
    out = {f"finetuned-{k}": float(v) for k, v in metrics.items() if v is not None}
    if dp:
        delta = float(ledger.runs[run_uid]["delta"])
        out["finetuned-epsilon-run"] = ledger.epsilon(delta, run_uid)
    return out


def _train_plain(msg: Message, node: Node, data: SiteData) -> Message:
    """One round WITHOUT differential privacy (run config dp=false): no ledger entry, and
    the reply says epsilon = inf so nobody mistakes the result for a private one."""
    t1 = time.perf_counter()
    model, result = _local_training(msg, node, data, noise_multiplier=None)
    metrics = {k: 0.0 for k in TRAIN_METRIC_KEYS}
    metrics.update(
        {
            "num-examples": len(data),
            "train-loss": result.loss,
            "epsilon-run": math.inf,
            "epsilon-lifetime": math.inf,
            "delta": 0.0,
            "compute-s": time.perf_counter() - t1,
        }
    )
    return Message(
        RecordDict(
            {
                "arrays": to_record(model),
                "metrics": MetricRecord(metrics),
                "node": _status(node.site_name, "ok"),
            }
        ),
        reply_to=msg,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site_name = str(context.node_config.get("site-name", "")) or "unknown-site"
    try:
        node = _node(msg, context)
        site_name = node.site_name
        t0 = time.perf_counter()
        data = node.load("val")
        t1 = time.perf_counter()
        model = node.global_model(msg, data)
        metrics = task_for(data.spec).evaluate(model, data.images, data.labels).metrics
        record = MetricRecord({k: float(v) for k, v in metrics.items() if v is not None})
        record["num-examples"] = len(data)
        # Aggregates (case counts per score bin, loss per temperature) from which the server
        # picks the decision threshold and temperature on validation data; never per-case.
        record.update(validation_summary(model, data.images, data.labels))
        record["data-s"] = t1 - t0
        record["compute-s"] = time.perf_counter() - t1
        # Last: it trains `model` (this round's global model, already evaluated) in place.
        record.update(_finetune(model, node, data))
        return Message(
            RecordDict({"metrics": record, "node": _status(site_name, "ok")}), reply_to=msg
        )
    except Exception as exc:  # noqa: BLE001
        return _failed_reply(msg, exc, site_name, EVAL_METRIC_KEYS)
