"""Synthetic phantoms: small hospital folders with a signal a small CNN can learn.

"blobs-2d" / "blobs-3d": smooth random background ("tissue"); label 1 adds a bright Gaussian
blob at a random position, label 0 has none. Hospitals differ the way scanners do, so sites
are not IID: an intensity offset and scale, a noise level, a blob contrast and the label
prevalence are drawn per hospital. The holdout uses mid-range settings.

To add a phantom, write a `generate(rng, n, image_size, site) -> (images, labels)` and register
a `Phantom` in PHANTOMS.

"lung-ct" / "lung-ct-2d" (segmentation): chest CT volumes in HU with lung and nodule masks, and
axial slices of the same generator; see the lung-ct section below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.datasets import class_counts, write_hospital, write_site
from common.prepare_output import atomic_output, locked, write_manifest
from common.progress import track
from simulations.phantoms.lesion import lesion_cases, lesion_sites  # lesion-ct-3d, lesion-mr-3d
from simulations.phantoms.organ import ORGAN_CLASSES, organ_cases, organ_sites  # organ-3d


@dataclass(frozen=True)
class SiteStyle:
    """What makes one hospital's images differ from another's."""

    offset: float  # intensity baseline (scanner calibration)
    scale: float  # intensity gain
    noise: float  # background texture std (in units of `scale`)
    contrast: float  # blob peak height (same units): 5-7x the texture, clearly learnable
    prevalence: float  # P(label == 1)


HOLDOUT_STYLE = SiteStyle(offset=100.0, scale=20.0, noise=1.0, contrast=6.0, prevalence=0.5)


def random_style(rng: np.random.Generator) -> SiteStyle:
    return SiteStyle(
        offset=float(rng.uniform(60, 140)),
        scale=float(rng.uniform(10, 30)),
        noise=float(rng.uniform(0.7, 1.2)),
        contrast=float(rng.uniform(5.0, 7.0)),
        prevalence=float(rng.uniform(0.3, 0.7)),
    )


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """White noise low-passed by a Gaussian (in Fourier space, periodic), unit std."""
    white = rng.standard_normal(shape)
    freqs = np.meshgrid(*[np.fft.fftfreq(s) for s in shape], indexing="ij")
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * sum(f**2 for f in freqs))
    smooth = np.real(np.fft.ifftn(np.fft.fftn(white) * transfer))
    return smooth / (smooth.std() + 1e-12)


def gaussian_blob(shape: tuple[int, ...], center: np.ndarray, sigma: float) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, center, strict=True))
    return np.exp(-r2 / (2 * sigma**2))


def blob_sigma(image_size: tuple[int, ...]) -> float:
    # Larger than the background texture (sigma 1.5), so the blob is a distinct shape, not
    # just a bright patch of texture: 2.8 px at 28, 3.2 voxels at 32.
    return max(1.0, min(image_size) / 10)


def generate_blobs(
    rng: np.random.Generator, n: int, image_size: tuple[int, ...], site: SiteStyle
) -> tuple[np.ndarray, np.ndarray]:
    """n images (numpy order) and labels; label 1 = one bright blob somewhere inside."""
    sigma = blob_sigma(image_size)
    labels = (rng.random(n) < site.prevalence).astype(np.int64)
    images = np.empty((n, *image_size), dtype=np.float32)
    margin = np.ceil(2 * sigma)
    for i in range(n):
        img = site.noise * smooth_noise(rng, image_size, sigma=1.5)
        if labels[i]:
            center = rng.uniform(margin, np.asarray(image_size) - 1 - margin)
            img = img + site.contrast * gaussian_blob(image_size, center, sigma)
        images[i] = site.offset + site.scale * img
    return images, labels


@dataclass(frozen=True)
class Phantom:
    generate: Callable[..., tuple[np.ndarray, np.ndarray]]
    image_size: tuple[int, ...]  # default, numpy order
    class_names: tuple[str, ...]
    modality: str
    task: str = "classification"
    # segmentation: dataset.json's image_size (model input) for the default image_size
    train_size: tuple[int, ...] | None = None
    make_sites: Callable[..., dict[str, list[int]]] | None = None  # its own site writer


def make_phantom_sites(
    name: str,
    out: Path,
    hospitals: int,
    cases_per_site: int = 120,
    holdout_cases: int = 100,
    seed: int = 0,
    image_size: tuple[int, ...] | None = None,
    val_fraction: float = 0.15,
) -> dict[str, list[int]]:
    """Write <out>/hospital-1..K (with a local val part) + <out>/holdout for phantom `name`.
    Returns {site: per-class counts}; same safety rules as `prepare_from_npz`."""
    if name not in PHANTOMS:
        raise ValueError(f"unknown phantom {name!r}; choose from {sorted(PHANTOMS)}")
    phantom = PHANTOMS[name]
    size = tuple(int(s) for s in (image_size or phantom.image_size))
    if len(size) != len(phantom.image_size) or min(size) < 8:
        raise ValueError(
            f"phantom {name}: image_size must have {len(phantom.image_size)} sizes >= 8, got {size}"
        )
    if hospitals < 1 or cases_per_site < 2 or holdout_cases < 1:
        raise ValueError("need hospitals >= 1, cases_per_site >= 2 and holdout_cases >= 1")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    names = list(phantom.class_names)
    counts: dict[str, list[int]] = {}
    params = {
        "phantom": name,
        "hospitals": hospitals,
        "cases_per_site": cases_per_site,
        "holdout_cases": holdout_cases,
        "seed": seed,
        "image_size": list(size),
        "val_fraction": val_fraction,
    }
    seg = phantom.task == "segmentation"  # counts: cases without / with a nodule
    if writer := phantom.make_sites or (_make_segmentation_sites if seg else None):
        with locked(out), atomic_output(out) as tmp:
            counts = writer(
                phantom, tmp, hospitals, cases_per_site, holdout_cases, rng, size, val_fraction
            )
            write_manifest(tmp, params, counts, ["no-nodule", "nodule"] if seg else names)
        return counts
    with locked(out), atomic_output(out) as tmp:
        for h in range(1, hospitals + 1):
            style = random_style(rng)
            images, labels = phantom.generate(rng, cases_per_site, size, style)
            write_hospital(
                tmp / f"hospital-{h}", images, labels, val_fraction, rng, names, phantom.modality
            )
            counts[f"hospital-{h}"] = class_counts(labels, len(names))
        images, labels = phantom.generate(rng, holdout_cases, size, HOLDOUT_STYLE)
        write_site(tmp / "holdout", images, labels, None, names, phantom.modality)
        counts["holdout"] = class_counts(labels, len(names))
        write_manifest(tmp, params, counts, names)
    return counts


# ---------------------------------------------------------------------------------------------
# lung-ct: chest CT phantoms for segmentation
#
# Anatomy is drawn in millimetres, then sampled on each hospital's voxel grid, so scanners
# differ the way real ones do: voxel spacing and slice count (the same chest in more or fewer
# voxels), an HU calibration offset and gain, and a noise level. Labels: 0 background (air,
# body, spine, heart), 1 lung (parenchyma and the vessels inside it, as clinical lung masks
# do), 2 nodule. Vessels have nodule-like HU, so a model must use shape, not brightness alone.

LUNG_CLASSES = ("background", "lung", "nodule")
LUNG_FOV_MM = 256.0  # nominal field of view: 64 voxels of 4 mm
NODULE_FREE = 0.15  # share of 3D cases without a nodule (Dice then ignores them for nodule)


@dataclass(frozen=True)
class ScannerStyle:
    """One hospital's CT scanner."""

    hu_offset: float  # calibration error (HU)
    hu_scale: float  # gain
    noise: float  # HU std of the (slightly correlated) noise
    spacing_xy: float  # mm, in-plane voxel size (the matrix stays image_size[:2])
    spacing_z: float  # mm, slice spacing (the slice count follows from the field of view)


