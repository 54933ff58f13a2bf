"""`fedvox budget`: how many runs fit in a hospital's lifetime `max-epsilon`, by the accountant.

A node's ledger composes every release the dataset ever paid for with the node's accountant
(RDP or PRV), not by adding epsilons: three runs at epsilon 8 spend less than 24. This plans
one run exactly as a node does (client/gate.py `PrivacyGate.plan`: the DP-SGD noise calibrated
for every step the run may take plus its planned validation releases and its training-set
count) and composes 1, 2, 3, ... copies of it until the next one would pass `max-epsilon`.

    fedvox budget --node-config /etc/fedvox/node.toml --cases 800 --batch-size 32 \
        --rounds 10 --target-epsilon 8

It assumes every run has this shape and spends all it planned (a run that stops early, or
evaluates less, spends less). A node plans from its DP-released case count, within a few
dozen of `--cases`: the answer is for a count of `--cases`. Exit code 2 on a bad setting, naming it.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

MAX_RUNS = 10_000  # a table longer than this says nothing new


@dataclass(frozen=True)
class Fit:
    runs: int  # whole runs of this shape that fit
    noise_multiplier: float  # one run's DP-SGD noise, as a node calibrates it
    history: tuple[tuple[float, float, int], ...]  # one run, in the accountant's terms
    lifetime: tuple[float, ...]  # lifetime epsilon after 1, 2, ..., runs + 1 runs


def run_history(
    target_epsilon: float,
    delta: float,
    accountant: str,
    max_evaluations: int,
    cases: int,
    batch_size: int,
    rounds: int,
    local_epochs: int = 1,
) -> tuple[tuple[float, float, int], ...]:
    """One run's releases as the node's ledger records them (all of them spent)."""
    from client.gate import COUNT_FACTOR
    from client.train import steps_per_epoch
    from common.privacy import calibrate_noise_multiplier, release_noise

    per_epoch = steps_per_epoch(cases, batch_size)
    steps = rounds * local_epochs * per_epoch
    noise = release_noise(target_epsilon, max_evaluations)
    releases = ((noise, 1.0, max_evaluations), (COUNT_FACTOR * noise, 1.0, 1))
    sigma = calibrate_noise_multiplier(
        target_epsilon, delta, 1.0 / per_epoch, steps, accountant, fixed=releases
    )
    return ((sigma, 1.0 / per_epoch, steps), *releases)


def runs_that_fit(max_epsilon: float, delta: float, accountant: str, **run: int) -> Fit:
    """Whole runs of one shape (`run_history`'s keywords) within `max_epsilon`."""
    from client.gate import SLACK
    from common.privacy import compute_epsilon

    history = run_history(delta=delta, accountant=accountant, **run)
    lifetime: list[float] = []
    while len(lifetime) < MAX_RUNS:
        k = len(lifetime) + 1
        lifetime.append(compute_epsilon([(s, q, n * k) for s, q, n in history], delta, accountant))
        if lifetime[-1] > max_epsilon * SLACK:
            break
    fits = sum(1 for e in lifetime if e <= max_epsilon * SLACK)
    return Fit(fits, history[0][0], history, tuple(lifetime))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node-config", type=Path, help="a node.toml: its policy keys")
    parser.add_argument("--max-epsilon", type=float, help="overrides the node config's")
    parser.add_argument("--delta", type=float, help="overrides the node config's")
    parser.add_argument("--accountant", help="rdp | prv; overrides the node config's")
    parser.add_argument("--max-evaluations", type=int, help="overrides the node config's")
    parser.add_argument("--target-epsilon", type=float, default=8.0, help="each run's (8)")
    parser.add_argument("--cases", type=int, required=True, help="the hospital's training cases")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True, help="each run's planned rounds")
    parser.add_argument("--local-epochs", type=int, default=1)


def _policy(args: argparse.Namespace) -> dict[str, object]:
    """The node policy from --node-config, overridden by the flags; ConfigError names a key."""
    from flwr.common.config import parse_config_args

    from common.config import ConfigError, NodePolicy

    raw: dict[str, object] = {}
    if args.node_config is not None:
        if not args.node_config.is_file():
            raise ConfigError(f"--node-config {args.node_config}: no such file")
        try:
            raw = dict(parse_config_args([str(args.node_config)]))
        except Exception as err:  # noqa: BLE001 - Flower's TOML errors, any kind
            raise ConfigError(f"--node-config {args.node_config}: {err}") from None
    for key in ("max-epsilon", "delta", "accountant", "max-evaluations"):
        value = getattr(args, key.replace("-", "_"))
        if value is not None:
            raw[key] = value
    policy = NodePolicy.parse(raw)
    if policy.missing():
        raise ConfigError(f"no {', '.join(policy.missing())}: give --node-config or the flags")
    return {
        "max_epsilon": policy.max_epsilon,
        "delta": policy.delta,
        "accountant": policy.accountant,
        "max_evaluations": policy.max_evaluations,
    }


def run(args: argparse.Namespace) -> int:
    from common.config import ConfigError

    try:
        policy = _policy(args)
        for key in ("cases", "batch_size", "rounds", "local_epochs"):
            if getattr(args, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')}: expected a whole number >= 1")
        if not (0 < args.target_epsilon <= policy["max_epsilon"]):
            raise ConfigError(
                f"--target-epsilon {args.target_epsilon:g}: expected above 0 and at most "
                f"max-epsilon {policy['max_epsilon']:g} (a node refuses a higher one)"
            )
        if policy["delta"] >= 1.0 / args.cases:
            raise ConfigError(
                f"delta {policy['delta']:g}: a node refuses a run unless delta < 1/N "
                f"(N = --cases {args.cases})"
            )
    except ConfigError as err:
        print(f"fedvox budget: error: {err}", file=sys.stderr)
        return 2
    max_eps = float(policy.pop("max_epsilon"))
    fit = runs_that_fit(
        max_eps,
        target_epsilon=args.target_epsilon,
        cases=args.cases,
        batch_size=args.batch_size,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        **policy,
    )
    print(_table(fit, args.target_epsilon, max_eps, policy))
    return 0


def _table(fit: Fit, target: float, max_eps: float, policy: dict[str, object]) -> str:
    head = (
        f"one run: target epsilon {target:g}, DP-SGD noise multiplier "
        f"{fit.noise_multiplier:.3f}; lifetime epsilon ({policy['accountant']}, "
        f"delta {policy['delta']:g}) after k runs:"
    )
    rows = [
        f"  k={k:<3d} {e:8.2f}   (adding: {k * target:g})" for k, e in enumerate(fit.lifetime, 1)
    ]
    if len(rows) > 12:
        rows = [*rows[:5], "  ...", *rows[-5:]]
    naive = math.floor(max_eps / target + 1e-9)
    tail = (
        f"{fit.runs} run(s) of this shape fit in max-epsilon {max_eps:g} "
        f"(adding epsilons would say {naive})."
    )
    return "\n".join([head, *rows, tail])
