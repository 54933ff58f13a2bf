"""Splitting one dataset's cases across simulated hospitals, and each hospital's local val part.

Used by `fedvox prepare` (common/datasets.py) and the phantoms (simulations/phantoms/sites.py).
Everything is drawn from the caller's seed / generator: the same call gives the same split.

Why not flwr-datasets' partitioners: they work on Hugging Face `datasets` objects, and
installing them adds about twenty packages (datasets, pyarrow, pandas, huggingface_hub,
aiohttp, ...) that no hospital node needs, to split an in-memory label array; and a split here
must also guarantee every hospital a minimum of cases. docs/benchmarks.md, "Own code where a
library exists".
"""

from __future__ import annotations

import numpy as np

PARTITIONS = ("iid", "dirichlet", "quantity")


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
    for _ in range(100):
        parts = _draw(rng, labels, hospitals, partition, alpha)
        if min(len(p) for p in parts) >= min_per_hospital:
            break
    else:
        parts = _top_up(rng, parts, min_per_hospital)
    return [np.sort(p).astype(np.int64) for p in parts]


def _draw(
    rng: np.random.Generator, labels: np.ndarray, hospitals: int, partition: str, alpha: float
) -> list[np.ndarray]:
    """One random draw of the partition (hospitals may come out too small)."""
    n = len(labels)
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


def _top_up(
    rng: np.random.Generator, parts: list[np.ndarray], min_per_hospital: int
) -> list[np.ndarray]:
    """Rebalance: top up short hospitals with random cases of the currently largest one."""
    parts = [rng.permutation(p) for p in parts]
    for h in range(len(parts)):
        while len(parts[h]) < min_per_hospital:
            big = int(np.argmax([len(p) for p in parts]))
            take = min_per_hospital - len(parts[h])
            take = min(take, len(parts[big]) - min_per_hospital)
            parts[h] = np.concatenate([parts[h], parts[big][:take]])
            parts[big] = parts[big][take:]
    return parts


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
