"""Local-finding phantoms: a small lesion somewhere in an organ, in CT (HU) and MRI (scanner units).

"lesion-ct-3d" / "lesion-mr-3d": a ~96 mm field of view of the upper abdomen (48^3 written, 2 mm
voxels) — a large organ (liver-like: a deformed ellipsoid in a random pose, with a fine texture)
in fat, a kidney-like neighbour partly in view, and vessels branching through the organ. Label 1
("abnormal", ~30 %) = one small lesion inside the organ: 3-7 mm in radius, an irregular
(lobulated, elongated) shape, anywhere in the organ (CT: 35-70 HU darker or, for a quarter of
them, brighter than the organ, against 8-20 HU of noise per voxel and vessels 60 HU brighter;
MRI: 30-60 % brighter than the organ on a T2-like image, against noise of 7-11 % of its signal).

What makes them hard:
* the finding is a few voxels of a volume at the model's 32^3 (3 mm voxels), a few times the
  noise per voxel: nothing in whole-volume statistics moves with it;
* normal anatomy has lesion-like spots: vessel cross-sections and branchings (brighter in CT,
  dark flow voids in MRI), the organ's texture and its edges;
* hospitals differ (`LesionSite`): in-plane voxel size and slice thickness (the matrix's slice
  count follows: the grid differs), stored orientation (axis order and flips, in the affine),
  prevalence, and the units: CT in HU with a calibration offset and gain; MRI in arbitrary
  scanner units (a gain of 150-2500), a multiplicative bias field and Rician noise.

Both are written by the organ phantoms' site writer (`organ.write_sites`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulations.phantoms.organ import _limb, _rotation, _smooth_field, write_sites

PREVALENCE = 0.3  # holdout; hospitals draw around it
FOV_MM = 96.0  # nominal field of view (all sites): 2 mm voxels at 48^3, 3 mm at 32^3
LESION_RADIUS_MM = (3.0, 7.0)
CT_CONTRAST_HU = (35.0, 70.0)  # |lesion - organ|
BRIGHT_SHARE = 0.25  # CT: share of lesions brighter than the organ (the rest are darker)
MR_CONTRAST = (0.3, 0.6)  # MRI: lesion over organ, as a share of the organ's signal
# tissue signals: CT in HU, MRI (T2-like) relative to fat
CT_HU = {"fat": -100.0, "organ": 60.0, "kidney": 150.0, "vessel": 120.0}
MR_SIGNAL = {"fat": 1.0, "organ": 0.45, "kidney": 0.7, "vessel": 0.06}


@dataclass(frozen=True)
class LesionSite:
    """What one hospital's volumes share (CT: HU gain/offset/noise; MRI: units/noise/bias)."""

    spacing: tuple[float, float, float]  # mm per voxel (x, y, z)
    matrix: tuple[int, int, int]  # voxels; the slice count follows the slice thickness
    axcodes: tuple[str, str, str]  # stored array orientation; the affine says so
    prevalence: float
    gain: float  # CT: HU gain (about 1); MRI: scanner units per unit of signal
    offset: float  # CT: HU calibration error; MRI: 0
    noise: float  # CT: HU std; MRI: std as a share of the fat signal
    bias: float = 0.0  # MRI: std of the bias field's log-amplitude


_AXCODES = (("R", "A", "S"), ("L", "P", "S"), ("A", "R", "S"), ("R", "A", "I"), ("P", "L", "S"))


def random_lesion_site(rng: np.random.Generator, size: tuple[int, ...], mr: bool) -> LesionSite:
    n = int(size[0])
    sxy = FOV_MM / n * float(rng.uniform(0.88, 1.12))
    sz = sxy * float(rng.uniform(1.0, 2.5 if mr else 1.6))  # MRI: thicker slices
    return LesionSite(
        spacing=(sxy, sxy, sz),
        matrix=(n, n, max(8, int(round(n * sxy / sz)))),
        axcodes=_AXCODES[int(rng.integers(len(_AXCODES)))],
        prevalence=float(np.clip(rng.normal(PREVALENCE, 0.05), 0.18, 0.42)),
        gain=float(rng.uniform(150, 2500) if mr else rng.uniform(0.9, 1.1)),
        offset=0.0 if mr else float(rng.uniform(-30, 30)),
        noise=float(rng.uniform(0.03, 0.05) if mr else rng.uniform(8, 20)),
        bias=float(rng.uniform(0.1, 0.3)) if mr else 0.0,
    )


