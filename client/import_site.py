"""Writing a hospital site from `fedvox import`: the report, and adding cases to a site safely.

An import ADDS cases to a site (README "The hospital data folder"); it never deletes one. A case
imported again (same study / same nnU-Net case) gets the same case id, so re-running an import
with the same inputs leaves the site byte for byte as it was: files whose bytes would not change
are not even touched (the node's decoded-data cache keeps trusting them).

Ownership. Every file an import writes is listed in `<site>/import.json` with its sha256 (a
symlink: its target). An import writes only into a folder that does not exist, is empty, or holds
nothing but what an earlier import of the same kind wrote, unchanged: a file it did not write, or
one changed since (a hand-edited labels.csv), makes it refuse before any work, naming the file.
A case whose image was deleted by hand is dropped from labels.csv at the next import (that is
how a hospital removes a case); a re-import of its study brings it back.

Crash safety. New files are written into a hidden staging folder beside the site and moved in
with `os.replace` (atomic per file), under the same lock file `fedvox prepare` uses
(`.<site>.lock` next to the site). The manifest is written first listing both the old and the
new sha256 of every file about to change, and again, with only the new ones, when all are in
place: an import killed halfway leaves a site that the next import recognises as its own.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.files import atomic_write_text, fsync_dir
from common.prepare_output import locked  # the lock `fedvox prepare` takes on a folder

MANIFEST = "import.json"
MANIFEST_VERSION = 1
SITE_FOLDERS = ("images", "masks")
# dataset.json keys that must agree between imports into one site (others: the newest wins)
FIXED_SPEC_KEYS = ("task", "modality", "spatial_dims")


class ImportInputError(ValueError):
    """Unusable import input or settings; the message names the file, folder or setting."""


# ---------------------------------------------------------------------------------- report


@dataclass
class ReportLine:
    item: str  # non-identifying: "case 3f9c… series 2 CT "Thorax"", "file a/b.dcm", "labels …"
    ok: bool
    detail: str = ""  # ok: what was written; skipped: the reason


@dataclass
class ImportReport:
    """One line per series / case / bad input file, like `fedvox validate`'s report."""

    title: str
    lines: list[ReportLine] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # not counted (e.g. a DICOMDIR index)
    imported: int = 0  # cases written or confirmed by this import
    site_cases: int = 0  # cases in the site afterwards

    def ok(self, item: str, detail: str = "") -> None:
        self.lines.append(ReportLine(item, True, detail))

    def skip(self, item: str, reason: str) -> None:
        self.lines.append(ReportLine(item, False, reason))

    @property
    def n_skipped(self) -> int:
        return sum(not line.ok for line in self.lines)

    @property
    def exit_code(self) -> int:
        """0: everything imported; 1: some series/files skipped; 2: nothing usable."""
        if self.imported == 0:
            return 2
        return 1 if self.n_skipped else 0

    def format(self) -> str:
        out = [self.title]
        for line in self.lines:
            tag = "ok  " if line.ok else "SKIP"
            out.append(f"  {tag} {line.item}" + (f": {line.detail}" if line.detail else ""))
        out += [f"  note: {n}" for n in self.notes]
        out.append(
            f"{self.imported} case(s) imported, {self.n_skipped} skipped; "
            f"{self.site_cases} case(s) in the site"
        )
        return "\n".join(out)


# ---------------------------------------------------------------------------------- ownership


def _digest(path: Path) -> str:
    """sha256 of a file's bytes; a symlink is identified by its target instead."""
    if path.is_symlink():
        return "link:" + os.readlink(path)
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stat_key(path: Path) -> list[int]:
    st = path.lstat()
    return [st.st_size, st.st_mtime_ns]


def _unchanged(path: Path, entry: dict) -> bool:
    """Is `path` still one of the versions the manifest recorded? (stat first, then hash)"""
    if entry.get("stat") == _stat_key(path):
        return True
    return _digest(path) in entry.get("sha256", [])


