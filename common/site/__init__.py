"""The hospital data folder: reading, validating and loading it (README: "data folder contract").

<site>/images/<case>.nii[.gz] + <site>/labels.csv (case,label[,split]) + optional dataset.json.
Segmentation ("task": "segmentation" in dataset.json, which then must name the classes):
<site>/masks/<case>.nii[.gz] beside each image, integer labels (0 = background, i = class_names[i]),
same shape and affine as the image; labels.csv is optional there (`case[,split]`, only to fix
splits; cases without a row get the hash split).

`validate_site` (fedvox validate) and `load_site` (training, evaluation) run the same scan
(scan.py), a pipeline of stages, one module each:

    spec.py    dataset.json -> DatasetSpec; read_spec, default_image_size, auto_input_size
    index.py   images/, masks/, labels.csv -> rows and file stats (nothing decoded)
    cache.py   the memory + disk cache of per-file records: decode once per process and content
    checks.py  header, label, mask and dims problems -> one reason per bad file
    decode.py  one file's voxels -> voxel checks + preprocessed tensor (common/transforms.py)
    split.py   valid cases -> train / val / test
    report.py  Case, CaseReport, SiteReport (what validate prints)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from common.site.cache import CACHE_FORMAT, clear_memory_cache
from common.site.errors import DataError
from common.site.index import SPLITS
from common.site.report import Case, CaseReport, SiteReport
from common.site.scan import scan
from common.site.spec import (
    AUTO_3D_SIZE,
    DatasetSpec,
    auto_input_size,
    default_image_size,
    read_spec,
)
from common.transforms import PreprocessConfig


@dataclass(frozen=True, eq=False)
class SiteData:
    """The selected valid cases of a site, decoded and preprocessed once, as two tensors."""

    images: torch.Tensor  # (N, C, *spatial_size) float32
    # classification: (N,) int64 class indices; segmentation: (N, 1, *spatial_size) int64
    # label maps, aligned voxel for voxel with `images`
    labels: torch.Tensor
    cases: list[Case]
    spec: DatasetSpec
    report: SiteReport
    preprocess: PreprocessConfig  # build_transform(preprocess) reproduces images for predict

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def spatial_dims(self) -> int:
        return self.spec.spatial_dims

    @property
    def image_size(self) -> tuple[int, ...]:
        return tuple(self.images.shape[2:])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, label) of case i: enough for a torch DataLoader."""
        return self.images[i], self.labels[i]


def validate_site(site: Path | str) -> SiteReport:
    """Check every file of a site; each bad one gets exactly one named reason."""
    return scan(Path(site), None, want_tensors=False, cache_dir=None, log=lambda _m: None).report


def load_site(
    site: Path | str,
    split: str = "train",
    image_size: Iterable[int] | None = None,
    cache_dir: Path | str | None = None,
    log: Callable[[str], None] = print,
) -> SiteData:
    """Load one split ("train", "val", "test" or "all") of a site into memory.

    image_size None -> dataset.json's image_size, else the (RAS) shape of the first valid image.
    Bad files are skipped with the same report as `fedvox validate`, logged through `log`.
    """
    if split not in (*SPLITS, "all"):
        raise DataError(f"split must be one of {(*SPLITS, 'all')}, got {split!r}")
    size = tuple(int(s) for s in image_size) if image_size is not None else None
    result = scan(Path(site), size, True, Path(cache_dir) if cache_dir else None, log)
    report = result.report
    if report.n_bad:
        log(report.format(only_bad=True))
    if not report.cases:
        raise DataError(f"{report.site}: no valid case left ({report.n_bad} bad files, see report)")
    chosen = [
        (c, n)
        for c, n in zip(report.cases, result.valid_names, strict=True)
        if split in ("all", c.split)
    ]
    if not chosen:
        raise DataError(
            f"{report.site}: split {split!r} is empty "
            f"({report.n_valid} valid cases in other splits)"
        )
    images = torch.stack([result.records[n]["tensor"] for _, n in chosen])
    if result.spec.is_segmentation:
        masks = [result.records[n]["mask_tensor"] for _, n in chosen]
        labels = torch.stack(masks).to(torch.int64)
    else:
        labels = torch.tensor([c.label for c, _ in chosen], dtype=torch.int64)
    cases = [c for c, _ in chosen]
    return SiteData(images, labels, cases, result.spec, report, result.cfg)


__all__ = [
    "AUTO_3D_SIZE",
    "CACHE_FORMAT",
    "Case",
    "CaseReport",
    "DataError",
    "DatasetSpec",
    "SiteData",
    "SiteReport",
    "auto_input_size",
    "clear_memory_cache",
    "default_image_size",
    "load_site",
    "read_spec",
    "validate_site",
]
