"""One DICOM series -> one clean NIfTI file, with dcm2niix doing the conversion.

dcm2niix (Chris Rorden's converter, the field's reference tool; the PyPI package `dcm2niix`
ships the binary) sorts the slices, builds the voxel -> world affine from the patient
coordinates (DICOM LPS -> NIfTI RAS), keeps the stored integers with RescaleSlope/Intercept in
scl_slope/scl_inter (so nibabel reads HU for CT), assembles enhanced multi-frame files and
decodes compressed transfer syntaxes itself (JPEG lossless/baseline, JPEG-LS via CharLS,
JPEG 2000 via OpenJPEG, RLE, deflate). fedvox re-implements none of that.

What fedvox adds: the series' files are linked into a private temporary folder so that one run
converts exactly one series (and anything else it would write stays there); the options turn
off everything that could carry an identifier (no BIDS sidecar `-b n`, anonymised `-ba y`, no
defaults file `-g i`); and the output is rewritten with a fresh NIfTI header holding only the
voxel grid, data type and scaling: dcm2niix's `descrip` (acquisition time, TE) or `aux_file`
text never reaches the site. nibabel's gzip writer stores no timestamp, so the same series gives
the same bytes at every import.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from client.importers.site import ImportInputError
from common.site.writer import save_nifti

# -z n: we gzip ourselves (deterministic bytes); -x n: never crop; -w 1: overwrite in the temp
# folder; -l o: keep the stored integers as they are (scaling goes to scl_slope/scl_inter).
DCM2NIIX_ARGS = ["-g", "i", "-b", "n", "-ba", "y", "-z", "n", "-x", "n", "-l", "o", "-w", "1"]
TIMEOUT_S = 600


class ConversionFailed(Exception):
    """dcm2niix could not turn the series into one 2D/3D volume; the message says why."""


def converter() -> tuple[str, str]:
    """(path, version) of the dcm2niix binary from the `dcm2niix` wheel, checked to run here."""
    try:
        import dcm2niix
    except ImportError:
        raise ImportInputError(
            "the DICOM converter is missing: pip install dcm2niix (a fedvox dependency)"
        ) from None
    binary = str(dcm2niix.bin)
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ImportInputError(f"the dcm2niix binary {binary} does not run here: {e}") from None
    words = (out.stdout + out.stderr).split()
    version = next((w for w in words if w.startswith("v1.")), "")
    if not version:
        raise ImportInputError(f"the dcm2niix binary {binary} does not run here: {out.stderr}")
    return binary, version


def _first_error(output: str) -> str:
    """dcm2niix's first error line, shortened (its lines name only the temp files)."""
    for line in output.splitlines():
        if line.lower().startswith("error"):
            return line.strip()[:200]
    return "no output file"


def _clean_copy(src: Path, dest: Path) -> tuple[int, ...]:
    """Rewrite dcm2niix's NIfTI with a header holding only geometry, dtype and scaling."""
    img = nib.load(src)
    raw = np.asanyarray(img.dataobj.get_unscaled())
    shape = tuple(int(s) for s in raw.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise ConversionFailed(f"the converter made a {len(shape)}D series {shape}, not one volume")
    codes = (int(img.header["qform_code"]) or 1, int(img.header["sform_code"]) or 1)
    scaling = (float(img.dataobj.slope), float(img.dataobj.inter))
    save_nifti(dest, raw.reshape(shape), img.affine, codes=codes, scaling=scaling)
    return shape


def convert_series(binary: str, files: list[Path], dest: Path, expect_slices: int) -> tuple:
    """Convert the files of one series to `dest` (.nii.gz). -> the written shape.

    `expect_slices`: the slices the header checks counted (1 for a radiograph); a volume with
    another number means the converter split or dropped part of the series.
    """
    with tempfile.TemporaryDirectory(prefix="fedvox-dcm2niix-") as tmp:  # 0700
        inp, out = Path(tmp) / "in", Path(tmp) / "out"
        inp.mkdir()
        out.mkdir()
        for i, f in enumerate(files):
            os.symlink(Path(f).resolve(), inp / f"{i:06d}.dcm")
        cmd = [binary, *DCM2NIIX_ARGS, "-f", "series", "-o", str(out), str(inp)]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ConversionFailed(f"dcm2niix took longer than {TIMEOUT_S} s") from None
        made = sorted(p.name for p in out.iterdir() if p.name.endswith((".nii", ".nii.gz")))
        if not made:
            raise ConversionFailed(
                f"dcm2niix made no image: {_first_error(run.stdout + run.stderr)}"
            )
        if len(made) > 1:
            raise ConversionFailed(
                f"dcm2niix split the series into {len(made)} volumes "
                f"({', '.join(m.split('.')[0] for m in made)})"
            )
        shape = _clean_copy(out / made[0], dest)
    slices = shape[2] if len(shape) == 3 else 1
    if slices != expect_slices:
        dest.unlink()
        raise ConversionFailed(
            f"dcm2niix made a volume of {slices} slice(s) from {expect_slices} (shape {shape})"
        )
    return shape
