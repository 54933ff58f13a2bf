"""`fedvox bench {speed,utility,faults}`: benchmarks that print a table and write JSON.

Each benchmark is its own module with `add_arguments(parser)` and `run(args) -> int`, imported when
the CLI builds its parser, so those modules keep their top-level imports light (stdlib only) and
import torch/Flower inside functions.
"""

from __future__ import annotations

import argparse
import importlib

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
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_bench_module=module_name)
        importlib.import_module(module_name).add_arguments(sp)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._bench_module).run(args) or 0)
