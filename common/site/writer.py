"""The one site writer: every hospital folder fedvox writes goes through `SiteWriter`.

`fedvox prepare`, the phantoms and every importer (client/importers/) stage a site's files
(images/, masks/ as NIfTI, written by `save_nifti` from arrays or by a converter), say which
case each is (`StagedCase`: its label and split), then `commit` with the dataset.json keys:
labels.csv and dataset.json are written here, in one format, and the staged files are moved in.

Two ways in:

* `new_site` (prepare, phantoms): a folder inside the caller's atomic output
  (common/prepare_output.py renames the whole output into place), every case in labels.csv.
* `open_site` (importers): an import ADDS cases to a site and never deletes one. A case
  imported again gets the same id, and files whose bytes would not change are not touched (the
  node's decoded-data cache keeps trusting them). Every file an import writes is listed in
  `<site>/import.json` with its sha256 (a symlink: its target); an import writes only into a
  folder that is new, empty, or holds nothing but what an earlier import of the same kind wrote,
  unchanged: anything else makes it refuse before any work, naming the file. A case whose image
  was deleted by hand is dropped from labels.csv at the next import (how a hospital removes a
  case). Crash safety: files are staged in a hidden folder beside the site and moved in with
  `os.replace` (atomic per file) under the lock `fedvox prepare` uses; the manifest first lists
  the old and the new sha256 of every file about to change, then only the new ones, so an
  import killed halfway leaves a site that the next import recognises as its own.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from common.files import atomic_write_text, fsync_dir
from common.prepare_output import locked  # the lock `fedvox prepare` takes on a folder

MANIFEST = "import.json"
MANIFEST_VERSION = 1
SITE_FOLDERS = ("images", "masks")
# dataset.json keys that must agree between imports into one site (others: the newest wins)
FIXED_SPEC_KEYS = ("task", "modality", "spatial_dims")


class SiteInputError(ValueError):
    """Unusable input or settings for a site; the message names the file, folder or setting."""


@dataclass(frozen=True)
class StagedCase:
    case: str
    image: str  # path relative to the site: images/<case>.nii.gz
    mask: str | None = None  # masks/<case>.nii.gz (segmentation)
    label: int | None = None  # None (and no split): keep what an earlier import gave (if any)
    split: str | None = None


def save_nifti(
    path: Path,
    array: np.ndarray,
    affine: np.ndarray,
    codes: tuple[int, int] = (1, 1),
    scaling: tuple[float, float] | None = None,
) -> Path:
    """One image or mask as NIfTI: the array as it is (X, Y[, Z]), mm units, this affine as
    qform and sform (`codes`); `scaling`: scl_slope/scl_inter for stored integers."""
    img = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=codes[0])
    img.set_sform(affine, code=codes[1])
    if scaling is not None:
        img.header.set_slope_inter(*scaling)
    nib.save(img, path)
    return Path(path)


def digest(path: Path) -> str:
    """sha256 of a file's bytes; a symlink is identified by its target instead."""
    if path.is_symlink():
        return "link:" + os.readlink(path)
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def stat_key(path: Path) -> list[int]:
    st = path.lstat()
    return [st.st_size, st.st_mtime_ns]


def _move(src: Path, dst: Path) -> None:
    """Atomic rename; across file systems (a site that is a mount point) copy, then rename."""
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = dst.with_name(f".{dst.name}.import-tmp")
        shutil.copy2(src, tmp, follow_symlinks=False)
        os.replace(tmp, dst)


def _fsync_file(path: Path) -> None:
    if path.is_symlink():
        return
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def labels_csv(cases: dict[str, dict], every_case: bool, label_column: bool) -> str:
    """labels.csv: `case[,label][,split]`, one row per case (`every_case`) or per labelled one."""
    listed = {c: v for c, v in cases.items() if every_case or v["label"] is not None}
    with_split = any(v["split"] for v in listed.values())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case"] + (["label"] if label_column else []) + (["split"] if with_split else []))
    for c, v in listed.items():
        label = [v["label"]] if label_column else []
        w.writerow([c, *label] + ([v["split"] or ""] if with_split else []))
    return buf.getvalue()


