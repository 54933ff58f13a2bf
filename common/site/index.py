"""Stage 1, the file index: images/, masks/ and labels.csv as rows and file stats.

Nothing is decoded here. labels.csv is `case,label[,split]`; for segmentation it is optional
and `case[,split]` (a label column is ignored: the mask is the label, the row only fixes the
split). A row's problem (no case id, a non-integer label, an unknown split) is kept on the row
and reported against its case later, so every file still gets exactly one reason.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common.site.errors import DataError

SPLITS = ("train", "val", "test")
NIFTI_SUFFIXES = (".nii.gz", ".nii")

Stat = tuple[int, int, int]  # (size, mtime_ns, inode): a file's identity for the caches


@dataclass(frozen=True)
class Row:
    """One labels.csv row; `problem` is its one reason when it is unusable."""

    case: str
    line: int
    label: int | None
    split: str | None
    problem: str = ""


def read_csv_table(
    path: Path, error: type[Exception], name: str | None = None
) -> tuple[list[str], Iterator[list[str]]]:
    """(lower-cased header, the remaining rows) of a CSV file (a BOM is ignored); unreadable:
    `error` naming `name` (default: the path)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{name or path}: unreadable ({e})") from None
    reader = csv.reader(text.splitlines())
    return [h.strip().lower() for h in next(reader, [])], reader


def read_labels(site: Path, segmentation: bool = False) -> list[Row]:
    """labels.csv rows. Segmentation: optional, `case[,split]` (a label column is ignored)."""
    path = site / "labels.csv"
    if segmentation and not path.exists():
        return []
    if not path.is_file():
        raise DataError(
            f"{site}: missing labels.csv (expected {path} with header case,label[,split])"
        )
    header, reader = read_csv_table(path, DataError)
    if segmentation and "case" not in header:
        raise DataError(f"{path}: header must contain a 'case' column, got {header}")
    if not segmentation and ("case" not in header or "label" not in header):
        raise DataError(f"{path}: header must contain 'case' and 'label' columns, got {header}")
    ic, il = header.index("case"), (None if segmentation else header.index("label"))
    isp = header.index("split") if "split" in header else None
    rows: list[Row] = []
    for line, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue  # blank line
        cells = [c.strip() for c in cells] + [""] * len(header)
        split = (cells[isp] or None) if isp else None
        rows.append(_parse_row(cells[ic], line, cells[il] if il is not None else "0", split))
    return rows


def _parse_row(case: str, line: int, raw_label: str, split: str | None) -> Row:
    if not case:
        return Row(case, line, None, split, f"labels.csv line {line} has no case id")
    if not re.fullmatch(r"[+-]?\d+", raw_label):
        problem = f"label {raw_label!r} in labels.csv line {line} is not an integer class index"
        return Row(case, line, None, split, problem)
    if split is not None and split not in SPLITS:
        problem = f"split {split!r} in labels.csv line {line} is not one of {SPLITS}"
        return Row(case, line, int(raw_label), split, problem)
    return Row(case, line, int(raw_label), split)


def case_id(name: str) -> str | None:
    """The case id of an image or mask file name; None when it is not <case>.nii[.gz]."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def list_files(site: Path, sub: str = "images") -> dict[str, Stat]:
    """File name -> (size, mtime_ns, inode), sorted by name; hidden files are ignored."""
    folder = site / sub
    if not folder.is_dir():
        raise DataError(f"{site}: missing {sub}/ folder (expected {folder}/<case>.nii.gz)")
    out = {}
    with os.scandir(folder) as it:  # scandir + DirEntry.stat: no Path objects per file
        for e in it:
            if not e.name.startswith(".") and e.is_file():
                st = e.stat()
                out[e.name] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return dict(sorted(out.items()))


def _group(names, key) -> dict[str, list]:
    out: dict[str, list] = {}
    for name in names:
        out.setdefault(key(name), []).append(name)
    return out


@dataclass(frozen=True)
class SiteIndex:
    """Everything the folder says before any file is opened."""

    site: Path
    segmentation: bool
    rows: list[Row]
    images: dict[str, Stat]  # images/ file name -> stat, sorted by name
    masks: dict[str, Stat]  # masks/ likewise (segmentation only)
    images_by_case: dict[str, list[str]]  # NIfTI-named images only
    masks_by_case: dict[str, list[str]]
    rows_by_case: dict[str, list[Row]]  # rows with a case id

    @property
    def image_folder(self) -> Path:
        return self.site / "images"

    @property
    def mask_folder(self) -> Path:
        return self.site / "masks"

    def row_of(self, cid: str) -> Row | None:
        """The case's labels.csv row (segmentation cases may have none)."""
        return self.rows_by_case[cid][0] if cid in self.rows_by_case else None

    def mask_key(self, name: str) -> tuple | None:
        """The identity of an image's mask file for its cache record (None: not segmentation).

        (file name, size, mtime_ns); ("", number of masks, 0) when it is missing or duplicated
        (reported by the header check).
        """
        if not self.segmentation:
            return None
        files = self.masks_by_case.get(case_id(name) or "", [])
        if len(files) != 1:
            return ("", len(files), 0)
        return (files[0], *self.masks[files[0]][:2])


def read_index(site: Path, segmentation: bool) -> SiteIndex:
    """labels.csv, then images/, then (segmentation) masks/; a missing part is a DataError."""
    rows = read_labels(site, segmentation)
    images = list_files(site)
    masks = list_files(site, "masks") if segmentation else {}
    named = [n for n in images if case_id(n) is not None]
    return SiteIndex(
        site=site,
        segmentation=segmentation,
        rows=rows,
        images=images,
        masks=masks,
        images_by_case=_group(named, case_id),
        masks_by_case=_group(masks, lambda m: case_id(m) or m),
        rows_by_case=_group([r for r in rows if r.case], lambda r: r.case),
    )
