"""`fedvox audit privacy`: an empirical lower bound on a node's epsilon, next to its claim.

One simulated hospital trains exactly as its node would, round after round: the same `Node`
(steps, learning-rate schedule, model), the same `PrivacyGate` (plan, calibration, reservation,
release) on a scratch ledger, and the same `client.train.local_sgd` with Opacus + fast DP. The
handler `client.app._train` is those calls in that order; the harness repeats them instead of
calling the handler because it needs the one keyword the handler never passes (`private=`,
the canaries' way in) and because the fault switches must not exist on a node's path.

Into that training go m gradient canaries (simulations/audit/canaries.py), each in the
training set with probability 1/2. The adversary is the curious server of docs/privacy.md at
its strongest: it sees every round's update of the node and scores each canary by its weight's
movement. The scores give Steinke et al.'s one-run lower bound on epsilon
(simulations/audit/stats.py), reported beside the epsilon the node's ledger claims.

Each canary owns one weight that has a per-sample gradient of its own, and how many a model has
depends on the recipe (the epsilon-1 head is narrower) and the image size (fast DP ghost-norms
layers with small maps). So m is counted, not assumed: one DP step of the round's training on a
copy of the model, stopped at its clipping, lists those weights; without `--canaries` the audit
uses one canary per weight (at most 1000), and asking for more is refused before any training.

A bound above the claim means the code that ran is not as private as it says. A bound below it
proves nothing by itself: the bound can never exceed `ceiling_epsilon` (every guess right), so
claims above that ceiling cannot be refuted by this many canaries.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from common.config import RunConfig
from common.files import atomic_write_text
from simulations.audit.faults import FAULTS, NONE, WRONG_SAMPLE_RATE

THREAT_MODEL = (
    "white-box curious server: sees every round's weight update of the node (and chooses the "
    "weights it starts from); canaries are worst-case examples with a Dirac gradient of "
    "100 x max-grad-norm, each in the training set with probability 1/2"
)
METHOD = "one-run audit (Steinke, Nasr, Jagielski 2023) with gradient canaries (Nasr et al. 2023)"


# Canaries when none are asked for: as many as the audited model has weights for, up to this.
MAX_DEFAULT_CANARIES = 1000


class CanaryCountError(ValueError):
    """The canaries asked for do not fit the audited model (a bad setting, not a failure)."""


@dataclass(frozen=True)
class AuditSettings:
    canaries: int | None = None  # None: fit the model (`canary_count`)
    confidence: float = 0.95
    seed: int = 0
    # Test-only: a deliberate DP fault the audit must detect (simulations/audit/canaries.py).
    # Not a run-config key and not reachable from a node: only this harness passes it.
    fault: str = NONE


def audit_privacy(site: Path, cfg: RunConfig, settings: AuditSettings, workdir: Path) -> dict:
    """Train `site` as its node would, with canaries in; the audit's result as a dict."""
    import torch

    from common.weights import unwrap
    from simulations.audit.canaries import Canaries

    if settings.fault not in FAULTS:
        raise ValueError(f"unknown fault {settings.fault!r}")
    started, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(settings.seed)
    cfg = for_site(cfg, site)
    node = _node(site, cfg, workdir)
    data = node.load("train")
    model = node.build_model(data)
    state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
    available = sum(size for _, size in _canary_weights(node, data, model))
    count = canary_count(settings.canaries, available)
    canaries = Canaries(count, cfg.num_server_rounds, settings.seed)
    extra_images, extra_labels = canaries.examples(data.images[0], data.labels[0])
    images = torch.cat([data.images, extra_images])
    labels = torch.cat([data.labels, extra_labels])
    run = {}
    for round_ in range(1, cfg.num_server_rounds + 1):
        node.plan = replace(node.plan, server_round=round_)
        after, run = _round(node, data, images, labels, state, canaries, settings.fault)
        canaries.observe(round_, state, after)  # the server's view: this round's update
        state = after
    result = _statistics(canaries, cfg.target_delta, settings.confidence)
    return {
        "claimed_epsilon": run["epsilon_run"],
        **result,
        "confidence": settings.confidence,
        "canaries": count,
        "canaries_asked": settings.canaries,  # null: as many as the model has weights for
        "canary_weights": available,
        "threat_model": THREAT_MODEL,
        "method": METHOD,
        "target_epsilon": cfg.target_epsilon,
        "delta": cfg.target_delta,
        "flagged": result["lower_bound_epsilon"] > run["epsilon_run"],
        "fault": settings.fault,
        "site": site.name,
        "training_cases": len(data),
        "rounds": cfg.num_server_rounds,
        "noise_multiplier": run["sigma"],
        "accountant_sample_rate": run["q"],
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_s": round(time.process_time() - cpu, 1),  # the machine is shared: CPU time too
    }