def _read_owned_manifest(site: Path, tool: str) -> dict:
    """The site's manifest, or {} for a new/empty folder; refuses anything not ours."""
    if site.exists() and not site.is_dir():
        raise ImportInputError(f"--out {site} exists and is not a folder")
    if not site.is_dir() or not any(site.iterdir()):
        return {}
    try:
        manifest = json.loads((site / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ImportInputError(
            f"--out {site} is not empty and was not written by fedvox import (no valid "
            f"{MANIFEST}); refusing to write into it: choose another --out or empty it yourself"
        )
    if manifest.get("tool") != tool:
        raise ImportInputError(
            f"--out {site} was written by `{manifest.get('tool')}`, not `{tool}`; use another --out"
        )
    files, foreign, changed = manifest["files"], [], []
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
    if foreign:
        raise ImportInputError(
            f"--out {site} holds files fedvox import did not write ({', '.join(foreign[:5])}); "
            "refusing to write into it: move them away or choose another --out"
        )
    if changed:
        raise ImportInputError(
            f"{site}: {', '.join(changed[:5])} changed since fedvox import wrote it; refusing "
            "to overwrite (restore or remove the file, then import again)"
        )
    return manifest


# ---------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class StagedCase:
    case: str
    image: str  # path relative to the site: images/<case>.nii.gz
    mask: str | None = None  # masks/<case>.nii.gz (segmentation)
    label: int | None = None  # None: keep the label an earlier import gave (if any)
    split: str | None = None


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


class SiteWriter:
    """Stage files for a site, then `commit` them (see the module docstring)."""

    def __init__(self, site: Path, tool: str, staging: Path, manifest: dict) -> None:
        self.site, self.tool, self.staging = site, tool, staging
        self.manifest = manifest
        self.cases: dict[str, StagedCase] = {}

    def path(self, rel: str) -> Path:
        """Where to write the file that will become `<site>/<rel>`."""
        out = self.staging / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def add(self, case: StagedCase) -> None:
        self.cases[case.case] = case

    def _merged_cases(self) -> dict[str, dict]:
        """Earlier cases whose image is still there, updated by this import's cases."""
        old = self.manifest.get("cases", {})
        merged = {c: v for c, v in old.items() if os.path.lexists(self.site / v["image"])}
        for c in self.cases.values():
            prev = merged.get(c.case, {})
            label = c.label if c.label is not None else prev.get("label")
            split = c.split if c.label is not None else prev.get("split")
            merged[c.case] = {"image": c.image, "mask": c.mask, "label": label, "split": split}
        return dict(sorted(merged.items()))

    def _merged_spec(self, spec: dict) -> dict:
        old = self.manifest.get("spec", {})
        for key in FIXED_SPEC_KEYS:
            if key in old and key in spec and old[key] != spec[key]:
                raise ImportInputError(
                    f"--out {self.site} holds an import with {key}={old[key]!r}; this one has "
                    f"{key}={spec[key]!r} (one site holds one kind of data: use another --out)"
                )
        return {**old, **{k: v for k, v in spec.items() if v is not None}}

    def _stage_tables(self, cases: dict[str, dict], spec: dict) -> None:
        labelled = {c: v for c, v in cases.items() if v["label"] is not None}
        if labelled or os.path.lexists(self.site / "labels.csv"):
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            with_split = any(v["split"] for v in labelled.values())
            w.writerow(["case", "label"] + (["split"] if with_split else []))
            for c, v in labelled.items():
                w.writerow([c, v["label"]] + ([v["split"] or ""] if with_split else []))
            self.path("labels.csv").write_text(buf.getvalue(), encoding="utf-8")
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
        new_hash = {rel: _digest(p) for rel, p in staged.items()}
        moves = [
            rel
            for rel in staged
            if not (os.path.lexists(self.site / rel) and _digest(self.site / rel) == new_hash[rel])
        ]  # files with the same bytes are left alone (and keep their mtime)
        old_files = self.manifest.get("files", {})
        keep = {rel: e for rel, e in old_files.items() if os.path.lexists(self.site / rel)}
        self.site.mkdir(parents=True, exist_ok=True)
        if moves:  # first: both versions of every file about to change count as ours
            pending = dict(keep)
            for rel in moves:
                old = keep.get(rel, {}).get("sha256", [])
                pending[rel] = {"sha256": [*old, new_hash[rel]]}
            self._write_manifest(pending, cases, spec)
        for rel in moves:
            dst = self.site / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            _fsync_file(staged[rel])
            _move(staged[rel], dst)
        for folder in {self.site / Path(rel).parent for rel in moves}:
            fsync_dir(folder)
        final = {
            rel: {
                "sha256": [new_hash.get(rel) or keep[rel]["sha256"][-1]],
                "stat": _stat_key(self.site / rel),
            }
            for rel in sorted(set(keep) | set(new_hash))
        }
        self._write_manifest(final, cases, spec)
        return len(cases)

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
def open_site(site: Path, tool: str) -> Iterator[SiteWriter]:
    """Lock the site, check it is ours (or new), and give a writer with a staging folder.

    Nothing in the site changes unless the caller calls `commit`; the staging folder is removed
    whatever happens.
    """
    site = Path(site).expanduser().resolve()
    with locked(site):
        manifest = _read_owned_manifest(site, tool)
        for stale in site.parent.glob(f".{site.name}.import-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed import's; we hold the lock
        staging = Path(tempfile.mkdtemp(prefix=f".{site.name}.import-", dir=site.parent))
        try:
            yield SiteWriter(site, tool, staging, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
