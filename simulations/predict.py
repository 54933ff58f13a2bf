"""`fedvox predict`: apply a run's global model to scans from a hospital's own archive.

    fedvox predict --run RUN_DIR [--checkpoint best|last|round-N] INPUT... --out DIR
                   [--saliency] [--dicom] [--series-description REGEX]

INPUT is a NIfTI file, a hospital-layout folder or DICOM (a series, a study or a whole export:
simulations/predict_dicom.py, with one line per series). Classification writes predictions.csv
(case, calibrated probability, label at the run's threshold, class name); segmentation one mask
NIfTI per input on the input's own grid. `--dicom` also writes, for DICOM inputs, a DICOM SEG
per series or an SR per study (simulations/dicom_out.py). The work is `common.predict`; this is
the command line. An input that can't be predicted is named with its reason; the others still
are. Exit code: 0 all predicted, 1 some failed or skipped, 2 none predicted or the run is
unusable.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from simulations.predict_dicom import DicomOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", type=Path, nargs="+", help="NIfTI files or hospital folders")
    parser.add_argument("--run", type=Path, required=True, help="a fedvox run folder")
    parser.add_argument(
        "--checkpoint",
        default="last",
        help="best | last | round-N (default last; best was chosen on the server's holdout)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--saliency", action="store_true", help="also write <case>_saliency.nii.gz (+ PNG in 2D)"
    )
    parser.add_argument(
        "--dicom",
        action="store_true",
        help="DICOM inputs: also write a DICOM SEG (segmentation) or SR (classification), and "
        "with --saliency a parametric map, for the PACS",
    )
    parser.add_argument(
        "--series-description",
        metavar="REGEX",
        help="DICOM inputs: only series whose description matches (as fedvox import dicom)",
    )


def run(args: argparse.Namespace) -> int:
    from common.predict import InputError, Predictor, find_inputs, predict_file
    from common.progress import track
    from simulations.predict_dicom import predict_export, scan_input

    try:
        opts = dicom_options(args)
        predictor = Predictor.load(args.run, args.checkpoint)
    except (OSError, ValueError, KeyError) as e:
        print(f"fedvox predict: error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failed, others = [], 0, []
    for path in args.inputs:
        scanned = scan_input(path)
        if scanned is None:
            others.append(path)
            continue
        done, skipped = predict_export(predictor, path, scanned, args.out, opts)
        rows += done
        failed += skipped
    if others and args.dicom:
        print("fedvox predict: --dicom: NIfTI inputs get NIfTI outputs only", file=sys.stderr)
    for path, modality in track(find_inputs(others), "predicting"):
        try:
            rows.append(predict_file(predictor, path, modality, args.out, args.saliency).row)
        except (InputError, OSError) as e:
            failed += 1
            print(f"fedvox predict: {e}", file=sys.stderr)
    if rows:
        write_csv(args.out / "predictions.csv", rows)
    print(
        f"fedvox predict: {len(rows)} predicted, {failed} failed; {predictor.source.name} "
        f"(round {predictor.round}) -> {args.out}"
    )
    return 2 if not rows else (1 if failed else 0)


def dicom_options(args: argparse.Namespace) -> DicomOptions:
    """The DICOM settings, checked before any work."""
    from simulations.predict_dicom import DicomOptions

    try:
        pattern = re.compile(args.series_description, re.I) if args.series_description else None
    except re.error as e:
        raise ValueError(f"--series-description {args.series_description!r}: {e}") from None
    return DicomOptions(args.dicom, args.saliency, pattern)


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
