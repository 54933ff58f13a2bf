"""Defaults by task: what `"auto"` in the run config means for the data at hand.

The run-config keys in `AUTO_KEYS` default to "auto". The server resolves them once, from its
holdout's dataset.json (task, 2D or 3D), with the recipe below, and sends the resolved values
to every hospital with each message (`common.protocol.RoundPlan.recipe`), so all nodes train
the same model the same way. Any key set explicitly (`-c 'learning-rate=0.02'`) stays as set.

Every recipe was measured on 2 cores (docs/benchmarks.md); the numbers there are the reason for
each value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

AUTO = "auto"
AUTO_KEYS = (
    "model",
    "learning-rate",
    "learning-rate-schedule",
    "local-epochs",
    "batch-size",
    "max-physical-batch",
    "num-server-rounds",
    "augmentation",
    "image-size",
    "model-width",
    "structure-weight",
    "test-time-flips",
    "holdout-every",
)


@dataclass(frozen=True)
class Recipe:
    name: str
    values: dict[str, Any]  # run-config keys (dashed) -> value (without DP, and at high epsilon)
    # values that change with the run's target epsilon under DP: key -> ((epsilon at or
    # above, value), ...), highest floor first. The DP noise per step grows as epsilon falls:
    # the step must shrink with it, and fewer trained weights carry less of that noise
    # (docs/benchmarks.md, "the whole curve" and the epsilon-1 screen).
    by_epsilon: dict[str, tuple[tuple[float, Any], ...]] = field(default_factory=dict)

    def value(self, key: str, epsilon: float, dp: bool) -> Any:
        steps = self.by_epsilon.get(key)
        if not dp or not steps:
            return self.values[key]
        for floor, value in steps:
            if epsilon >= floor:
                return value
        return steps[-1][1]


RECIPES: dict[tuple[str, int], Recipe] = {
    # scatter-cnn: fixed wavelet scattering + a small CNN, no augmentation. Below epsilon 2 a
    # head of width 16 (half the trained weights) carries less of the noise and scored higher
    # than width 32 (docs/benchmarks.md, the epsilon-1 screen; figures: "Figures behind code
    # comments"). 2 local epochs a round, not 4: half the compute, the held-out AUC at epsilon
    # 8 within a run's spread on the demo's three partitions, and less drift between hospitals
    # of skewed labels; below epsilon 2 twice the rounds (40 x 2: the same steps as 20 x 4)
    # raised the AUC on every partition (docs/benchmarks.md, "The demo under 90 s").
    ("classification", 2): Recipe(
        "2d-classification",
        {
            "model": "scatter-cnn",
            "learning-rate": 0.05,
            "learning-rate-schedule": "constant",
            "local-epochs": 2,
            "batch-size": 64,
            "max-physical-batch": 0,
            "num-server-rounds": 20,
            "augmentation": False,
            "image-size": "",
            "model-width": 0,
            "structure-weight": 1.0,
            "test-time-flips": False,
            "holdout-every": 1,
        },
        by_epsilon={
            "learning-rate": ((6.0, 0.05), (2.0, 0.02), (0.0, 0.01)),
            "model-width": ((2.0, 0), (0.0, 16)),
            "num-server-rounds": ((2.0, 20), (0.0, 40)),
        },
    ),
    # filterbank-3d: fixed 3D Gaussian-derivative invariants, centred by each hospital's one
    # released feature mean, a linear head: under DP it comes close to its pooled non-DP
    # reference where the plain 3D CNN did not learn, and more rounds of fewer epochs beat
    # 10 x 4 at batch 32 ("Figures behind code comments"). No augmentation: the features are
    # rotation invariant and memoised per case.
    ("classification", 3): Recipe(
        "3d-classification",
        {
            "model": "filterbank-3d",
            "learning-rate": 0.3,
            "learning-rate-schedule": "constant",
            "local-epochs": 2,
            "batch-size": 128,
            "max-physical-batch": 0,
            "num-server-rounds": 30,
            "augmentation": False,
            "image-size": "",
            "model-width": 0,
            "structure-weight": 1.0,
            "test-time-flips": False,
            "holdout-every": 1,
        },
    ),
    # 2D U-Net on the lung-CT phantom's slices: batch 96 in physical chunks of 48 (memory),
    # cosine decay ("Figures behind code comments").
    ("segmentation", 2): Recipe(
        "2d-segmentation",
        {
            "model": "unet",
            "learning-rate": 0.5,
            "learning-rate-schedule": "cosine",
            "local-epochs": 2,
            "batch-size": 96,
            "max-physical-batch": 48,
            "num-server-rounds": 20,
            "augmentation": False,
            "image-size": "",
            "model-width": 0,
            "structure-weight": 1.0,
            "test-time-flips": False,
            "holdout-every": 1,
        },
    ),
    # slice-unet: the 2D U-Net of the 2D recipe on one axial slice (+ 2 neighbours either side)
    # per sampled case, applied slice by slice. Small structures are emphasised early and not
    # at the end: the share of slices drawn through the case's rarest structure (0.5 -> 0.1)
    # and the structure weight of the loss (per case, background / structure voxels capped at
    # 10 -> 1) both decay along the run's cosine. The final model predicts with test-time
    # mirroring (softmax averaged over the 8 flips of the volume): under DP noise it scatters
    # small false nodules that the average removes. Both the flips and the emphasis raised the
    # nodule Dice on the lung-CT phantom, and a 3D U-Net cost far more per DP round at 64^3
    # ("Figures behind code comments"). The server scores its holdout (40 volumes here: as
    # much CPU as the three hospitals' round) after every 4th round and the last one only.
    ("segmentation", 3): Recipe(
        "3d-segmentation",
        {
            "model": "slice-unet",
            "learning-rate": 0.5,
            "learning-rate-schedule": "cosine",
            "local-epochs": 2,
            "batch-size": 96,
            "max-physical-batch": 48,
            "num-server-rounds": 40,
            "augmentation": False,
            "image-size": "",
            "model-width": 0,
            "structure-weight": 10.0,
            "test-time-flips": True,
            "holdout-every": 4,
        },
    ),
}


def recipe_for(task: str, spatial_dims: int) -> Recipe:
    try:
        return RECIPES[(task, spatial_dims)]
    except KeyError:
        raise ValueError(f"no recipe for {spatial_dims}D {task}") from None


def resolve(raw: dict[str, Any], task: str, spatial_dims: int) -> dict[str, Any]:
    """The values of the keys in `raw` (dashed run config) still "auto", by the recipe."""
    recipe = recipe_for(task, spatial_dims)
    out = {}
    dp = raw.get("dp") is not False
    epsilon = float(raw.get("target-epsilon", 8.0))
    for key in AUTO_KEYS:
        if raw.get(key) == AUTO:
            out[key] = recipe.value(key, epsilon, dp)
    return out
