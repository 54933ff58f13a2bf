"""The output folder of `fedvox prepare`: written whole or not at all, never over foreign files.

Layout (the hospital data folder contract, see README):

    <out>/hospital-1 .. hospital-K  images/<case>.nii.gz, labels.csv (case,label,split)
                                    dataset.json
    <out>/holdout                   the official test split (no split column), for the server
    <out>/prepare.json              manifest: parameters + class counts; written last

Everything is written into a hidden sibling temp folder and renamed onto `<out>` only when
complete, under a file lock (`.<out>.lock` next to `<out>`). So a crash never leaves a
half-written `<out>`, several processes may call `ensure_demo_data` at once, and an existing
`<out>` is replaced only when it holds nothing but a previous `fedvox prepare` output.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "prepare.json"
MANIFEST_TOOL = "fedvox prepare"
MANIFEST_VERSION = 1


def _is_prepare_output(path: Path) -> bool:
    """True if `path` holds only what a previous `fedvox prepare` wrote (safe to replace)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("tool") != MANIFEST_TOOL:
        return False
    ours = set(manifest.get("sites", [])) | {MANIFEST}
    return all(p.name in ours for p in path.iterdir())


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Exclusive lock for everything that writes `out` (a lock file beside it)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_prepare_output(out):
        raise FileExistsError(
            f"{out} is not empty and is not a previous `fedvox prepare` output; "
            "refusing to overwrite it (choose another --out or empty it yourself)"
        )


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temp folder to write into; on success it replaces `out` in one rename.

    Must be entered with the lock held (`locked`). Refuses (before any work) when `out`
    holds anything but a previous prepare output. Leftover temp folders from a crashed run
    are removed: nobody else can be writing them while we hold the lock.
    """
    out = out.resolve()
    _check_writable(out)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise RuntimeError("internal error: prepare wrote no manifest")
        if out.exists():
            _check_writable(out)  # re-check: someone may have put files there meanwhile
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(tmp: Path, params: dict, counts: dict[str, list[int]], class_names) -> None:
    manifest = {
        "tool": MANIFEST_TOOL,
        "version": MANIFEST_VERSION,
        "params": params,
        "class_names": list(class_names),
        "sites": list(counts),
        "counts": counts,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(out: Path) -> dict | None:
    try:
        manifest = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_complete(out: Path, manifest: dict) -> bool:
    """Cheap check that every site of the manifest is still there with all its images."""
    for site, c in manifest.get("counts", {}).items():
        images = out / site / "images"
        if not (out / site / "labels.csv").is_file() or not images.is_dir():
            return False
        if len(os.listdir(images)) != sum(c):
            return False
    return True