HOLDOUT_SCANNER = ScannerStyle(0.0, 1.0, 25.0, 4.0, 4.0)


def random_scanner(rng: np.random.Generator) -> ScannerStyle:
    return ScannerStyle(
        hu_offset=float(rng.uniform(-40, 40)),
        hu_scale=float(rng.uniform(0.9, 1.1)),
        noise=float(rng.uniform(10, 50)),
        spacing_xy=float(rng.uniform(3.6, 4.4)),
        spacing_z=float(rng.uniform(3.0, 5.0)),
    )


def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((points - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)


def _draw_vessels(
    rng: np.random.Generator,
    hu: np.ndarray,
    lungs: np.ndarray,
    pts: np.ndarray,
    hila: list[np.ndarray],
    lz: float,
) -> None:
    """Vessels (in place): tubes from each hilum towards random points of the lung, inside
    the lung only. `pts` are the lung voxels' positions (mm)."""
    vessel = np.zeros(len(pts), dtype=bool)
    for hilum in hila:
        near = pts[np.linalg.norm(pts - hilum, axis=1) < 0.9 * lz]
        if not len(near):
            continue
        for end in near[rng.choice(len(near), size=8)]:
            vessel |= _segment_distance(pts, hilum, end) <= rng.uniform(1.5, 3.0)
    lung_hu = hu[lungs]
    lung_hu[vessel] = 40.0
    hu[lungs] = lung_hu


def chest_ct(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    style: ScannerStyle,
    nodules: int,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """One chest volume (X, Y, Z) in HU (float32), its label map (uint8) and nodule centres (mm).

    Axes: X left-right, Y posterior-anterior, Z inferior-superior (RAS with a diagonal affine).
    """
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    ax, ay = rng.uniform(95, 115), rng.uniform(70, 85)  # body semi-axes (mm)
    hu = np.full(shape, -1000.0)
    label = np.zeros(shape, dtype=np.uint8)
    body = (x / ax) ** 2 + (y / ay) ** 2 <= 1
    hu[body] = -90.0  # subcutaneous fat
    hu[(x / (ax - 8)) ** 2 + (y / (ay - 8)) ** 2 <= 1] = 35.0  # muscle / soft tissue
    hu[(x**2 + (y + 0.72 * ay) ** 2) <= 12.0**2] = 400.0  # spine (bone)
    zc, lz = rng.uniform(-10, 10), rng.uniform(85, 105)
    heart = ((x + 0.12 * ax) / (0.3 * ax)) ** 2 + ((y - 0.2 * ay) / (0.38 * ay)) ** 2 + (
        (z - zc + 0.35 * lz) / (0.5 * lz)
    ) ** 2 <= 1
    lungs = np.zeros(shape, dtype=bool)
    hila = []
    for side in (-1, 1):
        cx = side * rng.uniform(0.47, 0.53) * ax
        sx, sy = rng.uniform(0.36, 0.42) * ax, rng.uniform(0.64, 0.74) * ay
        lung = ((x - cx) / sx) ** 2 + ((y + 0.05 * ay) / sy) ** 2 + ((z - zc) / lz) ** 2 <= 1
        lungs |= lung & ~heart & ((x / (ax - 14)) ** 2 + (y / (ay - 14)) ** 2 <= 1)
        hila.append(np.array([cx - side * 0.6 * sx, 0.0, zc]))
    hu[lungs] = -850.0 + 25.0 * smooth_noise(rng, shape, sigma=2.0)[lungs]
    label[lungs] = 1
    pts = np.stack([x[lungs], y[lungs], z[lungs]], axis=1)
    _draw_vessels(rng, hu, lungs, pts, hila, lz)
    # Nodules: spheres well inside a lung, 6-15 mm radius, soft-tissue HU with a blurred rim.
    centres: list[np.ndarray] = []
    for _ in range(nodules):
        r = rng.uniform(6.0, 15.0)
        for _try in range(50):
            c = pts[rng.integers(len(pts))]
            d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
            sphere = d <= r
            if sphere.any() and not (sphere & ~lungs).any():
                edge = np.clip((r + 1.5 - d) / 3.0, 0.0, 1.0)  # partial volume over ~3 mm
                hu = np.where(d <= r + 1.5, np.maximum(hu, -850 + (20.0 + 850) * edge), hu)
                label[sphere] = 2
                centres.append(c)
                break
    hu = style.hu_offset + style.hu_scale * hu
    hu = hu + style.noise * smooth_noise(rng, shape, sigma=0.6)
    return hu.astype(np.float32), label, centres


def lung_ct_case(
    rng: np.random.Generator, matrix: tuple[int, ...], style: ScannerStyle
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """One case for `matrix` = (X, Y, Z) (3D) or (X, Y) (2D): (HU, labels, voxel sizes in mm).

    3D: the in-plane matrix is fixed; the slice count follows from the scanner's spacing.
    2D: the axial slice through a nodule centre (a random lung slice for nodule-free cases).
    """
    nxy = matrix[:2]
    nominal_z = matrix[2] if len(matrix) == 3 else nxy[0]
    fov_z = nominal_z * LUNG_FOV_MM / nxy[0]
    sxy = style.spacing_xy * LUNG_FOV_MM / (4.0 * nxy[0])  # keep the FOV when the matrix changes
    sz = style.spacing_z * fov_z / (4.0 * nominal_z)
    nz = max(8, int(round(fov_z / sz)))
    nodules = 0 if rng.random() < NODULE_FREE else int(rng.integers(1, 4))
    if len(matrix) == 2:
        nodules = max(nodules, int(rng.random() >= NODULE_FREE))
    hu, label, centres = chest_ct(rng, (*nxy, nz), (sxy, sxy, sz), style, nodules)
    if len(matrix) == 3:
        return hu, label, (sxy, sxy, sz)
    if centres:
        k = int(round(centres[int(rng.integers(len(centres)))][2] / sz + (nz - 1) / 2))
    else:
        k = int(rng.choice(np.flatnonzero((label == 1).any(axis=(0, 1)))))
    return hu[:, :, k], label[:, :, k], (sxy, sxy)


def write_segmentation_site(
    site_dir: Path,
    cases: list[tuple[np.ndarray, np.ndarray, tuple[float, ...]]],
    splits: list[str] | None,
    class_names: tuple[str, ...],
    modality: str,
    image_size: tuple[int, ...],
    always_present: tuple[str, ...] = (),
) -> None:
    """images/<case>.nii.gz (int16 HU) + masks/<case>.nii.gz (uint8) on one affine per case,
    labels.csv (`case[,split]`) and dataset.json ("task": "segmentation").
    Arrays are (X, Y[, Z]) with voxel sizes in mm: written as they are, diagonal affine."""
    from common.site.writer import new_site  # torch-heavy package: only when writing

    with new_site(Path(site_dir)) as writer:
        for i, (image, mask, spacing) in enumerate(cases):
            affine = np.diag([*spacing, *([1.0] * (3 - len(spacing))), 1.0])
            split = splits[i] if splits is not None else None
            image = np.rint(image).astype(np.int16)
            writer.add_arrays(f"case-{i + 1:06d}", image, affine, mask=mask, split=split)
        meta = {
            "task": "segmentation",
            "class_names": list(class_names),
            "always_present": list(always_present),
            "modality": modality,
            "spatial_dims": len(image_size),
            "image_size": list(image_size),
        }
        writer.commit(meta)


def _make_segmentation_sites(
    phantom: Phantom,
    tmp: Path,
    hospitals: int,
    cases_per_site: int,
    holdout_cases: int,
    rng: np.random.Generator,
    matrix: tuple[int, ...],
    val_fraction: float,
) -> dict[str, list[int]]:
    """Counts per site are [cases without a nodule, cases with one] (a table prepare prints)."""
    # dataset.json image_size = the model input, scaled with the written matrix (64^3 -> 32^3).
    train_size = tuple(
        max(16, int(round(t * m / d)))
        for t, m, d in zip(
            phantom.train_size or phantom.image_size, matrix, phantom.image_size, strict=True
        )
    )
    counts: dict[str, list[int]] = {}
    sites = [
        (f"hospital-{h}", random_scanner(rng), cases_per_site) for h in range(1, hospitals + 1)
    ]
    for name, style, n in [*sites, ("holdout", HOLDOUT_SCANNER, holdout_cases)]:
        cases = [phantom.generate(rng, matrix, style) for _ in track(range(n), f"drawing {name}")]
        splits = None
        if name != "holdout":
            n_val = max(1, int(round(val_fraction * n)))
            splits = ["val" if i < n_val else "train" for i in range(n)]  # ids are random anyway
        write_segmentation_site(
            tmp / name,
            cases,
            splits,
            phantom.class_names,
            phantom.modality,
            train_size,
            always_present=("lung",),
        )
        with_nodule = sum(int((m == 2).any()) for _, m, _ in cases)
        counts[name] = [n - with_nodule, with_nodule]
    return counts


PHANTOMS: dict[str, Phantom] = {
    "blobs-2d": Phantom(generate_blobs, (28, 28), ("no-blob", "blob"), "MR"),
    "blobs-3d": Phantom(generate_blobs, (32, 32, 32), ("no-blob", "blob"), "MR"),
    # 64^3 written (hospitals: 64x64 x 51-85 slices) and trained at 64^3 (slice-unet: nodules
    # are 1-4 voxels in radius there, under 2 at 32^3); 2D: 64^2
    "lung-ct": Phantom(lung_ct_case, (64, 64, 64), LUNG_CLASSES, "CT", "segmentation"),
    "lung-ct-2d": Phantom(lung_ct_case, (64, 64), LUNG_CLASSES, "CT", "segmentation", (64, 64)),
    "organ-3d": Phantom(organ_cases, (64, 64, 64), ORGAN_CLASSES, "mask", make_sites=organ_sites),
    "organ-ct-3d": Phantom(organ_cases, (64, 64, 64), ORGAN_CLASSES, "CT", make_sites=organ_sites),
    "lesion-ct-3d": Phantom(lesion_cases, (48,) * 3, ORGAN_CLASSES, "CT", make_sites=lesion_sites),
    "lesion-mr-3d": Phantom(lesion_cases, (48,) * 3, ORGAN_CLASSES, "MR", make_sites=lesion_sites),
}
