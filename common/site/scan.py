"""The pipeline: one pass over a site folder through the stages, in order.

spec (dataset.json) -> index (images/, masks/, labels.csv) -> cache (a record per image
file: from memory, from disk, or fresh with its header checks) -> checks (labels, masks, dims)
-> decode (voxels of the files still valid; tensors) -> split (train/val/test) -> report.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from common.progress import track
from common.site.cache import RecordCache, size_token
from common.site.checks import (
    case_problems,
    check_header,
    label_only_reports,
    reason_before_decoding,
)
from common.site.decode import Preprocessor, decode_image, decode_mask
from common.site.errors import DataError
from common.site.index import SiteIndex, case_id, read_index
from common.site.report import CaseReport, SiteReport
from common.site.spec import DatasetSpec, inferred_classes, majority_dims, read_declared
from common.site.split import build_cases
from common.transforms import PreprocessConfig


@dataclass(frozen=True)
class ScanContext:
    """What the per-file stages need to know about the whole site."""

    index: SiteIndex
    class_names: tuple[str, ...]  # declared, else inferred from labels.csv
    always: tuple[str, ...]  # segmentation: always_present
    site_dims: int  # declared, else the majority of the readable headers
    problems: dict[str, str]  # case id -> its label-level reason


@dataclass(frozen=True)
class Scan:
    spec: DatasetSpec
    report: SiteReport
    records: dict[str, dict]  # image file name -> cache record (cache.new_record)
    cfg: PreprocessConfig | None  # None when no tensors were wanted
    valid_names: list[str]  # image file of each valid case, in report.cases order


def scan(
    site: Path,
    image_size: tuple[int, ...] | None,
    want_tensors: bool,
    cache_dir: Path | None,
    log: Callable[[str], None],
) -> Scan:
    site = site.expanduser().resolve()
    if not site.is_dir():
        raise DataError(f"{site}: site folder does not exist")
    declared = read_declared(site)
    index = read_index(site, declared.get("task") == "segmentation")
    token = size_token(image_size if image_size is not None else declared.get("image_size"))
    cache = RecordCache.open(site, token, want_tensors, cache_dir, index.images, log)
    records, headers = read_records(index, cache)
    ctx = _context(index, declared, records)
    prep = _preprocessor(ctx, declared, image_size, want_tensors)
    reports, valid = check_and_decode(ctx, records, headers, prep, cache)
    reports += label_only_reports(index)
    spec = DatasetSpec(
        task=declared.get("task", "classification"),
        class_names=ctx.class_names,
        modality=prep.modality,
        spatial_dims=ctx.site_dims,
        image_size=declared.get("image_size"),
        always_present=ctx.always,
    )
    cases = build_cases(index, records, valid)
    report = SiteReport(site=site, spec=spec, reports=reports, cases=cases)
    cache.store(records)
    return Scan(spec, report, records, prep.cfg, [name for _, name in valid])


def read_records(
    index: SiteIndex, cache: RecordCache
) -> tuple[dict[str, dict], dict[str, nib.spatialimages.SpatialImage]]:
    """A record per image file: cached (memory, then disk), else fresh with its header checks.
    Also the header-only proxies of the fresh files, so decoding need not open them again."""
    records: dict[str, dict] = {}
    headers: dict[str, nib.spatialimages.SpatialImage] = {}
    folder, mask_folder = str(index.image_folder), str(index.mask_folder)
    for name, stat in track(index.images.items(), f"reading {index.site.name}"):
        path = os.path.join(folder, name)
        mask_key = index.mask_key(name)
        rec = cache.find(name, stat, path, mask_key, mask_folder)
        if rec is None:
            rec = cache.fresh(stat, path, mask_key, mask_folder)
            img = check_header(rec, index, name)
            if img is not None:
                headers[name] = img
        records[name] = rec
    return records, headers


def _context(index: SiteIndex, declared: dict, records: dict[str, dict]) -> ScanContext:
    dims_seen = Counter(len(r["shape"]) for r in records.values() if r["shape"] is not None)
    class_names = declared.get("class_names") or inferred_classes(
        r.label for r in index.rows if not r.problem
    )
    return ScanContext(
        index=index,
        class_names=class_names,
        always=declared.get("always_present", ()),
        site_dims=declared.get("spatial_dims") or majority_dims(dims_seen),
        problems=case_problems(index, class_names),
    )


def _preprocessor(
    ctx: ScanContext, declared: dict, image_size: tuple[int, ...] | None, want_tensors: bool
) -> Preprocessor:
    """The preprocessing settings, known before any decoding unless the size comes from data."""
    size = image_size or declared.get("image_size")
    if size is not None and len(size) != ctx.site_dims:
        raise DataError(
            f"{ctx.index.site}: image size {tuple(size)} does not match the site's "
            f"{ctx.site_dims} spatial dims"
        )
    return Preprocessor(want_tensors, declared.get("modality", "other"), size)


def check_and_decode(
    ctx: ScanContext,
    records: dict[str, dict],
    headers: dict[str, nib.spatialimages.SpatialImage],
    prep: Preprocessor,
    cache: RecordCache,
) -> tuple[list[CaseReport], list[tuple[str, str]]]:
    """File-level checks + decoding, in name order: a report per image file and the valid
    (case id, file name) pairs."""
    reports: list[CaseReport] = []
    valid: list[tuple[str, str]] = []
    for name, rec in track(records.items(), f"checking {ctx.index.site.name}"):
        cid, rel = case_id(name), f"images/{name}"
        problem = ctx.problems.get(cid, "") if cid else ""
        reason = reason_before_decoding(rec, problem, ctx.site_dims)
        if not reason:
            reason = _decode(ctx, name, rec, headers, prep, cache)
        if reason:
            reports.append(CaseReport(cid or name, rel, False, reason))
        else:
            reports.append(CaseReport(cid, rel, True, warning=rec.get("mask_warning", "")))
            valid.append((cid, name))
    return reports, valid


def _decode(
    ctx: ScanContext,
    name: str,
    rec: dict,
    headers: dict[str, nib.spatialimages.SpatialImage],
    prep: Preprocessor,
    cache: RecordCache,
) -> str:
    """Decode a file that passed the header checks unless its record is still good; its
    voxel-level reason ("" when valid)."""
    if rec["decoded"] and not rec["data_error"]:
        prep.settle(rec["shape"])  # without a size: the first valid image's
    if prep.needs_decode(rec):
        cache.dirty = True
        img = headers.pop(name, None) or nib.load(os.path.join(ctx.index.image_folder, name))
        decode_image(rec, img, prep)
        if ctx.index.segmentation and not rec["data_error"]:
            mask = ctx.index.mask_folder / rec["mask_key"][0]
            decode_mask(rec, mask, ctx.class_names, ctx.always, prep)
    return rec["data_error"] or rec["mask_error"]
