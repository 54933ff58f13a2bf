"""One hospital node as a message sees it: its config, its data, its model, its state.

`Node.from_message(msg, context)` answers, once per message: which run config (parsed into
`RunConfig`), which node policy (`NodePolicy`), which round (`RoundPlan`), which hospital
folder and which state dir (ledger, audit log, caches). In simulation node i serves
`<data-dir>/hospital-<i+1>`; in deployment the hospital's own node config names its folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from flwr.app import Context, Message, RecordDict

from client.train import LocalTraining, scheduled_learning_rate, steps_per_epoch
from common.config import ConfigError, NodePolicy, RunConfig
from common.paths import demo_data_dir, fedvox_home, list_sites
from common.privacy import PrivacyRefusal
from common.protocol import ARRAYS, RoundPlan
from common.recipes import AUTO_KEYS
from common.schedule import run_progress
from common.site import SiteData, load_site, read_spec
from common.tasks import ModelSpec, build_task_model, task_for
from common.weights import (
    fingerprint,
    keep_local,
    load_record,
    norm_parameter_names,
    restore_local,
)

log = logging.getLogger("fedvox.client")

# context.state key of the site's own normalisation parameters (run config fedbn = true).
# In memory on the SuperNode: a restarted node starts again from the global ones.
FEDBN_KEY = "fedbn-local-norm"


class Steps(NamedTuple):
    sample_rate: float  # Opacus samples with q = 1 / steps per epoch
    per_epoch: int
    per_round: int
    planned: int  # the whole run's, local fine-tuning included: what sigma is calibrated for


class NodeConfigError(ConfigError):
    """A configuration mistake whose message holds only config values: safe to send."""


class RunRefused(ConfigError):
    """The server's run config is not one this node accepts (the reply says refused)."""


