"""Stage 5, the split: each valid case goes to train, val or test.

labels.csv's split column wins; cases without one (or, for segmentation, without a row) get
a deterministic hash of their case id: ~VAL_FRACTION of them go to val, at least one when the
site has two, never all of them. The split never depends on process state or file order.
"""

from __future__ import annotations

import hashlib

from common.site.index import SiteIndex
from common.site.report import Case

VAL_FRACTION = 0.15  # local validation share when labels.csv has no split column


def hash_val_cases(auto: list[str]) -> set[str]:
    """The val part of the cases whose split labels.csv does not give."""
    score = {c: int(hashlib.sha256(c.encode()).hexdigest()[:8], 16) / 2**32 for c in auto}
    val = {c for c in auto if score[c] < VAL_FRACTION}
    if not val and len(auto) >= 2:
        val = {min(auto, key=score.__getitem__)}
    if len(auto) >= 2 and val == set(auto):  # small sites: keep something to train on too
        val.discard(max(auto, key=score.__getitem__))
    return val


def build_cases(
    index: SiteIndex, records: dict[str, dict], valid: list[tuple[str, str]]
) -> list[Case]:
    """The valid (case id, image file) pairs as Cases, each with its label and split."""
    rows = {cid: index.row_of(cid) for cid, _ in valid}  # segmentation: may be None
    auto = [cid for cid, _ in valid if rows[cid] is None or rows[cid].split is None]
    val = hash_val_cases(auto)
    seg = index.segmentation
    cases = []
    for cid, name in valid:
        row = rows[cid]
        split = (row.split if row else None) or ("val" if cid in val else "train")
        rec = records[name]
        mask = index.mask_folder / rec["mask_key"][0] if seg else None
        present = tuple(rec["mask_present"]) if seg else ()
        label = int(row.label) if (row and not seg) else 0
        cases.append(Case(cid, index.image_folder / name, label, split, mask, present))
    return cases
