"""`fedvox validate <site>`: check a hospital data folder before it joins a federation.

Prints one line per file (or only the bad ones with --bad-only) and a summary.
Exit code: 0 all valid, 1 some bad files (training would skip them), 2 nothing usable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.site import DataError, validate_site


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("site", type=Path, help="hospital folder with images/ and labels.csv")
    parser.add_argument(
        "--bad-only", action="store_true", help="list only the bad files (plus the summary)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        report = validate_site(args.site)
    except DataError as e:  # missing images/ or labels.csv, malformed dataset.json...
        print(f"error: {e}")
        return 2
    print(report.format(only_bad=args.bad_only))
    return report.exit_code
