"""`fedvox import nnunet`: an nnU-Net (v1 or v2) or Medical Segmentation Decathlon dataset ->
a segmentation site.

Layouts understood (the training part; imagesTs/ has no labels and is not imported):

* nnU-Net v2: dataset.json {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver":
  1}, "file_ending": ".nii.gz"}; imagesTr/<case>_0000<ending>, labelsTr/<case><ending>.
* MSD and nnU-Net v1: dataset.json {"modality": {"0": "CT"}, "labels": {"0": "background",
  "1": "liver"}, "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]};
  the image is imagesTr/x.nii.gz (MSD) or imagesTr/x_0000.nii.gz (v1).

A fedvox site holds one image channel per case (common/transforms.py puts a single channel
first), so multi-channel datasets (several channel_names / modalities, e.g. BraTS) are refused.
Label values must be 0..K-1 without gaps: they become class_names[i] in the site's dataset.json.
nnU-Net's region-based labels and its "ignore" label have no fedvox equivalent and are refused.

The site links to the dataset's files (absolute symlinks; moving the dataset breaks the site) or,
with --copy, holds copies. Case ids are the dataset's own case identifiers: research datasets
already use pseudonyms there (DICOM imports hash theirs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from client.importers.site import ImportInputError, ImportReport
from common.site.checks import AFFINE_TOLERANCE
from common.site.writer import StagedCase, open_site
from common.transforms import effective_shape

TOOL = "fedvox import nnunet"
ENDINGS = (".nii.gz", ".nii")
CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class Layout:
    version: str  # "nnU-Net v2" | "MSD / nnU-Net v1"
    class_names: list[str]
    modality: str
    pairs: list[tuple[str, Path, Path]]  # (case id, image, label)


def _site_modality(channel: str) -> str:
    """CT -> "CT" (HU windowing in preprocessing); any other channel name is kept as given."""
    name = str(channel).strip()
    return "CT" if name.upper() == "CT" else name


def _class_names(labels: object, version: str, path: Path) -> list[str]:
    """Names ordered by label value; values must be exactly 0..K-1."""
    if not isinstance(labels, dict) or len(labels) < 2:
        raise ImportInputError(f"{path}: 'labels' must map at least background and one structure")
    by_value: dict[int, str] = {}
    for key, value in labels.items():
        name, raw = (key, value) if version == "nnU-Net v2" else (value, key)
        if isinstance(raw, list):
            raise ImportInputError(
                f"{path}: label {name!r} is region-based ({raw}); fedvox needs one value per class"
            )
        try:
            v = int(raw)
        except (TypeError, ValueError):
            raise ImportInputError(f"{path}: label value {raw!r} is not an integer") from None
        if str(name).strip().lower() == "ignore":
            raise ImportInputError(f"{path}: nnU-Net's 'ignore' label is not supported")
        if v in by_value:
            raise ImportInputError(f"{path}: label value {v} is given twice")
        by_value[v] = str(name)
    if sorted(by_value) != list(range(len(by_value))):
        raise ImportInputError(
            f"{path}: label values {sorted(by_value)} must be 0..{len(by_value) - 1} without "
            "gaps (0 = background): fedvox's class i is label value i"
        )
    return [by_value[i] for i in range(len(by_value))]


def _pairs_v2(root: Path, ending: str) -> list[tuple[str, Path, Path]]:
    labels = sorted((root / "labelsTr").glob(f"*{ending}"))
    return [
        (p.name[: -len(ending)], root / "imagesTr" / f"{p.name[: -len(ending)]}_0000{ending}", p)
        for p in labels
        if not p.name.startswith(".")
    ]


def _pairs_msd(root: Path, training: object, path: Path) -> list[tuple[str, Path, Path]]:
    if not isinstance(training, list):
        raise ImportInputError(f"{path}: 'training' must be a list of {{image, label}}")
    pairs = []
    for i, item in enumerate(training):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise ImportInputError(f"{path}: training entry {i} lacks 'image' or 'label'")
        image, label = root / item["image"], root / item["label"]
        ending = next((e for e in ENDINGS if image.name.endswith(e)), "")
        case = image.name[: -len(ending)] if ending else image.stem
        if not image.exists():  # nnU-Net v1 lists x.nii.gz but stores x_0000.nii.gz
            image = image.with_name(f"{case}_0000{ending}")
        pairs.append((case, image, label))
    return pairs


def read_layout(root: Path) -> Layout:
    """The dataset's classes, modality and (case, image, label) triples; errors name the file."""
    if not root.is_dir():
        raise ImportInputError(f"dataset folder {root} does not exist or is not a folder")
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ImportInputError(f"{path}: missing or not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not ("channel_names" in meta or "modality" in meta):
        raise ImportInputError(
            f"{path}: neither nnU-Net v2 ('channel_names') nor MSD / nnU-Net v1 ('modality')"
        )
    version = "nnU-Net v2" if "channel_names" in meta else "MSD / nnU-Net v1"
    channels = meta.get("channel_names") or meta.get("modality")
    if not isinstance(channels, dict) or not channels:
        raise ImportInputError(f"{path}: no channels in 'channel_names' / 'modality'")
    if len(channels) > 1:
        raise ImportInputError(
            f"{path}: {len(channels)} channels {list(channels.values())}; multi-channel datasets "
            "are not supported yet (a fedvox site holds one image channel per case)"
        )
    class_names = _class_names(meta.get("labels"), version, path)
    ending = str(meta.get("file_ending", ".nii.gz"))
    if ending not in ENDINGS:
        raise ImportInputError(
            f"{path}: file_ending {ending!r}: only NIfTI ({ENDINGS}) is supported"
        )
    if version == "nnU-Net v2" or "training" not in meta:
        pairs = _pairs_v2(root, ending)
    else:
        pairs = _pairs_msd(root, meta["training"], path)
    if not pairs:
        raise ImportInputError(f"{root}: no training cases (labelsTr/ is empty or missing)")
    modality = _site_modality(next(iter(channels.values())))
    return Layout(version, class_names, modality, pairs)


def _case_problem(case: str, image: Path, label: Path, root: Path) -> tuple[str, int]:
    """(problem, spatial dims) of one case from the headers; problem "" when usable."""
    if not CASE_ID.fullmatch(case):
        return f"case id {case!r} is not usable as a file name", 0
    for what, p in (("image", image), ("label", label)):
        if not p.is_file():
            return f"{what} {p.relative_to(root) if root in p.parents else p} is missing", 0
        if not p.name.endswith(ENDINGS):
            return f"{what} {p.name} is not a NIfTI file", 0
    try:
        img, lab = nib.load(image), nib.load(label)
    except Exception as e:
        return f"unreadable NIfTI ({type(e).__name__}: {e})", 0
    shape = effective_shape(img.shape)
    if len(shape) not in (2, 3):
        return f"image of shape {tuple(img.shape)}: multi-channel or 4D images are not supported", 0
    if effective_shape(lab.shape) != shape:
        return f"label shape {tuple(lab.shape)} differs from the image's {tuple(img.shape)}", 0
    if np.abs(np.asarray(lab.affine) - np.asarray(img.affine)).max() > AFFINE_TOLERANCE:
        return "label affine differs from the image's (they must share one voxel grid)", 0
    return "", len(shape)


def import_nnunet(dataset: Path, site: Path, copy: bool = False) -> ImportReport:
    """Import the training cases of an nnU-Net / MSD dataset into `site` (links or copies)."""
    root = Path(dataset).expanduser().resolve()
    site = Path(site).expanduser().resolve()
    if site == root or root in site.parents:
        raise ImportInputError(f"--out {site} is inside the dataset folder {root}")
    layout = read_layout(root)
    report = ImportReport(f"fedvox import nnunet {root} -> {site} ({layout.version})")
    dims: set[int] = set()
    with open_site(site, TOOL) as writer:
        for case, image, label in layout.pairs:
            problem, d = _case_problem(case, image, label, root)
            if problem:
                report.skip(f"case {case}", problem)
                continue
            ends = [next(e for e in ENDINGS if p.name.endswith(e)) for p in (image, label)]
            rels = (f"images/{case}{ends[0]}", f"masks/{case}{ends[1]}")
            for src, rel in zip((image, label), rels, strict=True):
                if copy:
                    shutil.copyfile(src, writer.path(rel))
                else:
                    os.symlink(src.resolve(), writer.path(rel))
            writer.add(StagedCase(case, rels[0], mask=rels[1]))
            report.ok(f"case {case}", f"{'copied' if copy else 'linked'} -> {rels[0]} + {rels[1]}")
            dims.add(d)
        report.imported = sum(line.ok for line in report.lines)
        if report.imported:
            spec = {
                "task": "segmentation",
                "class_names": layout.class_names,
                "modality": layout.modality,
                "spatial_dims": max(dims),
            }
            report.site_cases = writer.commit(spec)
    return report
