"""Stage 3, the cache: decoding NIfTI is the expensive part, so it happens once per node
process and, with a cache_dir, once per file content.

* in memory (module level): per site and requested size, a record per image file (stat
  identity, check result, preprocessed tensor). Flower simulation runs many clients in one
  process and repeats the same load_site every round; a repeat costs a few os.stat calls.
* on disk: ONE torch file per site + requested size, holding every file's record (sha256 of its
  bytes, check result) and one stacked tensor of all preprocessed images. In deployment every
  message runs in a fresh process, so the repeat cost is one torch.load plus a stat per file.
  A file whose size+mtime match its record is trusted without re-hashing; otherwise it is
  re-hashed and only re-decoded when the bytes really changed. Tensors are reused only when the
  preprocessing key matches. A corrupt cache file is ignored and rebuilt; writes are atomic
  (common/files.py).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.files import atomic_write
from common.site.index import Stat

CACHE_FORMAT = 2  # bump when the record layout below changes (2: segmentation masks)

# (site, size request) -> {file name: record}. A record is a plain dict so it round-trips through
# torch.save(weights_only) unchanged; its fields are those of new_record below.
_MEMORY: dict[tuple[str, str], dict[str, dict]] = {}


def clear_memory_cache() -> None:
    """Forget every decoded site (tests; or to free memory)."""
    _MEMORY.clear()


def new_record(stat: Stat, mask_key: tuple | None) -> dict:
    """A record before any check: the file's identity, then what the checks and decoding find."""
    return {
        "size": stat[0],
        "mtime_ns": stat[1],
        "ino": stat[2],
        "sha256": None,  # of the file's bytes; only with a disk cache
        "header_error": "",
        "shape": None,  # canonical (RAS) effective spatial shape, from the header
        "decoded": False,  # voxel checks done
        "data_error": "",
        "prep": None,  # PreprocessConfig.key() of "tensor"
        "tensor": None,  # the preprocessed image (C, *spatial_size)
        "mask_key": mask_key,  # SiteIndex.mask_key: the mask file's identity
        "mask_sha256": None,
        "mask_error": "",
        "mask_warning": "",
        "mask_present": [],  # label values in the mask
        "mask_tensor": None,  # the preprocessed mask (1, *spatial_size) uint8
    }


