"""The last stage, the report: what `fedvox validate` prints and training logs.

One CaseReport per image file (ok, or its one reason), plus one per labels.csv row that names
no image; the valid cases with their label and split.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common.site.index import SPLITS
from common.site.spec import DatasetSpec


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
    cases: list[Case]  # the valid ones, in image file name order

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
