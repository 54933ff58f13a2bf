"""The hospital data folder: reading, validating and loading it (README: "data folder contract").

<site>/images/<case>.nii[.gz] + <site>/labels.csv (case,label[,split]) + optional dataset.json.
Segmentation ("task": "segmentation" in dataset.json, which then must name the classes):
<site>/masks/<case>.nii[.gz] beside each image, integer labels (0 = background, i = class_names[i]),
same shape and affine as the image; labels.csv is optional there (`case[,split]`, only to fix
splits; cases without a row get the hash split).

Every file is checked once and gets exactly one reason when bad; the same report serves
`fedvox validate` and training (which skips bad files, loudly). Decoding NIfTI is the expensive
part, so it happens once per node process and, with a cache_dir, once per file content:

* in memory (module level): per site and requested size, a record per image file (stat
  identity, check result, preprocessed tensor). Flower simulation runs many clients in one
  process and repeats the same load_site every round; a repeat costs a few os.stat calls.
* on disk: ONE torch file per site + requested size, holding every file's record (sha256 of its
  bytes, check result) and one stacked tensor of all preprocessed images. In deployment every
  message runs in a fresh process, so the repeat cost is one torch.load plus a stat per file.
  A file whose size+mtime match its record is trusted without re-hashing; otherwise it is
  re-hashed and only re-decoded when the bytes really changed. Tensors are reused only when the
  preprocessing key matches. A corrupt cache file is ignored and rebuilt; writes are atomic.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from common.transforms import (
    PreprocessConfig,
    build_mask_transform,
    build_transform,
    canonical_shape,
    effective_shape,
)

CACHE_FORMAT = 2  # bump when the record layout below changes (2: segmentation masks)
VAL_FRACTION = 0.15  # local validation share when labels.csv has no split column
SPLITS = ("train", "val", "test")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
TASKS = ("classification", "segmentation")
MAX_SEG_CLASSES = 256  # masks are cached as uint8
AFFINE_TOLERANCE = 1e-3  # mm: a mask's affine may differ from its image's by float noise only


class DataError(ValueError):
    """Unusable data or settings; the message names the site, file or setting."""


# ---------------------------------------------------------------------------------------------
# dataset.json


@dataclass(frozen=True)
class DatasetSpec:
    task: str = "classification"
    class_names: tuple[str, ...] = ()
    modality: str = "other"
    spatial_dims: int = 2
    image_size: tuple[int, ...] | None = None
    # segmentation: structures every case contains (an empty mask for one is warned about)
    always_present: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_segmentation(self) -> bool:
        return self.task == "segmentation"


def _read_json_spec(site: Path) -> dict:
    """dataset.json as checked, normalised values; keys absent from the file are absent here."""
    path = site / "dataset.json"
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    out: dict = {}
    if "task" in raw:
        if raw["task"] not in TASKS:
            raise DataError(f"{path}: task {raw['task']!r} is not one of {list(TASKS)}")
        out["task"] = raw["task"]
    if "class_names" in raw:
        names = raw["class_names"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise DataError(
                f"{path}: class_names must be a non-empty list of strings, got {names!r}"
            )
        if len(set(names)) != len(names):
            raise DataError(f"{path}: class_names has duplicates: {names!r}")
        out["class_names"] = tuple(names)
    if out.get("task") == "segmentation":
        # Label values can't be inferred without decoding every mask, and "which value is
        # which structure" must be stated anyway: require the names.
        names = out.get("class_names", ())
        if not 2 <= len(names) <= MAX_SEG_CLASSES:
            raise DataError(
                f"{path}: a segmentation dataset needs class_names with 2..{MAX_SEG_CLASSES} "
                'names, label value i = class_names[i], 0 = background (e.g. ["background", '
                f'"lung", "nodule"]), got {raw.get("class_names")!r}'
            )
        always = raw.get("always_present", [])
        if not isinstance(always, list) or not all(a in names[1:] for a in always):
            raise DataError(
                f"{path}: always_present must be a list of foreground class_names "
                f"{list(names[1:])}, got {always!r}"
            )
        out["always_present"] = tuple(always)
    if "modality" in raw:
        if not isinstance(raw["modality"], str) or not raw["modality"].strip():
            raise DataError(f"{path}: modality must be a string, got {raw['modality']!r}")
        out["modality"] = raw["modality"].strip()
    if "spatial_dims" in raw:
        if raw["spatial_dims"] not in (2, 3) or isinstance(raw["spatial_dims"], bool):
            raise DataError(f"{path}: spatial_dims must be 2 or 3, got {raw['spatial_dims']!r}")
        out["spatial_dims"] = int(raw["spatial_dims"])
    if raw.get("image_size") is not None:
        size = raw["image_size"]
        if (
            not isinstance(size, list)
            or len(size) not in (2, 3)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
        ):
            raise DataError(
                f"{path}: image_size must be a list of 2 or 3 positive ints, got {size!r}"
            )
        if "spatial_dims" in out and len(size) != out["spatial_dims"]:
            raise DataError(
                f"{path}: image_size {size} does not match spatial_dims {out['spatial_dims']}"
            )
        out["image_size"] = tuple(size)
        out.setdefault("spatial_dims", len(size))
    return out


def read_spec(site: Path | str) -> DatasetSpec:
    """dataset.json, with what it leaves out inferred from labels.csv and the image headers.

    Inferred class names are "0".."max label"; inferred spatial_dims is the majority of the
    images' dims (headers only, no voxels decoded).
    """
    site = Path(site)
    spec = _read_json_spec(site)
    if "class_names" not in spec:
        labels = [r.label for r in _read_labels(site) if not r.problem and r.label is not None]
        spec["class_names"] = _inferred_classes(labels)
    if "spatial_dims" not in spec:
        dims: Counter[int] = Counter()
        for name in _list_images(site):
            try:
                dims[len(effective_shape(nib.load(site / "images" / name).shape))] += 1
            except Exception:
                pass  # validate_site names the bad file; the spec only needs the majority
        spec["spatial_dims"] = _majority_dims(dims)
    return DatasetSpec(**spec)


# 3D volumes whose size neither the run nor dataset.json gives are resized to this. Issue 6's
# budget: ~1,300 volumes of 64^3 over 3 hospitals, DP, <= 30 min on 2 cores; a DP step of the 3D
# CNN costs ~8x more at 64^3 than at 32^3 (measured in simulations/results/utility-3d.json).
AUTO_3D_SIZE = (32, 32, 32)


def auto_input_size(shape: Sequence[int]) -> tuple[int, ...]:
    """The model input size for images of `shape` when nobody chose one: 2D and small 3D keep
    their size, larger 3D volumes get AUTO_3D_SIZE."""
    shape = tuple(int(s) for s in shape)
    return AUTO_3D_SIZE if len(shape) == 3 and max(shape) > max(AUTO_3D_SIZE) else shape


def default_image_size(site: Path | str) -> tuple[int, ...] | None:
    """dataset.json's image_size; else AUTO_3D_SIZE for 3D volumes larger than it; else None
    (2D images keep their size). Reads one image header at most, no voxels."""
    spec = read_spec(site)
    if spec.image_size is not None or spec.spatial_dims != 3:
        return spec.image_size
    for name in sorted(_list_images(Path(site))):
        try:
            shape = effective_shape(nib.load(Path(site) / "images" / name).shape)
        except Exception:
            continue  # validate_site names the bad file
        if len(shape) == 3:
            size = auto_input_size(shape)
            return size if size != shape else None
    return None


def _inferred_classes(labels: Iterable[int | None]) -> tuple[str, ...]:
    top = max([x for x in labels if x is not None and x >= 0], default=-1)
    return tuple(str(i) for i in range(top + 1))


def _majority_dims(dims: Counter[int]) -> int:
    # Ties go to the fewer dims; a site with no readable image defaults to 2D.
    return max(sorted(dims), key=lambda d: dims[d]) if dims else 2


# ---------------------------------------------------------------------------------------------
# reports


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: int  # classification; 0 for segmentation (the mask is the target)
    split: str  # "train" | "val" | "test"
    mask: Path | None = None  # segmentation
    present: tuple[int, ...] = ()  # segmentation: label values found in the mask


@dataclass
class CaseReport:
    case: str
    file: str  # relative to the site: images/x.nii.gz, or labels.csv for a label without an image
    ok: bool
    reason: str = ""
    warning: str = ""  # usable but suspicious (e.g. an always-present structure missing)


@dataclass
class SiteReport:
    site: Path
    spec: DatasetSpec
    reports: list[CaseReport]
    cases: list[Case]  # the valid ones, sorted by case id

    @property
    def n_valid(self) -> int:
        return len(self.cases)

    @property
    def n_bad(self) -> int:
        return sum(not r.ok for r in self.reports)

    @property
    def bad(self) -> list[CaseReport]:
        return [r for r in self.reports if not r.ok]

    @property
    def warnings(self) -> list[CaseReport]:
        return [r for r in self.reports if r.warning]

    @property
    def class_counts(self) -> dict[str, int]:
        """Cases per class (segmentation: cases whose mask contains the class)."""
        if self.spec.is_segmentation:
            counts = Counter(v for c in self.cases for v in c.present)
        else:
            counts = Counter(c.label for c in self.cases)
        return {name: counts.get(i, 0) for i, name in enumerate(self.spec.class_names)}

    @property
    def exit_code(self) -> int:
        if self.n_valid == 0:
            return 2
        return 1 if self.n_bad else 0

    def summary(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.class_counts.items()) or "none"
        splits = Counter(c.split for c in self.cases)
        split_txt = ", ".join(f"{s}={splits[s]}" for s in SPLITS if splits[s])
        return f"{self.site}: {self.n_valid} valid, {self.n_bad} bad; class counts: {counts}" + (
            f"; splits: {split_txt}" if split_txt else ""
        )

    def format(self, only_bad: bool = False) -> str:
        s = self.spec
        size = "x".join(map(str, s.image_size)) if s.image_size else "auto"
        lines = [
            f"site {self.site}  task={s.task} modality={s.modality} dims={s.spatial_dims}D "
            f"image_size={size} classes={list(s.class_names)}"
        ]
        for r in self.reports:
            if r.ok and r.warning:
                lines.append(f"  WARN {r.file}: {r.warning}")
            elif r.ok and not only_bad:
                lines.append(f"  ok   {r.file}")
            elif not r.ok:
                lines.append(f"  BAD  {r.file}: {r.reason}")
        lines.append(self.summary())
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# labels.csv and images/


@dataclass
class _Row:
    case: str
    line: int
    label: int | None
    split: str | None
    problem: str = ""


def _read_labels(site: Path, segmentation: bool = False) -> list[_Row]:
    """labels.csv rows. Segmentation: optional, `case[,split]` (a label column is ignored)."""
    path = site / "labels.csv"
    if segmentation and not path.exists():
        return []
    if not path.is_file():
        raise DataError(
            f"{site}: missing labels.csv (expected {path} with header case,label[,split])"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e})") from e
    reader = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(reader, [])]
    if segmentation and "case" not in header:
        raise DataError(f"{path}: header must contain a 'case' column, got {header}")
    if not segmentation and ("case" not in header or "label" not in header):
        raise DataError(f"{path}: header must contain 'case' and 'label' columns, got {header}")
    ic, il = header.index("case"), (None if segmentation else header.index("label"))
    isp = header.index("split") if "split" in header else None
    rows: list[_Row] = []
    for line, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue  # blank line
        cells = [c.strip() for c in cells] + [""] * len(header)
        row = _Row(
            case=cells[ic], line=line, label=None, split=(cells[isp] or None) if isp else None
        )
        raw = cells[il] if il is not None else "0"
        if not row.case:
            row.problem = f"labels.csv line {line} has no case id"
        elif not re.fullmatch(r"[+-]?\d+", raw):
            row.problem = f"label {raw!r} in labels.csv line {line} is not an integer class index"
        else:
            row.label = int(raw)
            if row.split is not None and row.split not in SPLITS:
                row.problem = (
                    f"split {row.split!r} in labels.csv line {line} is not one of {SPLITS}"
                )
        rows.append(row)
    return rows


def _case_id(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _list_images(site: Path, sub: str = "images") -> dict[str, tuple[int, int, int]]:
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


def _sha256(path: Path | str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------------------------------------
# per-file checks + decoding, with the memory and disk caches

# (site, size request) -> {file name: record}. A record is a plain dict so it round-trips through
# torch.save(weights_only) unchanged: size, mtime_ns, ino, sha256 (or None), header_error,
# shape (canonical effective spatial shape), decoded (data checks done), data_error,
# prep (preprocessing key of "tensor") and tensor.
_MEMORY: dict[tuple[str, str], dict[str, dict]] = {}


def clear_memory_cache() -> None:
    """Forget every decoded site (tests; or to free memory)."""
    _MEMORY.clear()


def _size_token(image_size: tuple[int, ...] | None) -> str:
    return "auto" if image_size is None else "x".join(map(str, image_size))


def _cache_path(cache_dir: Path, site: Path, token: str) -> Path:
    tag = hashlib.sha256(str(site).encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", site.name)[:40]
    return cache_dir / f"{safe}-{tag}-{token}.fedvox-cache.pt"


def _load_disk(path: Path, log: Callable[[str], None]) -> dict[str, dict]:
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


def _save_disk(path: Path, records: dict[str, dict], log: Callable[[str], None]) -> None:
    rows, mask_rows, out = [], [], {}
    for name, rec in records.items():
        rec = {k: v for k, v in rec.items() if k not in ("tensor", "mask_tensor")}
        if records[name].get("tensor") is not None:
            rec["row"] = len(rows)
            rows.append(records[name]["tensor"])
        if records[name].get("mask_tensor") is not None:
            rec["mask_row"] = len(mask_rows)
            mask_rows.append(records[name]["mask_tensor"])
        out[name] = rec
    images = torch.stack(rows) if rows else torch.zeros(0)
    masks = torch.stack(mask_rows) if mask_rows else torch.zeros(0, dtype=torch.uint8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                blob = {"format": CACHE_FORMAT, "records": out, "images": images, "masks": masks}
                torch.save(blob, f)
            os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:  # a read-only or full cache dir must not stop training
        log(f"could not write cache file {path} ({e}); continuing without it")


def _header_reason(e: Exception) -> str:
    msg = " ".join(str(e).split())  # one line per file in the report
    if "not a gzip file" in msg:
        return f"unreadable gzip (not a gzip file despite the .gz name): {msg}"
    if isinstance(e, (EOFError, OSError)) and not isinstance(e, nib.filebasedimages.ImageFileError):
        return f"unreadable or truncated file: {type(e).__name__}: {msg}"
    return f"not a NIfTI file: {msg}"


def _data_reason(e: Exception) -> str:
    msg = " ".join(str(e).split())  # one line per file in the report
    if isinstance(e, EOFError) or "zlib" in type(e).__module__ or "Compressed file" in msg:
        return f"truncated or corrupt gzip: {type(e).__name__}: {msg}"
    return f"unreadable or truncated voxel data: {type(e).__name__}: {msg}"


def _same_mask(rec: dict, key: tuple | None, folder: str, hashing: bool) -> bool:
    """Segmentation: is the cached record still about this case's mask file too?"""
    old = rec.get("mask_key")
    if old == key:
        return True
    if hashing and key and old and key[0] and old[0] == key[0] and old[1] == key[1]:
        return rec.get("mask_sha256") == _sha256(os.path.join(folder, key[0]))
    return False