def canary_count(asked: int | None, available: int) -> int:
    """The canaries to use: `asked`, or as many as the model has `available` weights for (each
    canary owns one weight with a per-sample gradient), at most MAX_DEFAULT_CANARIES."""
    why = "one canary per weight with a per-sample gradient of its own"
    if asked is None:
        if available < 2:
            raise CanaryCountError(f"this model has room for {available} canaries ({why}), not 2")
        return min(MAX_DEFAULT_CANARIES, available)
    if asked < 2:
        raise CanaryCountError(f"--canaries {asked}: an audit needs at least 2")
    if asked > available:
        raise CanaryCountError(f"--canaries {asked}: at most {available} for this model ({why})")
    return asked


def _canary_weights(node, data, model) -> list[tuple[str, int]]:
    """The weights a canary can own: one DP step of the round's training on a copy of `model`
    (a few real cases, all in the batch), stopped at its clipping."""
    import copy

    from client.train import local_sgd
    from simulations.audit.canaries import canary_weights

    k = min(len(data), 4)
    training = replace(node.round_training(), epochs=1, batch_size=k)  # q = 1: never empty

    def train(private) -> None:
        images, labels, loss = data.images[:k], data.labels[:k], node.round_loss(data.spec)
        local_sgd(copy.deepcopy(model), images, labels, training, 1.0, loss, private=private)

    return canary_weights(train)


def for_site(cfg: RunConfig, site: Path) -> RunConfig:
    """`cfg` with its "auto" keys filled as a server would for this site's data (its recipe)."""
    from common.site import read_spec

    if cfg.is_resolved:
        return cfg
    dataset = read_spec(site)
    return cfg.resolved(dataset.task, dataset.spatial_dims)


def _node(site: Path, cfg: RunConfig, workdir: Path):
    """A simulated node for `site` with a scratch state dir: the audit never touches the
    hospital's real ledger."""
    from flwr.app import RecordDict

    from client.node import Node
    from common.config import NodePolicy
    from common.protocol import RoundPlan

    cfg = for_site(cfg, site)
    plan = RoundPlan("audit", f"audit-{uuid.uuid4().hex[:8]}", cfg.planned_rounds)
    policy = NodePolicy(partition_id=0, num_partitions=1)
    return Node(cfg, policy, plan, site, site.name, workdir / "state", RecordDict())


def _round(node, data, images, labels, state: dict, canaries, fault: str) -> tuple[dict, dict]:
    """One training round, call for call as client/app.py `_train` makes it."""
    from client.gate import TRAIN, PrivacyGate
    from client.train import local_sgd
    from common.weights import fingerprint, unwrap

    n = len(labels)
    gate = PrivacyGate.open(
        node.state_dir, node.plan.run_uid, node.cfg, node.policy, n, node.plan.total_rounds
    )

    def steps_for(count: int) -> tuple[float, int]:
        q, planned = node.planned_steps(count)
        if fault == WRONG_SAMPLE_RATE:  # the accountant is told q / B where the loader samples q
            q = q / node.cfg.batch_size
        return q, planned

    plan = gate.plan(n, node.privacy_terms(), steps_for)
    sigma, q = float(plan["noise_multiplier"]), float(plan["sample_rate"])
    released = int(plan["num_examples_released"])
    model = node.build_model(data)
    unwrap(model).load_state_dict(state)

    def compute() -> tuple[dict, list, str]:
        result = local_sgd(
            model, images, labels, node.round_training(released), sigma,
            node.round_loss(data.spec),
            private=canaries.private(node.plan.global_round, fault),
        )  # fmt: skip
        history = result.history
        if fault == WRONG_SAMPLE_RATE:
            history = [(s, q, k) for s, _, k in history]
        return {}, history, fingerprint(unwrap(model).state_dict())

    per_round = node.steps(released).per_round
    spent = gate.spend(node.plan.global_round, TRAIN, (sigma, q, per_round), compute)
    canaries.close()
    after = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
    return after, {"epsilon_run": spent.epsilon_run, "sigma": sigma, "q": q}


