"""Synthetic phantoms: small hospital folders with a signal a small CNN can learn.

"blobs-2d" / "blobs-3d": smooth random background ("tissue"); label 1 adds a bright Gaussian
blob at a random position, label 0 has none. Hospitals differ the way scanners do, so sites
are not IID: an intensity offset and scale, a noise level, a blob contrast and the label
prevalence are drawn per hospital. The holdout uses mid-range settings.

To add a phantom, write a `generate(rng, n, image_size, site) -> (images, labels)` and register
a `Phantom` in PHANTOMS. (A segmentation phantom will also need masks; `Phantom.task` is
there so the writer can branch on it.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.datasets import (
    _locked,
    atomic_output,
    class_counts,
    write_hospital,
    write_manifest,
    write_site,
)


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


PHANTOMS: dict[str, Phantom] = {
    "blobs-2d": Phantom(generate_blobs, (28, 28), ("no-blob", "blob"), "MR"),
    "blobs-3d": Phantom(generate_blobs, (32, 32, 32), ("no-blob", "blob"), "MR"),
}


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
    with _locked(out), atomic_output(out) as tmp:
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
        params = {
            "phantom": name,
            "hospitals": hospitals,
            "cases_per_site": cases_per_site,
            "holdout_cases": holdout_cases,
            "seed": seed,
            "image_size": list(size),
            "val_fraction": val_fraction,
        }
        write_manifest(tmp, params, counts, names)
    return counts
