"""The `fedvox` command line.

It lives in `simulations/` because that is the one package allowed to import
`client`, `server` and `common` alike. Each subcommand is a module exposing
`add_arguments(parser)` and `run(args) -> int`; only the chosen subcommand's module
is imported, so `fedvox validate` does not pay for importing Flower or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("client.validate", "check a hospital data folder and report every bad file"),
    "prepare": ("simulations.prepare", "write hospital folders + holdout from an npz or phantoms"),
    "import": ("client.importers.cli", "DICOM export or nnU-Net/MSD dataset -> a hospital folder"),
    "certs": ("common.certs", "create a CA, server certificate and hospital node keys"),
    "bench": ("simulations.benchmarks", "speed and utility benchmarks (JSON + table)"),
    "predict": ("simulations.predict", "apply a run's model to NIfTI scans (+ saliency maps)"),
    "report": ("simulations.report", "write a run's report.html and model-card.md"),
    "run": ("simulations.run", "flwr run, waited for; exit code from the run's status"),
    "status": ("simulations.status", "a run's status and reason (repairs a killed run's)"),
    "audit": ("simulations.audit", "measure privacy: epsilon lower bound, membership attacks"),
    "budget": ("simulations.budget", "how many runs fit in a node's max-epsilon (the accountant)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (for its arguments)."""
    parser = argparse.ArgumentParser(prog="fedvox", description="fedvox command line")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module_name)
        if name == command:
            # Argument definitions live next to the code that uses them.
            importlib.import_module(module_name).add_arguments(sp)
    return parser


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds the `with` blocks, so a benchmark's LocalFederation ends the
    # SuperLink and Ray processes it started (by PID) instead of leaving them orphaned.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the console command, not a test calling main() in its own process
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    module = importlib.import_module(args._module)
    from common.progress import enabled  # stdlib only: costs `fedvox validate` nothing

    with enabled():  # a person at a terminal sees progress bars on long work
        return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
