"""`fedvox bench {speed,utility,faults}`: benchmarks that print a table and write JSON.

Each benchmark is its own module with `add_arguments(parser)` and `run(args) -> int`, imported when
the CLI builds its parser, so those modules keep their top-level imports light (stdlib only) and
import torch/Flower inside functions.
"""

from __future__ import annotations

import argparse

from simulations.subcommands import add_subcommands, run_subcommand

# benchmark -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "speed": ("simulations.benchmarks.speed", "DP step cost vs non-private and Opacus modes"),
    "utility": (
        "simulations.benchmarks.utility",
        "model utility under DP (accuracy/AUC vs epsilon)",
    ),
    "faults": (
        "simulations.benchmarks.faults",
        "the fault table of docs/reliability.md, real processes",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_subcommands(parser, "bench", BENCHMARKS)


def run(args: argparse.Namespace) -> int:
    return run_subcommand(args)
