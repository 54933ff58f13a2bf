"""`fedvox audit {privacy,attacks,node}`: measure privacy instead of assuming it.

- `privacy` (simulations/audit/privacy.py): an empirical lower bound on a node's epsilon from
  gradient canaries in one training run, next to the epsilon its ledger claims;
- `attacks` (simulations/audit/attacks.py): the membership attacks a curious server can run
  on everything a node returns, over many independent runs, next to the DP limit;
- `node` (simulations/audit/node.py): a hostile server drives a real deployed node (SuperLink,
  SuperNode, warm SuperExec) with crafted messages; one row per attack, leaked or not.

Each is its own module with `add_arguments(parser)` and `run(args) -> int`; top-level imports
stay light (the CLI imports them to build its parser).
"""

from __future__ import annotations

import argparse

from simulations.subcommands import add_subcommands, run_subcommand

AUDITS: dict[str, tuple[str, str]] = {
    "privacy": ("simulations.audit.privacy", "empirical epsilon lower bound (gradient canaries)"),
    "attacks": ("simulations.audit.attacks", "a curious server's membership attacks (AUC, TPR)"),
    "node": ("simulations.audit.node", "a hostile server against your own node config"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_subcommands(parser, "audit", AUDITS)


def run(args: argparse.Namespace) -> int:
    return run_subcommand(args)