def sha256_file(path: Path | str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def size_token(image_size: tuple[int, ...] | None) -> str:
    return "auto" if image_size is None else "x".join(map(str, image_size))


def cache_path(cache_dir: Path, site: Path, token: str) -> Path:
    tag = hashlib.sha256(str(site).encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", site.name)[:40]
    return cache_dir / f"{safe}-{tag}-{token}.fedvox-cache.pt"


def load_disk(path: Path, log: Callable[[str], None]) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("format") != CACHE_FORMAT:
            return {}
        records = blob["records"]
        images, masks = blob["images"], blob["masks"]
        for rec in records.values():
            row, mask_row = rec.pop("row", None), rec.pop("mask_row", None)
            rec["tensor"] = images[row].clone() if row is not None else None
            rec["mask_tensor"] = masks[mask_row].clone() if mask_row is not None else None
            if rec.get("shape") is not None:
                rec["shape"] = tuple(rec["shape"])
            if rec.get("mask_key") is not None:
                rec["mask_key"] = tuple(rec["mask_key"])
        return records
    except Exception as e:  # any corruption: truncated zip, wrong types, bad index...
        log(f"ignoring unreadable cache file {path} ({type(e).__name__}: {e}); rebuilding it")
        return {}


def save_disk(path: Path, records: dict[str, dict], log: Callable[[str], None]) -> None:
    """Every record without its tensors, plus the tensors stacked (a row index per record)."""
    rows, mask_rows, out = [], [], {}
    for name, rec in records.items():
        saved = {k: v for k, v in rec.items() if k not in ("tensor", "mask_tensor")}
        if rec.get("tensor") is not None:
            saved["row"] = len(rows)
            rows.append(rec["tensor"])
        if rec.get("mask_tensor") is not None:
            saved["mask_row"] = len(mask_rows)
            mask_rows.append(rec["mask_tensor"])
        out[name] = saved
    images = torch.stack(rows) if rows else torch.zeros(0)
    masks = torch.stack(mask_rows) if mask_rows else torch.zeros(0, dtype=torch.uint8)
    blob = {"format": CACHE_FORMAT, "records": out, "images": images, "masks": masks}
    try:
        atomic_write(path, lambda f: torch.save(blob, f))
    except OSError as e:  # a read-only or full cache dir must not stop training
        log(f"could not write cache file {path} ({e}); continuing without it")


def same_file(rec: dict | None, stat: Stat, path: str, hashing: bool) -> bool:
    """Is the cached record still about this file's bytes? Cheap stat first, sha256 if needed."""
    if rec is None:
        return False
    if (rec.get("size"), rec.get("mtime_ns")) == stat[:2]:
        return True
    if hashing and rec.get("sha256") and rec.get("size") == stat[0]:
        return rec["sha256"] == sha256_file(path)  # touched or copied, same bytes: keep the work
    return False


def same_mask(rec: dict, key: tuple | None, folder: str, hashing: bool) -> bool:
    """Segmentation: is the cached record still about this case's mask file too?"""
    old = rec.get("mask_key")
    if old == key:
        return True
    if hashing and key and old and key[0] and old[0] == key[0] and old[1] == key[1]:
        return rec.get("mask_sha256") == sha256_file(os.path.join(folder, key[0]))
    return False


@dataclass
class RecordCache:
    """One scan's view of both caches: memory first (stat identity), then the disk file
    (content hash, read on the first miss). `dirty` says the disk file is out of date."""

    memory_key: tuple[str, str]
    names: frozenset[str]  # the image files the scan lists
    disk_path: Path | None
    log: Callable[[str], None]
    memory: dict[str, dict] = field(default_factory=dict)
    disk: dict[str, dict] | None = None
    dirty: bool = False

    @classmethod
    def open(
        cls,
        site: Path,
        token: str,
        want_tensors: bool,
        cache_dir: Path | None,
        names: Iterable[str],
        log: Callable[[str], None],
    ) -> RecordCache:
        """token: the requested size (size_token). Checks without tensors get their own memory
        entry and no disk file."""
        key = (str(site), token if want_tensors else "check-only")
        disk = cache_path(cache_dir, site, token) if (cache_dir and want_tensors) else None
        return cls(key, frozenset(names), disk, log, _MEMORY.get(key, {}))

    def find(self, name: str, stat: Stat, path: str, mask_key, mask_folder: str) -> dict | None:
        """The cached record of this file (identity updated), or None: check it afresh."""
        rec = self.memory.get(name)
        if not (
            same_file(rec, stat, path, hashing=False)
            and same_mask(rec, mask_key, mask_folder, hashing=False)
        ):
            rec = self._from_disk(name, stat, path, mask_key, mask_folder)
        if rec is None:
            return None
        if (rec["size"], rec["mtime_ns"]) != stat[:2] or rec.get("mask_key") != mask_key:
            self.dirty = True  # same bytes, new mtime: remember it so we need not re-hash
        rec.update(size=stat[0], mtime_ns=stat[1], ino=stat[2], mask_key=mask_key)
        if self.disk_path is not None and rec["sha256"] is None:
            rec["sha256"], self.dirty = sha256_file(path), True  # built earlier without a cache_dir
        mask_path = os.path.join(mask_folder, mask_key[0]) if mask_key and mask_key[0] else ""
        if self.disk_path is not None and mask_path and rec.get("mask_sha256") is None:
            rec["mask_sha256"], self.dirty = sha256_file(mask_path), True
        return rec

    def _from_disk(self, name: str, stat: Stat, path: str, mask_key, mask_folder: str):
        if self.disk_path is None:
            return None
        if self.disk is None:
            self.disk = load_disk(self.disk_path, self.log)
            self.dirty = self.dirty or set(self.disk) != self.names
        rec = self.disk.get(name)
        if not (
            same_file(rec, stat, path, hashing=True)
            and same_mask(rec, mask_key, mask_folder, hashing=True)
        ):
            return None
        return rec

    def fresh(self, stat: Stat, path: str, mask_key, mask_folder: str) -> dict:
        """A new record for a file no cache knows; hashed when there is a disk cache."""
        self.dirty = True
        rec = new_record(stat, mask_key)
        if self.disk_path is not None:
            rec["sha256"] = sha256_file(path)
            if mask_key and mask_key[0]:
                rec["mask_sha256"] = sha256_file(os.path.join(mask_folder, mask_key[0]))
        return rec

    def store(self, records: dict[str, dict]) -> None:
        """Keep this scan's records in memory; rewrite the disk file when it is out of date."""
        _MEMORY[self.memory_key] = records
        if self.dirty and self.disk_path is not None:
            save_disk(self.disk_path, records, self.log)