def _mask_header_problem(folder: Path, cid: str, files: list[str], img) -> str:
    """Mask missing / duplicated / unreadable / not on its image's voxel grid (headers only)."""
    if not files:
        return f"mask missing (expected masks/{cid}.nii.gz)"
    if len(files) > 1:
        return f"duplicate masks for case {cid!r}: {', '.join('masks/' + f for f in files)}"
    rel = f"masks/{files[0]}"
    try:
        mask = nib.load(folder / files[0])
        if not isinstance(mask, (nib.Nifti1Image, nib.Nifti2Image)):
            raise nib.filebasedimages.ImageFileError(f"{type(mask).__name__}, not NIfTI")
    except Exception as e:
        return f"{rel}: {_header_reason(e)}"
    ms, im = effective_shape(mask.shape), effective_shape(img.shape)
    if ms != im:
        return f"{rel}: mask shape {ms} differs from the image's {im}"
    diff = float(np.abs(np.asarray(mask.affine) - np.asarray(img.affine)).max())
    if not diff <= AFFINE_TOLERANCE:
        return (
            f"{rel}: mask affine differs from the image's (max difference {diff:.4g}); "
            "mask and image must share one voxel grid"
        )
    return ""


def _mask_data_problem(
    data: np.ndarray, class_names: tuple[str, ...], always: tuple[str, ...]
) -> tuple[str, str, list[int]]:
    """(error, warning, label values present) of a decoded mask."""
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        return f"{bad} NaN/Inf voxels", "", []
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        example = float(data[rounded != data].flat[0])
        return f"non-integer label values (e.g. {example:g}); expected integer labels", "", []
    values = [int(v) for v in np.unique(rounded)]
    outside = [v for v in values if not 0 <= v < len(class_names)]
    if outside:
        return (
            f"labels {outside[:5]} are outside the declared classes "
            f"0..{len(class_names) - 1} {list(class_names)}",
            "",
            [],
        )
    missing = [a for a in always if class_names.index(a) not in values]
    warning = (
        f"mask has no {', '.join(missing)} voxels, but dataset.json says always_present"
        if missing
        else ""
    )
    return "", warning, values


