"""One hospital node as a message sees it: its config, its data, its model, its state.

`Node.from_message(msg, context)` answers, once per message: which run config (parsed into
`RunConfig`), which node policy (`NodePolicy`), which round (`RoundPlan`), which hospital
folder and which state dir (ledger, audit log, caches). In simulation node i serves
`<data-dir>/hospital-<i+1>`; in deployment the hospital's own node config names its folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from flwr.app import Context, Message, RecordDict

from client.train import LocalTraining, scheduled_learning_rate, steps_per_epoch
from common.config import ConfigError, NodePolicy, RunConfig
from common.paths import default_output_dir, demo_data_dir, list_sites
from common.protocol import ARRAYS, RoundPlan
from common.site import SiteData, load_site
from common.tasks import ModelSpec, build_task_model
from common.weights import keep_local, load_record, norm_parameter_names, restore_local

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
            cfg = RunConfig.parse(context.run_config)
            policy = NodePolicy.parse(context.node_config)
        except ConfigError as exc:
            raise NodeConfigError(str(exc)) from None
        plan = RoundPlan.from_message(msg)
        if plan.total_rounds == 0:  # a message from an older server: plan for this invocation
            plan = replace(plan, total_rounds=cfg.planned_rounds)
        site, state_dir = _site_and_state(cfg, policy, plan)
        state_dir.mkdir(parents=True, exist_ok=True)
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
    def round_training(self) -> LocalTraining:
        """This round's local training: the run's settings at the scheduled learning rate."""
        rate = scheduled_learning_rate(
            self.cfg.learning_rate,
            self.cfg.learning_rate_schedule,
            self.plan.global_round,
            self.plan.total_rounds,
        )
        return LocalTraining.from_config(
            self.cfg, learning_rate=rate, proximal_mu=self.plan.proximal_mu
        )

    def steps(self, num_examples: int) -> Steps:
        """DP-SGD steps of this site: per epoch, per round, and all the run may take."""
        per_epoch = steps_per_epoch(num_examples, self.cfg.batch_size)
        per_round = self.cfg.local_epochs * per_epoch
        planned = self.plan.total_rounds * per_round + self.cfg.finetune_epochs * per_epoch
        return Steps(1.0 / per_epoch, per_epoch, per_round, planned)

    def personalised_model_path(self) -> Path:
        """Where this node keeps its fine-tuned copy of the run's final model (never sent)."""
        name = f"{self.plan.run_uid}-round{self.plan.global_round}.pt"
        return self.state_dir / "personalised" / name


def _site_and_state(cfg: RunConfig, policy: NodePolicy, plan: RoundPlan) -> tuple[Path, Path]:
    """(hospital folder, state dir) of this node."""
    if not policy.simulated:  # Deployment Engine: the hospital's own node config
        for key, value in (("data-dir", policy.data_dir), ("state-dir", policy.state_dir)):
            if not value:
                raise NodeConfigError(
                    f"node config '{key}' is not set (flower-supernode --node-config)"
                )
            if not Path(value).expanduser().is_absolute():
                raise NodeConfigError(f"node config {key}={value!r}: give an absolute path")
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
    if cfg.state_dir:  # persistent ledgers across simulated runs
        return site, Path(cfg.state_dir).expanduser() / site.name
    out = cfg.path("output-dir") or default_output_dir()  # one ledger per run, with its outputs
    return site, out / plan.run_name / "node-state" / site.name