@dataclass
class Node:
    cfg: RunConfig
    policy: NodePolicy
    plan: RoundPlan
    site: Path
    site_name: str
    state_dir: Path
    state: RecordDict  # context.state: this node's memory across the run's rounds

    @classmethod
    def from_message(cls, msg: Message, context: Context) -> Node:
        try:
            policy = NodePolicy.parse(context.node_config)
        except ConfigError as exc:
            raise NodeConfigError(str(exc)) from None
        try:
            cfg = RunConfig.parse(context.run_config)
        except ConfigError as exc:  # the server's config: this node refuses such a run
            raise RunRefused(str(exc)) from None
        plan = RoundPlan.from_message(msg)
        foreign = sorted(set(plan.recipe) - set(AUTO_KEYS))
        if foreign:  # a server sends only the "auto" keys it resolved, never anything else
            raise RunRefused(f"the message's recipe sets keys that are not recipe keys: {foreign}")
        site, state_dir = _site_and_state(cfg, policy)
        try:  # the server's resolved recipe, else (an older server) this site's own
            cfg = cfg.with_values(plan.recipe)
            if not cfg.is_resolved:
                dataset = read_spec(site)
                cfg = cfg.resolved(dataset.task, dataset.spatial_dims)
        except ConfigError as exc:
            raise RunRefused(str(exc)) from None
        if plan.total_rounds == 0:  # a message from an older server: plan for this invocation
            plan = replace(plan, total_rounds=cfg.planned_rounds)
        state_dir.mkdir(parents=True, exist_ok=True)
        if policy.simulated:  # a simulated hospital's own policy, if it wrote one
            policy = _simulated_policy(policy, state_dir)
        # A real node's folder name could say more than it should: only simulated hospitals
        # are named after theirs.
        default_name = site.name if policy.simulated else f"node-{context.node_id}"
        name = policy.site_name or default_name
        return cls(cfg, policy, plan, site, name, state_dir, context.state)

    # -- data and model -------------------------------------------------------------------
    def load(self, split: str) -> SiteData:
        return load_site(
            self.site,
            split=split,
            image_size=self.plan.image_size or None,
            cache_dir=self.state_dir / "cache",
            log=log.info,
        )

    def build_model(self, data: SiteData) -> torch.nn.Module:
        try:
            return build_task_model(ModelSpec.of(data, self.cfg.model_options))
        except ValueError as e:  # names the `model` setting and shapes only: safe to send
            raise NodeConfigError(str(e)) from e

    def global_model(self, msg: Message, data: SiteData) -> torch.nn.Module:
        """The model as the server sent it; with fedbn, this site's own norm parameters."""
        model = self.build_model(data)
        load_record(model, msg.content.array_records[ARRAYS])
        if self.cfg.fedbn and FEDBN_KEY in self.state.array_records:
            restore_local(model, self.state.array_records[FEDBN_KEY])
        return model

    def remember(self, model: torch.nn.Module) -> None:
        """With fedbn, keep this site's trained norm parameters for its next round."""
        if self.cfg.fedbn:
            self.state.array_records[FEDBN_KEY] = keep_local(model, norm_parameter_names(model))

    # -- training settings ----------------------------------------------------------------
    def round_training(self, planned_examples: int = 0) -> LocalTraining:
        """This round's local training: the run's settings at the scheduled learning rate;
        `planned_examples` is the count the run's DP sampling was planned for (its plan's)."""
        rate = scheduled_learning_rate(
            self.cfg.learning_rate,
            self.cfg.learning_rate_schedule,
            self.plan.global_round,
            self.plan.total_rounds,
        )
        return LocalTraining.from_config(
            self.cfg,
            learning_rate=rate,
            proximal_mu=self.plan.proximal_mu,
            progress=self.progress,
            planned_examples=planned_examples,
        )

    @property
    def progress(self) -> float:
        """How far the run is at this round (common/schedule.py): what decays over it reads it."""
        return run_progress(self.plan.global_round, self.plan.total_rounds)

    def round_loss(self, spec: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """This round's training loss for data of `spec` (segmentation: the structure weight
        at the run's progress)."""
        return task_for(spec).loss_fn(self.cfg.structure_weight, self.progress)

    def steps(self, num_examples: int) -> Steps:
        """DP-SGD steps for `num_examples` cases (a node passes its released count): per
        epoch, per round, and all the run may take."""
        per_epoch = steps_per_epoch(num_examples, self.cfg.batch_size)
        per_round = self.cfg.local_epochs * per_epoch
        planned = self.plan.total_rounds * per_round + self.cfg.finetune_epochs * per_epoch
        return Steps(1.0 / per_epoch, per_epoch, per_round, planned)

    def planned_steps(self, num_examples: int) -> tuple[float, int]:
        """(sample rate, the run's planned steps) for a case count: the privacy plan's input."""
        steps = self.steps(num_examples)
        return steps.sample_rate, steps.planned

    def privacy_terms(self) -> dict[str, Any]:
        """The settings this message asks for that the run's epsilon depends on. The run's
        plan records them at its first message; a later message asking for others is refused
        (client/gate.py), so no message can stretch the budget the node agreed to."""
        c = self.cfg
        return {
            "dp": c.dp,
            "batch-size": c.batch_size,
            "local-epochs": c.local_epochs,
            "total-rounds": self.plan.total_rounds,
            "finetune-epochs": c.finetune_epochs,
            "local-evaluation": c.local_evaluation,
            "target-epsilon": c.target_epsilon,
            "target-delta": c.target_delta,
            "max-grad-norm": c.max_grad_norm,
            "model": c.model,
        }

    def release_path(self, phase: str) -> Path:
        """Where this round's released update is kept (a lost reply is sent again from it)."""
        return release_file(self.state_dir, self.plan.run_uid, self.plan.global_round, phase)

    def load_release(self, path: Path, digest: str) -> dict[str, torch.Tensor]:
        """A kept update, checked against the hash the ledger recorded when it left."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError):
            state = None
        if state is None or fingerprint(state) != digest:
            raise PrivacyRefusal(
                "this round's update was released before and is no longer kept here; "
                "training it again would spend epsilon twice"
            )
        return state

    def personalised_model_path(self) -> Path:
        """Where this node keeps its fine-tuned copy of the run's final model (never sent)."""
        name = f"{self.plan.run_uid}-round{self.plan.global_round}.pt"
        return self.state_dir / "personalised" / name


def release_file(state_dir: Path, run_uid: str, global_round: int, phase: str) -> Path:
    """`<state-dir>/releases/<run>-roundNNN-<phase>.pt`: a released update, kept until the
    server says what became of it (client/releases.py)."""
    return state_dir / "releases" / f"{run_uid}-round{global_round:03d}-{phase}.pt"


def _site_and_state(cfg: RunConfig, policy: NodePolicy) -> tuple[Path, Path]:
    """(hospital folder, state dir) of this node.

    The state dir (ledger, audit log, caches) belongs to the dataset, never to a run's output
    folder: a resumed run, or a second run at the same time, finds the same ledger. In
    simulation it is `<state-dir>/<site>` when the run sets one, else a folder under
    `$FEDVOX_HOME/node-state` named after the site's content.
    """
    if not policy.simulated:  # Deployment Engine: the hospital's own node config
        for key, value in (("data-dir", policy.data_dir), ("state-dir", policy.state_dir)):
            if not value:
                raise NodeConfigError(
                    f"node config '{key}' is not set (flower-supernode --node-config)"
                )
            if not Path(value).expanduser().is_absolute():
                raise NodeConfigError(f"node config '{key}' must be an absolute path")
        return Path(policy.data_dir).expanduser(), Path(policy.state_dir).expanduser()
    data_dir = cfg.path("data-dir") or demo_data_dir(cfg.demo_hospitals, cfg.demo_alpha, cfg.seed)
    sites = list_sites(data_dir)
    if len(sites) != policy.num_partitions:
        raise NodeConfigError(
            f"data-dir has {len(sites)} hospital folders but the simulation has "
            f"{policy.num_partitions} virtual nodes; run with "
            f'--federation-config "num-supernodes={len(sites)}"'
        )
    site = sites[int(policy.partition_id)]
    if cfg.state_dir:
        return site, Path(cfg.state_dir).expanduser() / site.name
    return site, fedvox_home() / "node-state" / f"{site.name}-{site_key(site)}"


def site_key(site: Path) -> str:
    """A short fingerprint of a site's content (its labels, its dataset.json, its files'
    names and sizes): the same data has the same key wherever it is served from."""
    h = hashlib.sha256()
    for name in ("labels.csv", "dataset.json"):
        path = site / name
        h.update(path.read_bytes() if path.is_file() else b"-")
    for sub in ("images", "masks"):
        folder = site / sub
        if folder.is_dir():
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                h.update(f"{sub}/{entry.name}:{entry.stat().st_size};".encode())
    return h.hexdigest()[:12]


POLICY_FILE = "node.toml"


def _simulated_policy(policy: NodePolicy, state_dir: Path) -> NodePolicy:
    """A simulated hospital's policy: `node.toml` in its state dir (the same keys as a
    deployed node's config), else the documented simulation defaults."""
    path = state_dir / POLICY_FILE
    if not path.is_file():
        return policy
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        log.error("%s is unreadable: %s", path, exc)  # the details (a path) stay here
        raise NodeConfigError(f"this hospital's {POLICY_FILE} is unreadable") from None
    keys = ("partition-id", "num-partitions")
    return NodePolicy.parse({**raw, **{k: getattr(policy, k.replace("-", "_")) for k in keys}})
