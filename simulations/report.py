"""`fedvox report RUN_DIR`: write (or rewrite) a run's report.html and model-card.md.

The ServerApp writes both during and after every run; this rebuilds them from the run folder
alone (summary.json, the holdout records), e.g. for a run from before they existed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a fedvox run folder (with summary.json)")


def run(args: argparse.Namespace) -> int:
    from server.report import write_report

    if not (args.run_dir / "summary.json").is_file():
        print(f"fedvox report: error: {args.run_dir} has no summary.json", file=sys.stderr)
        return 2
    page = write_report(args.run_dir)
    print(f"wrote {page} and {args.run_dir / 'model-card.md'}")
    return 0
