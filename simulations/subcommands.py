"""A command made of sub-commands, each its own module (`fedvox bench …`, `fedvox audit …`).

A table maps each sub-command's name to (module, one-line help); every module has
`add_arguments(parser)` and `run(args) -> int`, imported when the parser is built, so its
top-level imports stay light.
"""

from __future__ import annotations

import argparse
import importlib

Table = dict[str, tuple[str, str]]


def add_subcommands(parser: argparse.ArgumentParser, dest: str, table: Table) -> None:
    """One sub-parser per entry of `table`, its options added by the entry's module."""
    sub = parser.add_subparsers(dest=dest, required=True)
    for name, (module_name, help_text) in table.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_subcommand_module=module_name)
        importlib.import_module(module_name).add_arguments(sp)


def run_subcommand(args: argparse.Namespace) -> int:
    """Run the sub-command `add_subcommands` parsed."""
    return int(importlib.import_module(args._subcommand_module).run(args) or 0)
