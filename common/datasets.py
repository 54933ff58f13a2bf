"""Writing hospital folders from a dataset: NIfTI writing, the npz reader, the demo data.

The library behind `fedvox prepare` (simulations/prepare.py), with common/partition.py (which
cases go to which hospital) and common/prepare_output.py (the output folder: layout, lock,
atomic rename, manifest). It lives in `common/` because the ServerApp prepares the vendored
demo dataset on first use, and the server may only import `common`.

Axis order. MedMNIST stores an image as a C-order array (H, W) or (D, H, W). We write the
array with its axes reversed, the ITK/SimpleITK convention: NIfTI X = W (column), Y = H (row),
Z = D (slice), with a 1 mm diagonal affine. So `nib.load(f).get_fdata().T` is the npz image
again, and dataset.json's `image_size` (the model input) is the NIfTI shape (W, H[, D]) — for 3D
volumes larger than 32³ it is 32³ (`common.site.auto_input_size`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from common.partition import local_val_split, partition_indices
from common.prepare_output import (
    MANIFEST_TOOL,
    atomic_output,
    is_complete,
    locked,
    read_manifest,
    write_manifest,
)
from common.progress import track

T = TypeVar("T")


def _find_vendored(name: str) -> Path:
    """The vendored dataset file, wherever `common/` was imported from.

    Flower runs an app from an unpacked copy of its bundle (FAB), which carries only
    code and config, not .npz data. So look beside this module first, then in the
    installed fedvox distribution (a regular install lists the file; an editable
    install records its source folder in direct_url.json).
    """
    rel = Path("common") / "demo_data" / name
    here = Path(__file__).resolve().parent / "demo_data" / name
    if here.is_file():
        return here
    try:
        dist = importlib.metadata.distribution("fedvox")
    except importlib.metadata.PackageNotFoundError:
        return here  # absent: load_npz names this path in its error
    for f in dist.files or []:
        if Path(str(f)) == rel and Path(str(dist.locate_file(f))).is_file():
            return Path(str(dist.locate_file(f))).resolve()
    url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    if url.startswith("file://") and (Path(url[len("file://") :]) / rel).is_file():
        return Path(url[len("file://") :]) / rel
    return here


DEFAULT_SOURCE: Path = _find_vendored("pneumoniamnist.npz")

# Class names and modality of MedMNIST files we know by name; anything else gets "class-<i>".
KNOWN_DATASETS: dict[str, tuple[list[str], str]] = {
    "pneumoniamnist": (["normal", "pneumonia"], "xray"),
}


# ----------------------------------------------------------------------------- writing


def write_site(
    site_dir: Path,
    images: np.ndarray,
    labels: np.ndarray,
    splits: list[str] | None,
    class_names: list[str],
    modality: str,
    prefix: str = "case",
) -> None:
    """Write one site: images/<prefix>-000001.nii.gz ..., labels.csv, dataset.json.

    `images` is (N, H, W) or (N, D, H, W) in numpy order; each case is written with its axes
    reversed (module docstring). Case ids are a per-site counter in the order given, so the
    caller shuffles first: ids then reveal nothing about the source dataset's order.
    """
    site_dir = Path(site_dir)
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if images.ndim not in (3, 4):
        raise ValueError(
            f"{site_dir}: images must be (N, H, W) or (N, D, H, W), got {images.shape}"
        )
    if len(images) != len(labels) or (splits is not None and len(splits) != len(labels)):
        raise ValueError(f"{site_dir}: images, labels and splits must have the same length")
    from common.site.spec import auto_input_size  # torch-heavy package: only when writing
    from common.site.writer import new_site

    affine = np.eye(4)
    pairs = enumerate(zip(images, labels, strict=True))
    with new_site(site_dir) as writer:
        for i, (image, label) in track(pairs, f"writing {site_dir.name}", total=len(labels)):
            split = splits[i] if splits is not None else None
            writer.add_arrays(f"{prefix}-{i + 1:06d}", image.T, affine, label=label, split=split)
        meta = {
            "task": "classification",
            "class_names": list(class_names),
            "modality": modality,
            "spatial_dims": images.ndim - 1,
            # the model input: the written size, except 3D volumes larger than 32^3 (trained at
            # 32^3 unless the run config's image-size says otherwise; see common/site/spec.py)
            "image_size": list(auto_input_size(images.shape[1:][::-1])),
        }
        writer.commit(meta)


def write_hospital(
    site_dir: Path,
    images: np.ndarray,
    labels: np.ndarray,
    val_fraction: float,
    rng: np.random.Generator,
    class_names: list[str],
    modality: str,
) -> None:
    """Shuffle a hospital's cases, mark its local val part, write it with write_site."""
    order = rng.permutation(len(labels))
    images, labels = images[order], np.asarray(labels).reshape(-1)[order]
    is_val = local_val_split(labels, val_fraction, rng)
    splits = ["val" if v else "train" for v in is_val]
    write_site(site_dir, images, labels, splits, class_names, modality)


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(labels).reshape(-1), minlength=num_classes).tolist()


