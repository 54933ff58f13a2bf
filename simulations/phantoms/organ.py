"""Organ-shape phantoms: 3D classification as hard as a real segmented-organ set.

"organ-3d": a CT-derived binary mask (0/255, 64^3) of one small organ — a flat, two-limbed shape
(like an adrenal gland) with a random pose, size and smooth low-frequency deformation, 0.2-6 %
of the voxels. Label 1 ("abnormal", ~22 %) = a small local bump (a nodule/thickening) on a random
part of its surface. "organ-ct-3d": the same organs in CT (HU): fat around them, a kidney-like
neighbour of the same density, a vessel, partial volume at the edges, scanner noise.

What makes them hard (the same things that make real masks hard):
* the abnormality is local and small (1-3.5 mm high, 1.5-3 mm wide, at 0.8-1.4 mm voxels):
  a few voxels at 64^3, about one at 32^3; the smallest bumps are hardly distinguishable;
* normal shapes have their own bumps: a fine surface undulation and high curvature at the
  limb tips and their junction, so "a convex spot" alone is not the label;
* the bump sits anywhere on the surface, the organ anywhere near the centre, in any of a range of
  poses, mirrored (left/right gland) — nothing about the position gives it away;
* hospitals differ (`OrganSite`): voxel size (anisotropic; the matrix stays 64^3, so the organ
  covers more or fewer voxels), the stored orientation (the affine; preprocessing reorients to
  RAS), organ size in their population, prevalence and, for CT, HU calibration and noise.

Difficulty knobs are the constants below; `fedvox prepare --phantom organ-3d` writes the sites.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.datasets import class_counts
from common.partition import local_val_split

ORGAN_CLASSES = ("normal", "abnormal")
PREVALENCE = 0.22  # holdout; hospitals draw around it
NODULE_RADIUS_MM = (1.5, 5.5)  # the abnormality: a ball this big ...
NODULE_OUT = (0.1, 0.6)  # ... centred this far (x radius) outside the surface, along its normal
DEFORM_MM = 1.0  # low-frequency shape variation (all cases), std of the surface displacement
ROUGH_MM = 0.35  # fine surface undulation (all cases): bump-like, but smaller
TILT_DEG = 25.0  # pose: random rotation up to this much about each axis
FOV_VOXELS = 64  # the spacings below are for a 64^3 matrix (the real data's)


@dataclass(frozen=True)
class OrganSite:
    """What one hospital's organ volumes share."""

    spacing: tuple[float, float, float]  # mm per voxel (x, y, z); the matrix is fixed
    axcodes: tuple[str, str, str]  # stored array orientation (e.g. LPS); the affine says so
    size_scale: float  # organ size in this population (1 = nominal)
    prevalence: float  # P(abnormal)
    hu_offset: float = 0.0  # organ-ct-3d only: calibration error (HU)
    hu_scale: float = 1.0  # ... gain
    noise: float = 15.0  # ... HU std of the scanner noise


HOLDOUT_ORGAN_SITE = OrganSite((1.0, 1.0, 1.0), ("R", "A", "S"), 1.0, PREVALENCE)
_AXCODES = (("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"), ("A", "R", "S"), ("R", "A", "I"))


def random_organ_site(rng: np.random.Generator) -> OrganSite:
    xy = float(rng.uniform(0.8, 1.2))
    return OrganSite(
        spacing=(xy, xy, float(rng.uniform(0.8, 1.4))),
        axcodes=_AXCODES[int(rng.integers(len(_AXCODES)))],
        size_scale=float(rng.uniform(0.9, 1.1)),
        prevalence=float(np.clip(rng.normal(PREVALENCE, 0.05), 0.12, 0.32)),
        hu_offset=float(rng.uniform(-30, 30)),
        hu_scale=float(rng.uniform(0.9, 1.1)),
        noise=float(rng.uniform(8, 25)),
    )


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    out = np.eye(3)
    for axis in range(3):
        a = np.radians(rng.uniform(-max_deg, max_deg))
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        out = out @ r
    return out


