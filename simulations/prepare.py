"""`fedvox prepare`: turn a dataset (or a synthetic phantom) into hospital folders.

The work is done by `common.datasets` (shared with the ServerApp's demo set-up),
`common.partition` and `common.prepare_output`; this module is the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.datasets import (  # noqa: F401 - re-exported for scripts and tests
    DEFAULT_SOURCE,
    class_counts,
    ensure_demo_data,
    format_class_table,
    load_npz,
    prepare_from_npz,
    write_hospital,
    write_site,
)
from common.partition import PARTITIONS, local_val_split, partition_indices  # noqa: F401
from common.prepare_output import MANIFEST, read_manifest  # noqa: F401

# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument(
        "--source",
        type=Path,
        default=None,
        help=f"MedMNIST-style .npz (default: vendored {DEFAULT_SOURCE.name})",
    )
    src.add_argument(
        "--phantom",
        default=None,
        help="write a synthetic phantom instead (blobs-2d, blobs-3d, lung-ct, lung-ct-2d, "
        "organ-3d, organ-ct-3d, lesion-ct-3d, lesion-mr-3d)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--hospitals", type=int, default=5, help="number of hospitals (default 5)")
    parser.add_argument(
        "--partition",
        choices=PARTITIONS,
        default="dirichlet",
        help="how to split cases across hospitals (default dirichlet)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet concentration; smaller = more skewed (default 0.5)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.15,
        help="local validation share of each hospital (default 0.15)",
    )
    parser.add_argument(
        "--min-per-hospital", type=int, default=10, help="minimum cases per hospital (default 10)"
    )
    parser.add_argument(
        "--cases-per-site", type=int, default=None, help="phantom: cases per hospital"
    )
    parser.add_argument("--holdout-cases", type=int, default=None, help="phantom: holdout cases")
    parser.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        default=None,
        help="phantom: image size, e.g. 28 28 or 32 32 32",
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.phantom:
            from simulations.phantoms.sites import PHANTOMS, make_phantom_sites

            if args.phantom not in PHANTOMS:
                raise ValueError(
                    f"unknown phantom {args.phantom!r}; choose from {sorted(PHANTOMS)}"
                )
            kwargs = {}
            if args.cases_per_site is not None:
                kwargs["cases_per_site"] = args.cases_per_site
            if args.holdout_cases is not None:
                kwargs["holdout_cases"] = args.holdout_cases
            counts = make_phantom_sites(
                args.phantom,
                args.out,
                args.hospitals,
                seed=args.seed,
                image_size=tuple(args.image_size) if args.image_size else None,
                val_fraction=args.val_fraction,
                **kwargs,
            )
            source = f"phantom {args.phantom}"
        else:
            source = args.source or DEFAULT_SOURCE
            counts = prepare_from_npz(
                source,
                args.out,
                args.hospitals,
                args.partition,
                args.alpha,
                args.seed,
                args.val_fraction,
                min_per_hospital=args.min_per_hospital,
            )
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"fedvox prepare: error: {e}", file=sys.stderr)
        return 2
    manifest = read_manifest(args.out) or {}
    print(f"wrote {args.out} from {source}")
    print(format_class_table(counts, manifest.get("class_names")))
    return 0