def format_class_table(
    counts: dict[str, list[int]], class_names: Sequence[str] | None = None
) -> str:
    """Per-site class counts as a fixed-width table (one row per site, a total of the hospitals)."""
    num_classes = max(len(c) for c in counts.values())
    names = list(class_names) if class_names else [f"class-{i}" for i in range(num_classes)]
    header = ["site", "cases"] + names + [f"%{names[-1]}"]
    hospital_total = np.zeros(num_classes, dtype=int)
    rows = []
    for site, c in counts.items():
        if site.startswith("hospital-"):
            hospital_total += np.asarray(c)
        rows.append((site, c))
    rows.insert(
        sum(s.startswith("hospital-") for s in counts), ("hospitals", hospital_total.tolist())
    )
    lines = []
    for site, c in rows:
        total = sum(c)
        share = f"{100 * c[-1] / total:.1f}" if total else "-"
        lines.append([site, str(total)] + [str(x) for x in c] + [share])
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    rule = ["-" * w for w in widths]
    return "\n".join(_table_row(r, widths) for r in [header, rule] + lines)


def _table_row(row: list[str], widths: list[int]) -> str:
    """Site name left-aligned, numbers right-aligned."""
    cells = zip(row, widths, strict=True)
    return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(cells))


# ----------------------------------------------------------------------------- npz


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_npz(source: Path) -> dict[str, np.ndarray]:
    """Read and check a MedMNIST-style npz; errors name the file and the key."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    if not zipfile.is_zipfile(source):
        raise ValueError(f"{source}: not an .npz file (expected a numpy zip archive)")
    try:
        with np.load(source, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile/pickle/ValueError: all mean "not a usable npz"
        raise ValueError(f"{source}: cannot read as .npz ({e})") from e
    out: dict[str, np.ndarray] = {}
    for split in ("train", "val", "test"):
        for kind in ("images", "labels"):
            key = f"{split}_{kind}"
            if key not in arrays:
                raise ValueError(f"{source}: missing key {key!r} (has {sorted(arrays)})")
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        key = f"{split}_images"
        if images.ndim not in (3, 4):
            raise ValueError(
                f"{source}: {key} must be (N, H, W) or (N, D, H, W), got shape {images.shape}"
            )
        if images.ndim == 4 and images.shape[-1] in (3, 4) and images.shape[1] != images.shape[-1]:
            raise ValueError(
                f"{source}: {key} has shape {images.shape}, which looks like channels-last "
                "RGB(A) 2D images; only grayscale 2D (N, H, W) or 3D (N, D, H, W) is supported"
            )
        if not (
            np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)
        ):
            raise ValueError(f"{source}: {key} has non-numeric dtype {images.dtype}")
        key = f"{split}_labels"
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise ValueError(
                f"{source}: {key} must be (N,) or (N, 1) integer classes, got shape {labels.shape}"
                " (multi-label datasets are not supported)"
            )
        if len(labels) != len(images):
            raise ValueError(
                f"{source}: {key} has {len(labels)} labels but {split}_images has {len(images)}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
                raise ValueError(f"{source}: {key} must hold integer class indices")
        labels = labels.astype(np.int64)
        if len(labels) and labels.min() < 0:
            raise ValueError(f"{source}: {key} has a negative label {labels.min()}")
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    shapes = {out[f"{s}_images"].shape[1:] for s in ("train", "val", "test")}
    if len(shapes) != 1:
        raise ValueError(f"{source}: train/val/test images differ in shape: {sorted(shapes)}")
    return out


def _locked_on_out(prepare: Callable[..., T]) -> Callable[..., T]:
    """Run `prepare(source, out, ...)` under the lock of `out` (several processes may prepare
    the same folder at once, e.g. every simulated hospital on a run's first message)."""

    @functools.wraps(prepare)
    def under_lock(source: Path, out: Path, *args: Any, **kwargs: Any) -> T:
        with locked(Path(out)):
            return prepare(source, out, *args, **kwargs)

    return under_lock


def _names_and_modality(
    source: Path,
    pool_y: np.ndarray,
    test_y: np.ndarray,
    names: list[str] | None,
    modality: str | None,
) -> tuple[list[str], str]:
    """The class names and modality given, else those known for this MedMNIST file."""
    known_names, known_modality = KNOWN_DATASETS.get(source.stem.lower(), (None, None))
    num_classes = int(max(pool_y.max(initial=0), test_y.max(initial=0))) + 1
    names = list(names or known_names or [f"class-{i}" for i in range(num_classes)])
    if len(names) < num_classes:
        raise ValueError(
            f"{source}: labels go up to {num_classes - 1} but only {len(names)} class "
            f"names were given ({names})"
        )
    return names, modality or known_modality or "unknown"


@_locked_on_out
def prepare_from_npz(
    source: Path,
    out: Path,
    hospitals: int,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    val_fraction: float = 0.15,
    class_names: list[str] | None = None,
    modality: str | None = None,
    min_per_hospital: int = 10,
) -> dict[str, list[int]]:
    """Write <out>/hospital-1..K (train+val pooled, partitioned, local val part) and
    <out>/holdout (the test split). Returns {site: per-class counts}."""
    source, out = Path(source), Path(out)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    data = load_npz(source)
    pool_x = np.concatenate([data["train_images"], data["val_images"]])
    pool_y = np.concatenate([data["train_labels"], data["val_labels"]])
    test_x, test_y = data["test_images"], data["test_labels"]

    class_names, modality = _names_and_modality(source, pool_y, test_y, class_names, modality)
    parts = partition_indices(pool_y, hospitals, partition, alpha, seed, min_per_hospital)

    rng = np.random.default_rng([seed, 1])  # separate stream: shuffling, val parts, holdout order
    counts: dict[str, list[int]] = {}
    with atomic_output(out) as tmp:
        for h, idx in enumerate(parts, start=1):
            write_hospital(
                tmp / f"hospital-{h}",
                pool_x[idx],
                pool_y[idx],
                val_fraction,
                rng,
                class_names,
                modality,
            )
            counts[f"hospital-{h}"] = class_counts(pool_y[idx], len(class_names))
        order = rng.permutation(len(test_y))
        write_site(tmp / "holdout", test_x[order], test_y[order], None, class_names, modality)
        counts["holdout"] = class_counts(test_y, len(class_names))
        params = {
            "source": str(source.resolve()),
            "source_sha256": _sha256(source),
            "hospitals": hospitals,
            "partition": partition,
            "alpha": alpha,
            "seed": seed,
            "val_fraction": val_fraction,
            "min_per_hospital": min_per_hospital,
        }
        write_manifest(tmp, params, counts, class_names)
    return counts


def ensure_demo_data(out: Path, hospitals: int = 5, alpha: float = 0.5, seed: int = 0) -> Path:
    """Prepare the vendored PneumoniaMNIST into `out` unless it is already there.

    A no-op (a hash of the 4 MB npz, a manifest read, a few listdirs) when `out` holds a
    complete preparation with the same parameters and source. Safe to call from several
    processes at once: the check and the write happen under one lock, so late callers wait
    for the first and then find its output complete.
    """
    out = Path(out).resolve()
    with locked(out):
        manifest = read_manifest(out)
        if manifest is not None and manifest.get("tool") == MANIFEST_TOOL:
            params = manifest.get("params", {})
            wanted = {
                "source_sha256": _sha256(DEFAULT_SOURCE),
                "hospitals": hospitals,
                "partition": "dirichlet",
                "alpha": alpha,
                "seed": seed,
            }
            if all(params.get(k) == v for k, v in wanted.items()) and is_complete(out, manifest):
                return out
        # Already under the lock: the undecorated function (the lock is not re-entrant).
        prepare_from_npz.__wrapped__(DEFAULT_SOURCE, out, hospitals, "dirichlet", alpha, seed)
    return out