@dataclass
class _Scan:
    spec: DatasetSpec
    report: SiteReport
    records: dict[str, dict]
    cfg: PreprocessConfig | None
    valid_names: list[str] = field(default_factory=list)  # image file of each valid case


def _same_file(rec: dict | None, stat: tuple[int, int, int], path: str, hashing: bool) -> bool:
    """Is the cached record still about this file's bytes? Cheap stat first, sha256 if needed."""
    if rec is None:
        return False
    if (rec.get("size"), rec.get("mtime_ns")) == stat[:2]:
        return True
    if hashing and rec.get("sha256") and rec.get("size") == stat[0]:
        return rec["sha256"] == _sha256(path)  # touched or copied, same bytes: keep the work
    return False


def _scan(
    site: Path,
    image_size: tuple[int, ...] | None,
    want_tensors: bool,
    cache_dir: Path | None,
    log: Callable[[str], None],
) -> _Scan:
    site = site.expanduser().resolve()
    if not site.is_dir():
        raise DataError(f"{site}: site folder does not exist")
    declared = _read_json_spec(site)
    seg = declared.get("task") == "segmentation"
    rows = _read_labels(site, seg)
    stats = _list_images(site)
    names = list(stats)
    folder = str(site / "images")
    mask_folder = site / "masks"
    mask_stats = _list_images(site, "masks") if seg else {}
    masks_by_case: dict[str, list[str]] = {}
    for mname in mask_stats:
        masks_by_case.setdefault(_case_id(mname) or mname, []).append(mname)

    def mask_key(name: str) -> tuple | None:
        """The mask file's identity for a record (None: not segmentation)."""
        if not seg:
            return None
        files = masks_by_case.get(_case_id(name) or "", [])
        if len(files) != 1:
            return ("", len(files), 0)  # missing / duplicated: reported by the header check
        return (files[0], *mask_stats[files[0]][:2])

    # -- records: memory first (stat identity), then the disk cache (content hash), then fresh
    token = _size_token(image_size if image_size is not None else declared.get("image_size"))
    mem_key = (str(site), token if want_tensors else "check-only")
    memory = _MEMORY.get(mem_key, {})
    disk_path = _cache_path(cache_dir, site, token) if (cache_dir and want_tensors) else None
    disk: dict[str, dict] | None = None
    records: dict[str, dict] = {}
    dirty = False  # True -> the disk cache is out of date
    imgs: dict[str, nib.spatialimages.SpatialImage] = {}  # header-only proxies of fresh files
    for name in names:
        path = os.path.join(folder, name)
        stat = stats[name]
        mkey = mask_key(name)
        mpath = str(mask_folder / mkey[0]) if mkey and mkey[0] else ""
        rec = memory.get(name)
        if not (
            _same_file(rec, stat, path, hashing=False)
            and _same_mask(rec, mkey, str(mask_folder), hashing=False)
        ):
            rec = None
            if disk_path is not None:
                if disk is None:
                    disk = _load_disk(disk_path, log)
                    dirty = dirty or set(disk) != set(names)
                rec = disk.get(name)
                if not (
                    _same_file(rec, stat, path, hashing=True)
                    and _same_mask(rec, mkey, str(mask_folder), hashing=True)
                ):
                    rec = None
        if rec is not None:
            if (rec["size"], rec["mtime_ns"]) != stat[:2] or rec.get("mask_key") != mkey:
                dirty = True  # same bytes, new mtime: remember it so we need not re-hash
            rec.update(size=stat[0], mtime_ns=stat[1], ino=stat[2], mask_key=mkey)
            if disk_path is not None and rec["sha256"] is None:
                rec["sha256"], dirty = _sha256(path), True  # built earlier without a cache_dir
            if disk_path is not None and mpath and rec.get("mask_sha256") is None:
                rec["mask_sha256"], dirty = _sha256(mpath), True
            records[name] = rec
            continue
        dirty = True
        rec = {
            "size": stat[0],
            "mtime_ns": stat[1],
            "ino": stat[2],
            "sha256": None,
            "header_error": "",
            "shape": None,
            "decoded": False,
            "data_error": "",
            "prep": None,
            "tensor": None,
            "mask_key": mkey,
            "mask_sha256": _sha256(mpath) if (disk_path is not None and mpath) else None,
            "mask_error": "",
            "mask_warning": "",
            "mask_present": [],
            "mask_tensor": None,
        }
        if disk_path is not None:
            rec["sha256"] = _sha256(path)
        if _case_id(name) is None:
            rec["header_error"] = "not a NIfTI file name (expected <case>.nii or <case>.nii.gz)"
        elif stat[0] == 0:
            rec["header_error"] = "empty file (0 bytes)"
        else:
            try:
                img = nib.load(path)  # header only; voxels are read lazily below
                if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                    raise nib.filebasedimages.ImageFileError(f"{type(img).__name__}, not NIfTI")
                rec["shape"] = effective_shape(img.shape)
                if len(rec["shape"]) in (2, 3):
                    rec["shape"] = canonical_shape(img)
                imgs[name] = img
            except Exception as e:
                rec["header_error"] = _header_reason(e)
        if seg and not rec["header_error"]:
            cid = _case_id(name) or name
            rec["mask_error"] = _mask_header_problem(
                mask_folder, cid, masks_by_case.get(cid, []), imgs[name]
            )
        records[name] = rec

    # -- the site's dims: declared, else the majority of readable headers (ties -> fewer dims)
    dims_seen = Counter(len(r["shape"]) for r in records.values() if r["shape"] is not None)
    site_dims = declared.get("spatial_dims") or _majority_dims(dims_seen)

    # -- label-level problems (no decoding needed); one reason per case
    by_case: dict[str, list[str]] = {}
    for name in names:
        cid = _case_id(name)
        if cid is not None:
            by_case.setdefault(cid, []).append(name)
    rows_by_case: dict[str, list[_Row]] = {}
    for row in rows:
        if row.case:
            rows_by_case.setdefault(row.case, []).append(row)
    class_names = declared.get("class_names") or _inferred_classes(
        r.label for r in rows if not r.problem
    )
    case_problem: dict[str, str] = {}
    for cid in sorted(set(by_case) | set(rows_by_case)):
        files, crow = by_case.get(cid, []), rows_by_case.get(cid, [])
        if len(files) > 1:
            case_problem[cid] = (
                f"duplicate case id {cid!r}: {len(files)} images ({', '.join(files)})"
            )
        elif len(crow) > 1:
            lines = ", ".join(str(r.line) for r in crow)
            case_problem[cid] = f"duplicate case id {cid!r} in labels.csv (lines {lines})"
        elif not crow:
            if not seg:  # segmentation: the mask is the label; the row only fixes the split
                case_problem[cid] = "image without a label (no row in labels.csv)"
        elif crow[0].problem:
            case_problem[cid] = crow[0].problem
        elif not seg and not 0 <= crow[0].label < len(class_names):
            case_problem[cid] = (
                f"label {crow[0].label} is outside the declared classes "
                f"0..{len(class_names) - 1} {list(class_names)}"
            )

    # -- preprocessing settings (known before any decoding unless the size comes from data)
    modality = declared.get("modality", "other")
    size = image_size or declared.get("image_size")
    if size is not None and len(size) != site_dims:
        raise DataError(
            f"{site}: image size {tuple(size)} does not match the site's {site_dims} spatial dims"
        )
    cfg = PreprocessConfig(tuple(size), modality) if (want_tensors and size) else None
    transforms: dict[str, Callable] = {}  # built lazily: a fully cached load never imports MONAI
    mask_transforms: dict[str, Callable] = {}
    always = declared.get("always_present", ())

    keys: dict[PreprocessConfig, str] = {}

    def key_of(c: PreprocessConfig) -> str:  # key() hashes JSON: once per scan, not per file
        return keys.setdefault(c, c.key())

    def transform(img: nib.spatialimages.SpatialImage) -> torch.Tensor:
        if key_of(cfg) not in transforms:
            transforms[key_of(cfg)] = build_transform(cfg)
        return transforms[key_of(cfg)](img)

    def mask_transform(img: nib.spatialimages.SpatialImage) -> torch.Tensor:
        if key_of(cfg) not in mask_transforms:
            mask_transforms[key_of(cfg)] = build_mask_transform(cfg)
        return mask_transforms[key_of(cfg)](img)

    def _decode_mask(rec: dict, path: Path) -> None:
        rel = f"masks/{path.name}"
        mimg = nib.load(path)
        try:
            data = mimg.get_fdata(dtype=np.float32)
        except Exception as e:
            rec["mask_error"] = f"{rel}: {_data_reason(e)}"
            return
        error, warning, present = _mask_data_problem(data, class_names, always)
        rec["mask_error"] = f"{rel}: {error}" if error else ""
        rec["mask_warning"] = f"{rel}: {warning}" if warning else ""
        rec["mask_present"] = present
        if want_tensors and not error and rec["tensor"] is not None:
            try:
                rec["mask_tensor"] = mask_transform(mimg)
            except Exception as e:
                rec["mask_error"] = f"{rel}: preprocessing failed: {type(e).__name__}: {e}"
        mimg.uncache()

    # -- file-level checks + decoding, in name order
    reports: list[CaseReport] = []
    valid: list[tuple[str, str]] = []  # (case id, file name)
    for name in names:
        rec, cid, rel = records[name], _case_id(name), f"images/{name}"
        reason = rec["header_error"] or (case_problem.get(cid, "") if cid else "")
        reason = reason or rec.get("mask_error", "")
        if not reason and len(rec["shape"]) != site_dims:
            d = len(rec["shape"])
            kind = f"{d}D series" if d == 4 else f"{d}D image"
            reason = (
                f"{kind} of shape {rec['shape']} among {site_dims}D images "
                f"(the site has {site_dims} spatial dims)"
            )
        if not reason:
            if want_tensors and cfg is None and rec["decoded"] and not rec["data_error"]:
                cfg = PreprocessConfig(rec["shape"], modality)  # size of the first valid image
            need_decode = not rec["decoded"] or (
                want_tensors and not rec["data_error"] and rec["prep"] != key_of(cfg)
            )
            if need_decode:
                dirty = True
                img = imgs.pop(name, None) or nib.load(os.path.join(folder, name))
                try:
                    data = img.get_fdata(dtype=np.float32)  # nibabel keeps it for transform()
                    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
                    rec["data_error"] = f"{bad} NaN/Inf voxels" if bad else ""
                except Exception as e:
                    rec["data_error"] = _data_reason(e)
                rec["decoded"] = True
                if want_tensors and not rec["data_error"]:
                    if cfg is None:
                        cfg = PreprocessConfig(rec["shape"], modality)
                    try:
                        rec["tensor"], rec["prep"] = transform(img), key_of(cfg)
                    except Exception as e:
                        rec["data_error"] = f"preprocessing failed: {type(e).__name__}: {e}"
                img.uncache()
                if seg and not rec["data_error"]:
                    _decode_mask(rec, mask_folder / rec["mask_key"][0])
            reason = rec["data_error"] or rec["mask_error"]
        if reason:
            reports.append(CaseReport(cid or name, rel, False, reason))
        else:
            reports.append(CaseReport(cid, rel, True, warning=rec.get("mask_warning", "")))
            valid.append((cid, name))
    for cid in sorted(set(rows_by_case) - set(by_case)):
        reports.append(
            CaseReport(cid, "labels.csv", False, f"label for case {cid!r} without an image")
        )
    for row in rows:
        if not row.case:
            reports.append(CaseReport("", "labels.csv", False, row.problem))

    # -- splits: explicit column, else a deterministic hash of the case id (~15% val)
    cases = []

    def row_of(cid: str) -> _Row | None:  # segmentation cases may have no row
        return rows_by_case[cid][0] if cid in rows_by_case else None

    auto = [cid for cid, _ in valid if row_of(cid) is None or row_of(cid).split is None]
    score = {c: int(hashlib.sha256(c.encode()).hexdigest()[:8], 16) / 2**32 for c in auto}
    val = {c for c in auto if score[c] < VAL_FRACTION}
    if not val and len(auto) >= 2:
        val = {min(auto, key=score.__getitem__)}
    if len(auto) >= 2 and val == set(auto):  # small sites: keep something to train on too
        val.discard(max(auto, key=score.__getitem__))
    for cid, name in valid:
        row = row_of(cid)
        split = (row.split if row else None) or ("val" if cid in val else "train")
        rec = records[name]
        mask = mask_folder / rec["mask_key"][0] if seg else None
        present = tuple(rec["mask_present"]) if seg else ()
        label = int(row.label) if (row and not seg) else 0
        cases.append(Case(cid, site / "images" / name, label, split, mask, present))

    spec = DatasetSpec(
        task=declared.get("task", "classification"),
        class_names=class_names,
        modality=modality,
        spatial_dims=site_dims,
        image_size=declared.get("image_size"),
        always_present=always,
    )
    report = SiteReport(site=site, spec=spec, reports=reports, cases=cases)
    _MEMORY[mem_key] = records
    if dirty and disk_path is not None:
        _save_disk(disk_path, records, log)
    return _Scan(spec, report, records, cfg, [name for _, name in valid])