def _smooth_field(
    rng: np.random.Generator, p: np.ndarray, wavelength: tuple[float, float], modes: int = 12
) -> np.ndarray:
    """Unit-std random field at points p (N, 3) mm: a sum of plane waves of these wavelengths."""
    direction = rng.standard_normal((modes, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    k = direction * (2 * np.pi / rng.uniform(*wavelength, size=(modes, 1)))
    field = np.cos(p @ k.T + rng.uniform(0, 2 * np.pi, modes)).sum(axis=1)
    return field / np.sqrt(modes / 2)


def _limb(p: np.ndarray, centre: np.ndarray, axes: np.ndarray, angle: float) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipsoid in the organ's x-y plane."""
    c, s = np.cos(angle), np.sin(angle)
    q = p - centre
    q = np.stack([c * q[:, 0] + s * q[:, 1], -s * q[:, 0] + c * q[:, 1], q[:, 2]], axis=1)
    r = np.linalg.norm(q / axes, axis=1)
    # Radial distance to the surface: (r - 1) * |q| / r, exact along the axes.
    return (r - 1) * np.linalg.norm(q, axis=1) / np.maximum(r, 1e-6)


def organ_distance(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    size_scale: float,
    abnormal: bool,
) -> np.ndarray:
    """Approximate signed distance (mm, < 0 inside) to one organ on a RAS voxel grid."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    world = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    rot = _rotation(rng, TILT_DEG)
    if rng.random() < 0.5:
        rot = rot @ np.diag([-1.0, 1.0, 1.0])  # the left or the right gland
    p = (world - rng.uniform(-4, 4, 3)) @ rot  # organ frame: limbs in x-y, thin along z
    scale = size_scale * rng.uniform(0.85, 1.15)
    body = scale * np.array([rng.uniform(13, 19), rng.uniform(5, 7.5), rng.uniform(3, 4.5)])
    limb = body * np.array([rng.uniform(0.6, 0.9), rng.uniform(0.8, 1.0), 1.0])
    angle = rng.uniform(0.45, 1.05)  # 25-60 degrees between the limbs
    tip = np.array([-0.75 * body[0], 0.0, 0.0])  # the limbs join near one end of the body
    joint = tip + limb[0] * np.array([np.cos(angle), np.sin(angle), 0.0])
    d = np.minimum(_limb(p, np.zeros(3), body, 0.0), _limb(p, joint, limb, angle))
    # The perturbations move the surface by less than this (a field is < 5 std), so farther
    # voxels keep their side: evaluating only the shell is ~10x faster and gives the same mask.
    near = np.flatnonzero(np.abs(d) < 5 * (DEFORM_MM + ROUGH_MM))
    q = p[near]
    shell = d[near] - DEFORM_MM * _smooth_field(rng, q, (25.0, 50.0))
    shell -= ROUGH_MM * _smooth_field(rng, q, (6.0, 10.0))
    d[near] = shell
    if abnormal:  # a round nodule bulging out of a random spot of the surface (a small mass)
        spot = near[rng.choice(np.flatnonzero(np.abs(shell) < 0.5 * min(spacing)))]
        normal = _normal(d.reshape(shape), spot, spacing) @ rot  # in the organ frame
        radius = rng.uniform(*NODULE_RADIUS_MM)
        centre = p[spot] + normal * radius * rng.uniform(*NODULE_OUT)
        d = np.minimum(d, np.linalg.norm(p - centre, axis=1) - radius)
    return d.reshape(shape)


def _normal(d: np.ndarray, flat_index: int, spacing: tuple[float, float, float]) -> np.ndarray:
    """Unit outward normal (world axes) of the surface d = 0 at a voxel: grad d, central diffs."""
    i = np.unravel_index(flat_index, d.shape)
    grad = np.zeros(3)
    for axis in range(3):
        lo, hi = list(i), list(i)
        lo[axis], hi[axis] = max(i[axis] - 1, 0), min(i[axis] + 1, d.shape[axis] - 1)
        grad[axis] = (d[tuple(hi)] - d[tuple(lo)]) / max(hi[axis] - lo[axis], 1) / spacing[axis]
    return grad / (np.linalg.norm(grad) + 1e-9)


def organ_mask(
    rng: np.random.Generator, shape: tuple[int, int, int], site: OrganSite, abnormal: bool
) -> np.ndarray:
    """A binary organ mask (X, Y, Z), RAS, 0/255 uint8."""
    d = organ_distance(rng, shape, site.spacing, site.size_scale, abnormal)
    return np.where(d <= 0, 255, 0).astype(np.uint8)


def organ_ct(
    rng: np.random.Generator, shape: tuple[int, int, int], site: OrganSite, abnormal: bool
) -> np.ndarray:
    """The organ in abdominal CT (X, Y, Z), RAS, HU as int16."""
    d = organ_distance(rng, shape, site.spacing, site.size_scale, abnormal)
    voxel = float(np.mean(site.spacing))
    organ = np.clip(0.5 - d / voxel, 0.0, 1.0)  # partial volume over about one voxel
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, site.spacing, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    p = np.stack([x, y, z], axis=-1).reshape(-1, 3)
    hu = -100.0 + 15.0 * _smooth_field(rng, p, (4.0, 12.0)).reshape(shape)  # fat
    # A kidney-like neighbour as dense as the organ, partly in view, and a vessel.
    c = rng.uniform(-8, 8, 3) + np.array([0.0, -34.0, -30.0]) * rng.choice([-1, 1], 3)
    kidney = ((x - c[0]) / 22) ** 2 + ((y - c[1]) / 16) ** 2 + ((z - c[2]) / 30) ** 2 <= 1
    hu = np.where(kidney, 30.0, hu)
    vx, vy = rng.uniform(-25, 25), rng.uniform(-25, 25)
    hu = np.where((x - vx) ** 2 + (y - vy) ** 2 <= rng.uniform(4, 9) ** 2, 45.0, hu)
    hu = hu + organ * (rng.uniform(25, 45) - hu)
    hu = site.hu_offset + site.hu_scale * hu
    hu = hu + site.noise * rng.standard_normal(shape)
    return np.rint(hu).astype(np.int16)


def organ_cases(
    rng: np.random.Generator, n: int, image_size: tuple[int, ...], site: OrganSite, ct: bool
) -> tuple[np.ndarray, np.ndarray]:
    """n volumes (N, X, Y, Z) RAS and their labels (1 = abnormal) for one site."""
    # Exactly round(prevalence * n) abnormal cases (in random order): a held-out set's
    # prevalence is the site's, not a draw around it.
    labels = rng.permutation((np.arange(n) < round(site.prevalence * n)).astype(np.int64))
    make = organ_ct if ct else organ_mask
    shape = tuple(int(s) for s in image_size)
    return np.stack([make(rng, shape, site, bool(y)) for y in labels]), labels


def write_organ_site(
    site_dir: Path,
    volumes: np.ndarray,
    labels: np.ndarray,
    splits: list[str] | None,
    site: Any,  # OrganSite or any site with .spacing and .axcodes
    modality: str,
) -> None:
    """images/<case>.nii.gz stored in the site's orientation + labels.csv + dataset.json."""
    from nibabel import orientations as ornt

    from common.site.spec import auto_input_size
    from common.site.writer import new_site  # torch-heavy package: only when writing

    shape = volumes.shape[1:]
    ras = np.diag([*site.spacing, 1.0])
    ras[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(site.spacing)
    to_site = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.axcodes2ornt(site.axcodes))
    affine = ras @ ornt.inv_ornt_aff(to_site, shape)
    with new_site(Path(site_dir)) as writer:
        for i, (vol, label) in enumerate(zip(volumes, labels, strict=True)):
            split = splits[i] if splits is not None else None
            stored = ornt.apply_orientation(vol, to_site)
            writer.add_arrays(f"case-{i + 1:06d}", stored, affine, label=label, split=split)
        meta = {
            "task": "classification",
            "class_names": list(ORGAN_CLASSES),
            "modality": modality,
            "spatial_dims": 3,
            "image_size": list(auto_input_size(shape)),  # 32^3 for 64^3, as for any 3D data
        }
        writer.commit(meta)


def organ_sites(
    phantom,  # simulations.phantoms.sites.Phantom (not imported: that module imports this one)
    tmp: Path,
    hospitals: int,
    cases_per_site: int,
    holdout_cases: int,
    rng: np.random.Generator,
    size: tuple[int, ...],
    val_fraction: float,
) -> dict[str, list[int]]:
    """Write hospital-1..K (with a stratified local val part) and holdout; class counts."""
    sites = [(f"hospital-{h}", random_organ_site(rng)) for h in range(1, hospitals + 1)]
    named = []
    for name, site in [*sites, ("holdout", HOLDOUT_ORGAN_SITE)]:
        # A smaller matrix covers the same ~64 mm field of view with coarser voxels (the organ
        # must fit; small sizes are for tests), a larger one finer voxels.
        fov = tuple(s * FOV_VOXELS / n for s, n in zip(site.spacing, size, strict=True))
        named.append((name, replace(site, spacing=fov)))
    return write_sites(phantom, tmp, named, cases_per_site, holdout_cases, rng, size, val_fraction)


def write_sites(
    phantom,  # simulations.phantoms.sites.Phantom
    tmp: Path,
    named: list[tuple[str, Any]],
    cases_per_site: int,
    holdout_cases: int,
    rng: np.random.Generator,
    size: tuple[int, ...],
    val_fraction: float,
) -> dict[str, list[int]]:
    """Each (name, site) drawn by `phantom.generate(rng, n, size, site, ct)` and written;
    every site but "holdout" with a stratified local val part. Per-class counts by site."""
    ct = phantom.modality == "CT"
    counts: dict[str, list[int]] = {}
    for name, site in named:
        n = holdout_cases if name == "holdout" else cases_per_site
        volumes, labels = phantom.generate(rng, n, size, site, ct)
        splits = None
        if name != "holdout":
            splits = ["val" if v else "train" for v in local_val_split(labels, val_fraction, rng)]
        write_organ_site(tmp / name, volumes, labels, splits, site, phantom.modality)
        counts[name] = class_counts(labels, len(ORGAN_CLASSES))
    return counts
