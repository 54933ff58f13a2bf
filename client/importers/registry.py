"""The importer registry: `fedvox import <name>` is built from it, nothing else lists names.

An importer is one entry: its name, a function adding its own argparse options to its
subcommand (`--out SITE` is added for every importer), a function running the import (it
writes the site through `common.site.writer` and returns an `ImportReport`), and one line of
help. Adding one is a `register(Importer(...))` that runs before the command line is built:
the built-in ones are registered by client/importers/cli.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from client.importers.site import ImportReport


@dataclass(frozen=True)
class Importer:
    name: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], ImportReport]
    help: str  # one line, shown by `fedvox import --help`


IMPORTERS: dict[str, Importer] = {}


def register(importer: Importer) -> Importer:
    """Add an importer; a second one under the same name is a programming error."""
    if IMPORTERS.get(importer.name, importer) is not importer:
        raise ValueError(f"an importer named {importer.name!r} is already registered")
    IMPORTERS[importer.name] = importer
    return importer


def unregister(name: str) -> None:
    """Remove an importer (tests that register their own)."""
    IMPORTERS.pop(name, None)