def validate_site(site: Path | str) -> SiteReport:
    """Check every file of a site; each bad one gets exactly one named reason."""
    return _scan(Path(site), None, want_tensors=False, cache_dir=None, log=lambda _m: None).report


# ---------------------------------------------------------------------------------------------
# the dataset


class SiteDataset(torch.utils.data.Dataset):
    """The selected valid cases of a site, decoded and preprocessed once, held as one tensor."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        cases: list[Case],
        spec: DatasetSpec,
        report: SiteReport,
        preprocess: PreprocessConfig,
    ):
        self.images = images  # (N, C, *spatial_size) float32
        # classification: (N,) int64 class indices; segmentation: (N, 1, *spatial_size) int64
        # label maps, aligned voxel for voxel with `images`
        self.labels = labels
        self.cases = cases
        self.spec = spec
        self.report = report
        self.preprocess = preprocess  # build_transform(preprocess) reproduces images for predict
        self.in_channels = int(images.shape[1])
        self.num_classes = spec.num_classes
        self.spatial_dims = spec.spatial_dims

    @property
    def image_size(self) -> tuple[int, ...]:
        return tuple(self.images.shape[2:])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def load_site(
    site: Path | str,
    split: str = "train",
    image_size: Iterable[int] | None = None,
    cache_dir: Path | str | None = None,
    log: Callable[[str], None] = print,
) -> SiteDataset:
    """Load one split ("train", "val", "test" or "all") of a site as an in-memory dataset.

    image_size None -> dataset.json's image_size, else the (RAS) shape of the first valid image.
    Bad files are skipped with the same report as `fedvox validate`, logged through `log`.
    """
    if split not in (*SPLITS, "all"):
        raise DataError(f"split must be one of {(*SPLITS, 'all')}, got {split!r}")
    size = tuple(int(s) for s in image_size) if image_size is not None else None
    scan = _scan(Path(site), size, True, Path(cache_dir) if cache_dir else None, log)
    report = scan.report
    if report.n_bad:
        log(report.format(only_bad=True))
    if not report.cases:
        raise DataError(f"{report.site}: no valid case left ({report.n_bad} bad files, see report)")
    chosen = [
        (c, n)
        for c, n in zip(report.cases, scan.valid_names, strict=True)
        if split in ("all", c.split)
    ]
    if not chosen:
        raise DataError(
            f"{report.site}: split {split!r} is empty "
            f"({report.n_valid} valid cases in other splits)"
        )
    images = torch.stack([scan.records[n]["tensor"] for _, n in chosen])
    if scan.spec.is_segmentation:
        labels = torch.stack([scan.records[n]["mask_tensor"] for _, n in chosen]).to(torch.int64)
    else:
        labels = torch.tensor([c.label for c, _ in chosen], dtype=torch.int64)
    return SiteDataset(images, labels, [c for c, _ in chosen], scan.spec, report, scan.cfg)


__all__ = [
    "Case",
    "CaseReport",
    "DataError",
    "DatasetSpec",
    "SiteDataset",
    "SiteReport",
    "clear_memory_cache",
    "load_site",
    "read_spec",
    "validate_site",
]
