"""Stage 0, the spec: dataset.json -> DatasetSpec, and what it leaves out inferred.

dataset.json is optional for classification: class names are then "0".."max label" of
labels.csv and spatial_dims the majority of the image headers. A segmentation dataset
("task": "segmentation") must name its classes: label value i = class_names[i], 0 = background.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from common.site.errors import DataError
from common.site.index import list_files, read_labels
from common.transforms import effective_shape

TASKS = ("classification", "segmentation")
MAX_SEG_CLASSES = 256  # masks are cached as uint8

# 3D volumes whose size neither the run nor dataset.json gives are resized to this: a DP step of
# the 3D CNN costs several times more at 64^3 than at 32^3, and a 3D run must fit a small
# machine's time budget (docs/benchmarks.md, "Figures behind code comments").
AUTO_3D_SIZE = (32, 32, 32)
# Segmentation trains slice-unet (a 2D U-Net over slices), whose cost grows with the in-plane
# size only: 64^3 keeps small structures (lung nodules of 6-15 mm are 1.5-4 voxels in radius at
# 4 mm voxels, under 2 at 32^3) at a DP round's cost that fits the time budget
# (docs/benchmarks.md, "Figures behind code comments").
AUTO_3D_SEG_SIZE = (64, 64, 64)


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


def read_declared(site: Path) -> dict:
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
    _declared_classes(path, raw, out)
    if out.get("task") == "segmentation":
        _declared_segmentation(path, raw, out)
    if "modality" in raw:
        if not isinstance(raw["modality"], str) or not raw["modality"].strip():
            raise DataError(f"{path}: modality must be a string, got {raw['modality']!r}")
        out["modality"] = raw["modality"].strip()
    _declared_geometry(path, raw, out)
    return out


def _declared_classes(path: Path, raw: dict, out: dict) -> None:
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


def _declared_segmentation(path: Path, raw: dict, out: dict) -> None:
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


def _declared_geometry(path: Path, raw: dict, out: dict) -> None:
    if "spatial_dims" in raw:
        if raw["spatial_dims"] not in (2, 3) or isinstance(raw["spatial_dims"], bool):
            raise DataError(f"{path}: spatial_dims must be 2 or 3, got {raw['spatial_dims']!r}")
        out["spatial_dims"] = int(raw["spatial_dims"])
    if raw.get("image_size") is None:
        return
    size = raw["image_size"]
    if (
        not isinstance(size, list)
        or len(size) not in (2, 3)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise DataError(f"{path}: image_size must be a list of 2 or 3 positive ints, got {size!r}")
    if "spatial_dims" in out and len(size) != out["spatial_dims"]:
        raise DataError(
            f"{path}: image_size {size} does not match spatial_dims {out['spatial_dims']}"
        )
    out["image_size"] = tuple(size)
    out.setdefault("spatial_dims", len(size))


def inferred_classes(labels: Iterable[int | None]) -> tuple[str, ...]:
    """Class names "0".."max label" when dataset.json gives none."""
    top = max([x for x in labels if x is not None and x >= 0], default=-1)
    return tuple(str(i) for i in range(top + 1))


def majority_dims(dims: Counter[int]) -> int:
    """The site's spatial dims from its images' dims. Ties go to the fewer dims; a site with
    no readable image defaults to 2D."""
    return max(sorted(dims), key=lambda d: dims[d]) if dims else 2


def _header_shape(site: Path, name: str) -> tuple[int, ...]:
    return effective_shape(nib.load(site / "images" / name).shape)


def read_spec(site: Path | str) -> DatasetSpec:
    """dataset.json, with what it leaves out inferred from labels.csv and the image headers.

    Inferred class names are "0".."max label"; inferred spatial_dims is the majority of the
    images' dims (headers only, no voxels decoded).
    """
    site = Path(site)
    spec = read_declared(site)
    if "class_names" not in spec:
        labels = [r.label for r in read_labels(site) if not r.problem and r.label is not None]
        spec["class_names"] = inferred_classes(labels)
    if "spatial_dims" not in spec:
        dims: Counter[int] = Counter()
        for name in list_files(site):
            try:
                dims[len(_header_shape(site, name))] += 1
            except Exception:
                pass  # validate_site names the bad file; the spec only needs the majority
        spec["spatial_dims"] = majority_dims(dims)
    return DatasetSpec(**spec)


def auto_input_size(shape: Sequence[int], task: str = "classification") -> tuple[int, ...]:
    """The model input size for images of `shape` when nobody chose one: 2D and small 3D keep
    their size, larger 3D volumes get AUTO_3D_SIZE (AUTO_3D_SEG_SIZE for segmentation)."""
    shape = tuple(int(s) for s in shape)
    size = AUTO_3D_SEG_SIZE if task == "segmentation" else AUTO_3D_SIZE
    return size if len(shape) == 3 and max(shape) > max(size) else shape


def default_image_size(site: Path | str) -> tuple[int, ...] | None:
    """dataset.json's image_size; else the task's automatic size (`auto_input_size`) for 3D
    volumes larger than it; else None
    (2D images keep their size). Reads one image header at most, no voxels."""
    spec = read_spec(site)
    if spec.image_size is not None or spec.spatial_dims != 3:
        return spec.image_size
    for name in sorted(list_files(Path(site))):
        try:
            shape = _header_shape(Path(site), name)
        except Exception:
            continue  # validate_site names the bad file
        if len(shape) == 3:
            size = auto_input_size(shape, spec.task)
            return size if size != shape else None
    return None