def holdout_lesion_site(size: tuple[int, ...], mr: bool) -> LesionSite:
    n, s = int(size[0]), FOV_MM / int(size[0])
    mid = (1000.0, 0.0, 0.04, 0.2) if mr else (1.0, 0.0, 14.0, 0.0)
    return LesionSite((s, s, s), (n, n, n), ("R", "A", "S"), PREVALENCE, *mid)


def texture(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...], sigma_mm: float
) -> np.ndarray:
    """Unit-std Gaussian-filtered white noise (periodic), `sigma_mm` wide on any voxel grid."""
    white = rng.standard_normal(shape)
    axes = [np.fft.fftfreq(n, s) for n, s in zip(shape, spacing, strict=True)]
    freqs = np.meshgrid(*axes, indexing="ij")
    transfer = np.exp(-2 * (np.pi * sigma_mm) ** 2 * sum(f**2 for f in freqs))
    smooth = np.real(np.fft.ifftn(np.fft.fftn(white) * transfer))
    return smooth / (smooth.std() + 1e-12)


def _vessels(rng: np.random.Generator, p: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """A tree of tubes from a hilum on the organ's edge to random points inside it (bool)."""
    pts = p[inside]
    hilum = pts[np.argmax(pts @ rng.standard_normal(3))]
    tube = np.zeros(len(pts), dtype=bool)
    for end in pts[rng.choice(len(pts), size=6)]:
        mid = hilum + 0.5 * (end - hilum) + rng.normal(0, 5, 3)
        for a, b, r in ((hilum, mid, 3.0), (mid, end, 1.8)):
            t = np.clip((pts - a) @ (b - a) / max(float((b - a) @ (b - a)), 1e-9), 0.0, 1.0)
            tube |= np.linalg.norm(pts - (a + t[:, None] * (b - a)), axis=1) <= r * rng.uniform(
                0.7, 1.2
            )
    vessel = np.zeros(len(p), dtype=bool)
    vessel[inside] = tube
    return vessel


def _lesion(rng: np.random.Generator, p: np.ndarray, d: np.ndarray, voxel: float) -> np.ndarray:
    """Occupancy (0..1) of one irregular lesion well inside the organ (d: organ distance)."""
    radius = rng.uniform(*LESION_RADIUS_MM)
    inner = np.flatnonzero(d < -(radius + 3.0))
    centre = p[inner[rng.integers(len(inner))]]
    near = np.flatnonzero(np.linalg.norm(p - centre, axis=1) < 2.5 * radius)
    axes = radius * rng.uniform(0.7, 1.3, 3)
    q = (p[near] - centre) @ _rotation(rng, 90.0)
    dl = _limb(q, np.zeros(3), axes, 0.0)
    dl -= 0.2 * radius * _smooth_field(rng, q, (1.5 * radius, 3.0 * radius), modes=6)
    out = np.zeros(len(p))
    out[near] = np.clip(0.5 - dl / voxel, 0.0, 1.0)
    return out


def anatomy(
    rng: np.random.Generator, site: LesionSite, lesion: bool
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Tissue occupancies (X, Y, Z), RAS, that sum to 1 per voxel, and world points (N, 3) mm."""
    shape, spacing = site.matrix, site.spacing
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    p = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    voxel = float(np.mean(spacing))
    q = (p - rng.uniform(-6, 6, 3)) @ _rotation(rng, 30.0)
    d = _limb(q, np.zeros(3), rng.uniform([34, 26, 28], [46, 36, 40]), 0.0)
    near = np.flatnonzero(np.abs(d) < 10.0)  # the deformation (< 5 std) moves only the shell
    d[near] -= 2.0 * _smooth_field(rng, q[near], (30.0, 60.0))
    organ = np.clip(0.5 - d / voxel, 0.0, 1.0)
    c = rng.uniform(-8, 8, 3) + np.array([40.0, -40.0, -35.0]) * rng.choice([-1, 1], 3)
    kidney = _limb(p, c, np.array([28.0, 20.0, 35.0]), 0.0) <= 0
    kidney = np.where(organ > 0, 0.0, kidney.astype(float))
    vessel = np.where(_vessels(rng, p, d < -2.0), organ, 0.0)
    found = _lesion(rng, p, d, voxel) * (organ - vessel) if lesion else np.zeros(len(p))
    tissue = {"organ": organ - vessel - found, "kidney": kidney, "vessel": vessel}
    tissue["fat"] = 1.0 - organ - kidney
    tissue["lesion"] = found
    return {k: v.reshape(shape) for k, v in tissue.items()}, p


def lesion_volume(rng: np.random.Generator, site: LesionSite, lesion: bool, ct: bool) -> np.ndarray:
    """One volume (X, Y, Z), RAS: CT in HU (int16) or MRI in the scanner's units (int16)."""
    tissue, p = anatomy(rng, site, lesion)
    shape, spacing = site.matrix, site.spacing
    fine = texture(rng, shape, spacing, 2.0)
    if ct:
        base = {**CT_HU, "lesion": CT_HU["organ"]}
        sign = 1.0 if rng.random() < BRIGHT_SHARE else -1.0
        base["lesion"] += sign * rng.uniform(*CT_CONTRAST_HU)
        hu = sum(tissue[k] * base[k] for k in base) + 6.0 * fine * (1 - tissue["fat"])
        hu += 12.0 * tissue["fat"] * texture(rng, shape, spacing, 1.5)
        noise = texture(rng, shape, spacing, 0.6 * min(spacing))  # slightly correlated
        hu = site.offset + site.gain * hu + site.noise * noise
        return np.rint(hu).astype(np.int16)
    base = {**MR_SIGNAL, "lesion": MR_SIGNAL["organ"] * (1 + rng.uniform(*MR_CONTRAST))}
    signal = sum(tissue[k] * base[k] for k in base) * (1 + 0.04 * fine)
    field = np.exp(site.bias * _smooth_field(rng, p, (150.0, 300.0), modes=4)).reshape(shape)
    real = signal * field + site.noise * rng.standard_normal(shape)
    imag = site.noise * rng.standard_normal(shape)
    return np.rint(site.gain * np.hypot(real, imag)).astype(np.int16)  # magnitude: Rician


def lesion_cases(
    rng: np.random.Generator, n: int, image_size: tuple[int, ...], site: LesionSite, ct: bool
) -> tuple[np.ndarray, np.ndarray]:
    """n volumes (N, *site.matrix) RAS and their labels (1 = a lesion) for one site."""
    labels = rng.permutation((np.arange(n) < round(site.prevalence * n)).astype(np.int64))
    return np.stack([lesion_volume(rng, site, bool(y), ct) for y in labels]), labels


def lesion_sites(
    phantom,  # simulations.phantoms.sites.Phantom (not imported: that module imports this one)
    tmp,
    hospitals: int,
    cases_per_site: int,
    holdout_cases: int,
    rng: np.random.Generator,
    size: tuple[int, ...],
    val_fraction: float,
) -> dict[str, list[int]]:
    """Write hospital-1..K (each its own scanner) and holdout; per-class counts by site."""
    mr = phantom.modality != "CT"
    named = [(f"hospital-{h}", random_lesion_site(rng, size, mr)) for h in range(1, hospitals + 1)]
    named.append(("holdout", holdout_lesion_site(size, mr)))
    return write_sites(phantom, tmp, named, cases_per_site, holdout_cases, rng, size, val_fraction)