class SiteWriter:
    """Stage files for a site, then `commit` them (see the module docstring)."""

    def __init__(
        self,
        site: Path,
        staging: Path,
        tool: str | None = None,
        manifest: dict | None = None,
        every_case: bool = False,
    ) -> None:
        self.site, self.tool, self.staging = site, tool, staging
        self.manifest = manifest or {}
        self.every_case = every_case  # labels.csv lists every case, not only labelled ones
        self.cases: dict[str, StagedCase] = {}

    def path(self, rel: str) -> Path:
        """Where to write the file that will become `<site>/<rel>`."""
        out = self.staging / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def add(self, case: StagedCase) -> None:
        self.cases[case.case] = case

    def add_arrays(
        self,
        case: str,
        image: np.ndarray,
        affine: np.ndarray,
        mask: np.ndarray | None = None,
        label: int | None = None,
        split: str | None = None,
    ) -> None:
        """Stage images/<case>.nii.gz (and masks/<case>.nii.gz on the same affine)."""
        image_rel = f"images/{case}.nii.gz"
        save_nifti(self.path(image_rel), image, affine)
        mask_rel = None
        if mask is not None:
            mask_rel = f"masks/{case}.nii.gz"
            save_nifti(self.path(mask_rel), mask, affine)
        label = None if label is None else int(label)
        self.add(StagedCase(case, image_rel, mask_rel, label, split))

    def _merged_cases(self) -> dict[str, dict]:
        """Earlier cases whose image is still there, updated by this import's cases."""
        old = self.manifest.get("cases", {})
        merged = {c: v for c, v in old.items() if os.path.lexists(self.site / v["image"])}
        for c in self.cases.values():
            prev = merged.get(c.case, {})
            keep = c.label is None and c.split is None
            label = prev.get("label") if keep else c.label
            split = prev.get("split") if keep else c.split
            merged[c.case] = {"image": c.image, "mask": c.mask, "label": label, "split": split}
        return dict(sorted(merged.items()))

    def _merged_spec(self, spec: dict) -> dict:
        old = self.manifest.get("spec", {})
        for key in FIXED_SPEC_KEYS:
            if key in old and key in spec and old[key] != spec[key]:
                raise SiteInputError(
                    f"--out {self.site} holds an import with {key}={old[key]!r}; this one has "
                    f"{key}={spec[key]!r} (one site holds one kind of data: use another --out)"
                )
        return {**old, **{k: v for k, v in spec.items() if v is not None}}

    def _stage_tables(self, cases: dict[str, dict], spec: dict) -> None:
        labelled = any(v["label"] is not None for v in cases.values())
        if self.every_case or labelled or os.path.lexists(self.site / "labels.csv"):
            label_column = spec.get("task") != "segmentation"
            text = labels_csv(cases, self.every_case, label_column)
            self.path("labels.csv").write_text(text, encoding="utf-8")
        self.path("dataset.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")

    def commit(self, spec: dict) -> int:
        """Move the staged files in; rewrite labels.csv/dataset.json/manifest. -> cases in site."""
        cases = self._merged_cases()
        spec = self._merged_spec(spec)
        self._stage_tables(cases, spec)
        staged = {
            p.relative_to(self.staging).as_posix(): p
            for p in sorted(self.staging.rglob("*"))
            if p.is_symlink() or p.is_file()
        }
        self.site.mkdir(parents=True, exist_ok=True)
        if self.tool is None:  # a new folder in the caller's atomic output: no manifest
            self._move_in(staged, list(staged), durable=False)
            return len(cases)
        new_hash = {rel: digest(p) for rel, p in staged.items()}
        moves = [
            rel
            for rel in staged
            if not (os.path.lexists(self.site / rel) and digest(self.site / rel) == new_hash[rel])
        ]  # files with the same bytes are left alone (and keep their mtime)
        old_files = self.manifest.get("files", {})
        keep = {rel: e for rel, e in old_files.items() if os.path.lexists(self.site / rel)}
        if moves:  # first: both versions of every file about to change count as ours
            pending = dict(keep)
            for rel in moves:
                old = keep.get(rel, {}).get("sha256", [])
                pending[rel] = {"sha256": [*old, new_hash[rel]]}
            self._write_manifest(pending, cases, spec)
        self._move_in(staged, moves, durable=True)
        final = {
            rel: {
                "sha256": [new_hash.get(rel) or keep[rel]["sha256"][-1]],
                "stat": stat_key(self.site / rel),
            }
            for rel in sorted(set(keep) | set(new_hash))
        }
        self._write_manifest(final, cases, spec)
        return len(cases)

    def _move_in(self, staged: dict[str, Path], moves: Sequence[str], durable: bool) -> None:
        for rel in moves:
            dst = self.site / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if durable:
                _fsync_file(staged[rel])
            _move(staged[rel], dst)
        if durable:
            for folder in {self.site / Path(rel).parent for rel in moves}:
                fsync_dir(folder)

    def _write_manifest(self, files: dict, cases: dict, spec: dict) -> None:
        manifest = {
            "tool": self.tool,
            "version": MANIFEST_VERSION,
            "spec": spec,
            "cases": cases,
            "files": dict(sorted(files.items())),
        }
        text = json.dumps(manifest, indent=1) + "\n"
        path = self.site / MANIFEST
        if not path.exists() or path.read_text(encoding="utf-8") != text:  # idempotent re-run
            atomic_write_text(path, text)


