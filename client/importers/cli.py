"""`fedvox import dicom|nnunet`: hospital data as hospitals hold it -> a hospital site.

    fedvox import dicom SRC_DIR --out SITE [--labels cases.csv] [--modality CT] [--state-dir DIR]
    fedvox import nnunet DATASET_DIR --out SITE [--copy]

Prints one line per series (dicom) or case (nnunet), ok or skipped with the reason, and a
summary. Exit code like `fedvox validate`: 0 all imported, 1 some skipped, 2 nothing usable
(or bad settings / input, with an error naming the file or setting). docs/import.md has the
details; client/importers/dicom.py and client/importers/nnunet.py do the work. The subcommands
are the entries of client/importers/registry.py; the two built-in ones are registered here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client.importers.dicom_scan import MODALITIES
from client.importers.registry import IMPORTERS, Importer, register
from client.importers.site import ImportInputError, ImportReport
from client.importers.state import default_state_dir


def _add_dicom(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, help="folder with the DICOM files (searched recursively)")
    p.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="CSV with a key column (accession or study_uid), label[, split]",
    )
    p.add_argument(
        "--modality",
        action="append",
        choices=MODALITIES,
        default=None,
        help="import only this modality (repeat for CR and DX); default: the export's one",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"the node's state dir, for the salt and case mapping (default {default_state_dir()}; "
        "in deployment the node config's state-dir)",
    )
    p.add_argument(
        "--series-description",
        default=None,
        metavar="REGEX",
        help="only series whose SeriesDescription matches (case-insensitive search)",
    )
    p.add_argument(
        "--class-names", default=None, help="dataset.json class names, e.g. normal,pneumonia"
    )
    p.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        default=None,
        help="dataset.json image_size (the model input), e.g. 256 256",
    )


def _run_dicom(args: argparse.Namespace) -> ImportReport:
    from client.importers.dicom import import_dicom

    if args.image_size is not None and len(args.image_size) not in (2, 3):
        raise ImportInputError("--image-size takes 2 or 3 sizes, e.g. 256 256")
    return import_dicom(
        args.src,
        args.out,
        args.state_dir or default_state_dir(),
        labels=args.labels,
        modalities=tuple(args.modality or ()),
        series_description=args.series_description,
        class_names=args.class_names.split(",") if args.class_names else None,
        image_size=args.image_size,
    )


def _add_nnunet(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", type=Path, help="folder with dataset.json, imagesTr/, labelsTr/")
    p.add_argument(
        "--copy", action="store_true", help="copy the files (default: absolute symlinks)"
    )


def _run_nnunet(args: argparse.Namespace) -> ImportReport:
    from client.importers.nnunet import import_nnunet

    return import_nnunet(args.dataset, args.out, copy=args.copy)


register(Importer("dicom", _add_dicom, _run_dicom, "a PACS export (tree of DICOM files) -> a site"))
register(
    Importer(
        "nnunet", _add_nnunet, _run_nnunet, "an nnU-Net v1/v2 or MSD dataset -> a segmentation site"
    )
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One subcommand per registered importer, each with `--out` and the importer's options."""
    metavar = "{" + ",".join(IMPORTERS) + "}"
    sub = parser.add_subparsers(dest="source", required=True, metavar=metavar)
    for importer in IMPORTERS.values():
        p = sub.add_parser(importer.name, help=importer.help, description=importer.help)
        importer.add_arguments(p)
        p.add_argument("--out", type=Path, required=True, help="the site folder to write")


def run(args: argparse.Namespace) -> int:
    try:
        report = IMPORTERS[args.source].run(args)
    except (ImportInputError, OSError) as e:  # OSError: e.g. no permission to write --out
        print(f"fedvox import {args.source}: error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    return report.exit_code
