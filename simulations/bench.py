"""`fedvox bench {speed,utility}`: benchmarks that print a table and write JSON.

Each benchmark is its own module with `add_arguments(parser)` and `run(args) -> int`, imported when
the CLI builds its parser, so those modules keep their top-level imports light (stdlib only) and
import torch/Flower inside functions.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
from importlib import metadata
from pathlib import Path

# benchmark -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "speed": ("simulations.bench_speed", "DP step cost vs non-private and Opacus modes"),
    "utility": ("simulations.bench_utility", "model utility under DP (accuracy/AUC vs epsilon)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_bench_module=module_name)
        importlib.import_module(module_name).add_arguments(sp)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._bench_module).run(args) or 0)


def machine_info() -> dict:
    """What a benchmark ran on: CPU model, cores, platform and the library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "opacus": version("opacus"),
        "flwr": version("flwr"),
    }
