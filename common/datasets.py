"""Writing hospital folders from a dataset: partitioning, NIfTI writing, the demo data.

The library behind `fedvox prepare` (simulations/prepare.py). It lives in `common/`
because the ServerApp prepares the vendored demo dataset on first use, and the
server may only import `common`.

Output layout (the hospital data folder contract, see README):

    <out>/hospital-1 .. hospital-K  images/<case>.nii.gz, labels.csv (case,label,split)
                                    dataset.json
    <out>/holdout                   the official test split (no split column), for the server
    <out>/prepare.json              manifest: parameters + class counts; written last

Axis order. MedMNIST stores an image as a C-order array (H, W) or (D, H, W). We write the
array with its axes reversed, the ITK/SimpleITK convention: NIfTI X = W (column), Y = H (row),
Z = D (slice), with a 1 mm diagonal affine. So `nib.load(f).get_fdata().T` is the npz image
again, and dataset.json's `image_size` (the model input) is the NIfTI shape (W, H[, D]) — for 3D
volumes larger than 32³ it is 32³ (`common.site.auto_input_size`).

Safety. Everything is written into a hidden sibling temp folder and renamed onto `<out>` only
when complete, under a file lock (`.<out>.lock` next to `<out>`). So a crash never leaves a
half-written `<out>`, several processes may call `ensure_demo_data` at once, and an existing
`<out>` is replaced only when it holds nothing but a previous `fedvox prepare` output.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np


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
PARTITIONS = ("iid", "dirichlet", "quantity")
MANIFEST = "prepare.json"
MANIFEST_TOOL = "fedvox prepare"
MANIFEST_VERSION = 1

# Class names and modality of MedMNIST files we know by name; anything else gets "class-<i>".
KNOWN_DATASETS: dict[str, tuple[list[str], str]] = {
    "pneumoniamnist": (["normal", "pneumonia"], "xray"),
}


# ----------------------------------------------------------------------------- partitioning


def partition_indices(
    labels: np.ndarray,
    hospitals: int,
    partition: str,
    alpha: float = 0.5,
    seed: int = 0,
    min_per_hospital: int = 10,
) -> list[np.ndarray]:
    """Split indices 0..N-1 into `hospitals` disjoint, covering, sorted index arrays.

    - "iid": a random equal split.
    - "dirichlet": label skew; for every class, its cases are dealt to the hospitals in
      proportions drawn from Dirichlet(alpha) (Hsu et al. 2019; NIID-Bench). Small alpha = skewed.
    - "quantity": hospital sizes drawn from Dirichlet(alpha), labels iid within each.

    A hospital with 0 or 1 cases cannot train (DP-SGD needs a dataset, the local val part
    needs a case), so every hospital gets >= `min_per_hospital` cases: the random draw is
    repeated (up to 100 times, same generator, so still deterministic for a seed), and if it
    still falls short, cases are moved at random from the largest hospital to the short ones.
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; choose one of {', '.join(PARTITIONS)}")
    if hospitals < 1:
        raise ValueError(f"hospitals must be >= 1, got {hospitals}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if n < hospitals * min_per_hospital:
        raise ValueError(
            f"{n} cases cannot give {hospitals} hospitals {min_per_hospital} cases each; "
            "use fewer hospitals"
        )
    rng = np.random.default_rng(seed)

    def draw() -> list[np.ndarray]:
        if partition == "iid":
            return np.array_split(rng.permutation(n), hospitals)
        if partition == "quantity":
            p = rng.dirichlet(np.full(hospitals, alpha))
            cuts = (np.cumsum(p)[:-1] * n).astype(int)
            return np.split(rng.permutation(n), cuts)
        parts: list[list[np.ndarray]] = [[] for _ in range(hospitals)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(hospitals, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for h, chunk in enumerate(np.split(idx, cuts)):
                parts[h].append(chunk)
        return [np.concatenate(p) for p in parts]

    for _ in range(100):
        parts = draw()
        if min(len(p) for p in parts) >= min_per_hospital:
            break
    else:
        # Rebalance: top up short hospitals with random cases of the currently largest one.
        parts = [rng.permutation(p) for p in parts]
        for h in range(hospitals):
            while len(parts[h]) < min_per_hospital:
                big = int(np.argmax([len(p) for p in parts]))
                take = min_per_hospital - len(parts[h])
                take = min(take, len(parts[big]) - min_per_hospital)
                parts[h] = np.concatenate([parts[h], parts[big][:take]])
                parts[big] = parts[big][take:]
    return [np.sort(p).astype(np.int64) for p in parts]


def local_val_split(
    labels: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of a hospital's local validation cases: ~val_fraction of every class
    (stratified), at least 1 case when the site has >= 2, never the whole site."""
    labels = np.asarray(labels).reshape(-1)
    is_val = np.zeros(len(labels), dtype=bool)
    if len(labels) < 2:
        return is_val
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        is_val[idx[: int(round(val_fraction * len(idx)))]] = True
    if not is_val.any():  # tiny site: take one case of its most common class
        major = np.flatnonzero(labels == np.bincount(labels).argmax())
        is_val[rng.choice(major)] = True
    if is_val.all():
        is_val[rng.choice(len(labels))] = False
    return is_val


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
    (site_dir / "images").mkdir(parents=True, exist_ok=True)
    affine = np.eye(4)
    rows = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        case = f"{prefix}-{i + 1:06d}"
        nifti = nib.Nifti1Image(np.ascontiguousarray(image.T), affine)
        nifti.header.set_xyzt_units("mm")
        nifti.set_qform(affine, code=1)
        nifti.set_sform(affine, code=1)
        nib.save(nifti, site_dir / "images" / f"{case}.nii.gz")
        rows.append([case, int(label)] + ([splits[i]] if splits is not None else []))
    with open(site_dir / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "label"] + (["split"] if splits is not None else []))
        w.writerows(rows)
    from common.site.spec import auto_input_size  # torch-heavy package: only when writing

    meta = {
        "task": "classification",
        "class_names": list(class_names),
        "modality": modality,
        "spatial_dims": images.ndim - 1,
        # the model input: the written size, except 3D volumes larger than 32^3 (trained at
        # 32^3 unless the run config's image-size says otherwise; see common/site/spec.py)
        "image_size": list(auto_input_size(images.shape[1:][::-1])),
    }
    (site_dir / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


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

    def fmt(row: list[str]) -> str:  # site name left-aligned, numbers right-aligned
        cells = zip(row, widths, strict=True)
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(cells))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])


# ----------------------------------------------------------------------------- safe output


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
def _locked(out: Path) -> Iterator[None]:
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

    Must be entered with the lock held (`_locked`). Refuses (before any work) when `out`
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
    with _locked(Path(out)):
        return _prepare_from_npz_locked(
            source,
            out,
            hospitals,
            partition,
            alpha,
            seed,
            val_fraction,
            class_names,
            modality,
            min_per_hospital,
        )


def _prepare_from_npz_locked(
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
    source, out = Path(source), Path(out)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    data = load_npz(source)
    pool_x = np.concatenate([data["train_images"], data["val_images"]])
    pool_y = np.concatenate([data["train_labels"], data["val_labels"]])
    test_x, test_y = data["test_images"], data["test_labels"]

    known_names, known_modality = KNOWN_DATASETS.get(source.stem.lower(), (None, None))
    num_classes = int(max(pool_y.max(initial=0), test_y.max(initial=0))) + 1
    class_names = list(class_names or known_names or [f"class-{i}" for i in range(num_classes)])
    if len(class_names) < num_classes:
        raise ValueError(
            f"{source}: labels go up to {num_classes - 1} but only {len(class_names)} class "
            f"names were given ({class_names})"
        )
    modality = modality or known_modality or "unknown"
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


def read_manifest(out: Path) -> dict | None:
    try:
        manifest = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _complete(out: Path, manifest: dict) -> bool:
    """Cheap check that every site of the manifest is still there with all its images."""
    for site, c in manifest.get("counts", {}).items():
        images = out / site / "images"
        if not (out / site / "labels.csv").is_file() or not images.is_dir():
            return False
        if len(os.listdir(images)) != sum(c):
            return False
    return True


def ensure_demo_data(out: Path, hospitals: int = 5, alpha: float = 0.5, seed: int = 0) -> Path:
    """Prepare the vendored PneumoniaMNIST into `out` unless it is already there.

    A no-op (a hash of the 4 MB npz, a manifest read, a few listdirs) when `out` holds a
    complete preparation with the same parameters and source. Safe to call from several
    processes at once: the check and the write happen under one lock, so late callers wait
    for the first and then find its output complete.
    """
    out = Path(out).resolve()
    with _locked(out):
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
            if all(params.get(k) == v for k, v in wanted.items()) and _complete(out, manifest):
                return out
        _prepare_from_npz_locked(DEFAULT_SOURCE, out, hospitals, "dirichlet", alpha, seed)
    return out