@contextlib.contextmanager
def _staging(site: Path, kind: str) -> Iterator[Path]:
    """A hidden folder beside `site`, removed whatever happens."""
    site.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{site.name}.{kind}-", dir=site.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def new_site(site: Path) -> Iterator[SiteWriter]:
    """A writer for a new site inside a folder the caller renames into place as a whole
    (`common.prepare_output.atomic_output`): no lock, no manifest, every case in labels.csv."""
    site = Path(site)
    with _staging(site, "staging") as staging:
        yield SiteWriter(site, staging, every_case=True)


def _unchanged(path: Path, entry: dict) -> bool:
    """Is `path` still one of the versions the manifest recorded? (stat first, then hash)"""
    if entry.get("stat") == stat_key(path):
        return True
    return digest(path) in entry.get("sha256", [])


def _owned_files(site: Path, files: dict) -> tuple[list[str], list[str]]:
    """(files and folders not listed in the manifest, listed files changed since)."""
    foreign, changed = [], []
    for root, dirs, names in os.walk(site):
        rel_root = Path(root).relative_to(site)
        for d in list(dirs):  # only images/ and masks/ at the top are ours
            if rel_root != Path(".") or d not in SITE_FOLDERS:
                foreign.append(str(rel_root / d) + "/")
                dirs.remove(d)
        for name in names:
            rel = (rel_root / name).as_posix()
            if rel == MANIFEST:
                continue
            if rel not in files:
                foreign.append(rel)
            elif not _unchanged(site / rel, files[rel]):
                changed.append(rel)
    return foreign, changed


def read_owned_manifest(site: Path, tool: str) -> dict:
    """The site's manifest, or {} for a new/empty folder; refuses anything not `tool`'s."""
    if site.exists() and not site.is_dir():
        raise SiteInputError(f"--out {site} exists and is not a folder")
    if not site.is_dir() or not any(site.iterdir()):
        return {}
    try:
        manifest = json.loads((site / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise SiteInputError(
            f"--out {site} is not empty and was not written by fedvox import (no valid "
            f"{MANIFEST}); refusing to write into it: choose another --out or empty it yourself"
        )
    if manifest.get("tool") != tool:
        raise SiteInputError(
            f"--out {site} was written by `{manifest.get('tool')}`, not `{tool}`; use another --out"
        )
    foreign, changed = _owned_files(site, manifest["files"])
    if foreign:
        raise SiteInputError(
            f"--out {site} holds files fedvox import did not write ({', '.join(foreign[:5])}); "
            "refusing to write into it: move them away or choose another --out"
        )
    if changed:
        raise SiteInputError(
            f"{site}: {', '.join(changed[:5])} changed since fedvox import wrote it; refusing "
            "to overwrite (restore or remove the file, then import again)"
        )
    return manifest


@contextlib.contextmanager
def open_site(site: Path, tool: str) -> Iterator[SiteWriter]:
    """Lock the site, check it is `tool`'s (or new), and give a writer with a staging folder.

    Nothing in the site changes unless the caller calls `commit`; the staging folder is removed
    whatever happens.
    """
    site = Path(site).expanduser().resolve()
    with locked(site):
        manifest = read_owned_manifest(site, tool)
        for stale in site.parent.glob(f".{site.name}.import-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed import's; we hold the lock
        with _staging(site, "import") as staging:
            yield SiteWriter(site, staging, tool, manifest)