def _statistics(canaries, delta: float, confidence: float) -> dict:
    from simulations.audit.stats import attack_metrics, one_run_ceiling, one_run_epsilon

    members, scores = canaries.members, canaries.scores
    inside, outside = scores[members], scores[~members]
    return {
        "lower_bound_epsilon": one_run_epsilon(inside, outside, delta, confidence),
        "ceiling_epsilon": one_run_ceiling(len(inside), len(outside), delta, confidence),
        "canaries_in": int(members.sum()),
        "canary_attack_auc": attack_metrics(inside, outside)["attack_auc"],
    }


# ------------------------------------------------------------------------------ command line


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--data, -c, --threads, --out: what both audit commands take."""
    parser.add_argument(
        "--data", type=Path, default=None, help="a hospital folder (default: demo hospital-1)"
    )
    parser.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        help='run-config overrides, e.g. -c "target-epsilon=1" (repeatable)',
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, required=True, help="JSON result")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument(
        "--canaries",
        type=int,
        default=None,
        help="gradient canaries (m; default: one per weight with a per-sample gradient of its "
        f"own, at most {MAX_DEFAULT_CANARIES})",
    )
    parser.add_argument("--confidence", type=float, default=0.95, help="of the lower bound")
    parser.add_argument("--seed", type=int, default=0, help="canaries, model init, noise")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(max(1, args.threads))
    cfg, overrides = audit_config(args.run_config)
    site = args.data.resolve() if args.data else demo_site(cfg)
    settings = AuditSettings(args.canaries, args.confidence, args.seed)
    with tempfile.TemporaryDirectory(prefix="fedvox-audit-") as tmp:
        try:
            result = audit_privacy(site, cfg, settings, Path(tmp))
        except CanaryCountError as e:
            print(f"fedvox audit privacy: error: {e}", file=sys.stderr)
            return 2
    result.update(run_config=overrides, **provenance())
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    verdict = "ABOVE the claim: not private as claimed" if result["flagged"] else "below the claim"
    print(
        f"[audit privacy] claimed epsilon {result['claimed_epsilon']:.3f}, audited lower bound "
        f"{result['lower_bound_epsilon']:.3f} ({verdict}; ceiling {result['ceiling_epsilon']:.2f}"
        f" with {result['canaries']} canaries, {result['confidence']:.0%} confidence), "
        f"{result['wall_s']:.0f} s -> {args.out}"
    )
    return 1 if result["flagged"] else 0


def audit_config(texts: list[str]) -> tuple[RunConfig, dict]:
    """The project's run config with `-c` overrides (checked like the apps check it)."""
    from common.config import ConfigError
    from simulations.benchmarks.utility import default_run_config, parse_overrides

    overrides: dict = {}
    for text in texts:
        overrides.update(parse_overrides(text))
    try:
        return RunConfig.parse({**default_run_config(), **overrides}), overrides
    except ConfigError as e:
        raise SystemExit(f"-c/--run-config: {e}") from None


def demo_site(cfg: RunConfig) -> Path:
    """Hospital 1 of the demo partition (prepared from the vendored PneumoniaMNIST)."""
    from common.datasets import ensure_demo_data
    from common.paths import demo_data_dir, list_sites

    data = cfg.path("data-dir") or ensure_demo_data(
        demo_data_dir(cfg.demo_hospitals, cfg.demo_alpha, cfg.seed),
        cfg.demo_hospitals,
        cfg.demo_alpha,
        cfg.seed,
    )
    return list_sites(data)[0]


def provenance() -> dict:
    from server.report_data import environment

    return {"machine": environment(), "date": dt.date.today().isoformat()}
