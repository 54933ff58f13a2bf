"""Defaults by task: what `"auto"` in the run config means for the data at hand.

The run-config keys in `AUTO_KEYS` default to "auto". The server resolves them once, from its
holdout's dataset.json (task, 2D or 3D), with the recipe below, and sends the resolved values
to every hospital with each message (`common.protocol.RoundPlan.recipe`), so all nodes train
the same model the same way. Any key set explicitly (`-c 'learning-rate=0.02'`) stays as set.

Every recipe was measured on 2 cores (docs/benchmarks.md); the numbers there are the reason for
each value.
"""

from __future__ import annotations

from dataclasses import dataclass
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
)


@dataclass(frozen=True)
class Recipe:
    name: str
    values: dict[str, Any]  # run-config keys (dashed) -> value
    # learning rate by the run's target epsilon: the DP noise per step grows as epsilon falls,
    # and the step must shrink with it (docs/benchmarks.md, "the whole curve")
    rates: tuple[tuple[float, float], ...] = ()  # (epsilon at or above, learning rate)

    def learning_rate(self, epsilon: float, dp: bool) -> float:
        if not dp or not self.rates:
            return float(self.values["learning-rate"])
        for floor, rate in self.rates:
            if epsilon >= floor:
                return rate
        return self.rates[-1][1]


RECIPES: dict[tuple[str, int], Recipe] = {
    # scatter-cnn: fixed wavelet scattering + a small CNN. PneumoniaMNIST, 5 hospitals,
    # epsilon 8: AUC 0.953 +- 0.015 over 3 seeds (20 rounds x 4 epochs, lr 0.05, no augmentation).
    ("classification", 2): Recipe(
        "2d-classification",
        {
            "model": "scatter-cnn",
            "learning-rate": 0.05,
            "learning-rate-schedule": "constant",
            "local-epochs": 4,
            "batch-size": 64,
            "max-physical-batch": 0,
            "num-server-rounds": 20,
            "augmentation": False,
            "image-size": "",
        },
        rates=((6.0, 0.05), (2.0, 0.02), (0.0, 0.01)),
    ),
    # Placeholder (blob phantom only). The organ phantom's screen (docs/benchmarks.md, issue 16)
    # has model="filterbank-3d" at FL-DP eps 8 0.70-0.78 vs pooled 0.84-0.89; it becomes the
    # recipe once measured end to end through Flower.
    ("classification", 3): Recipe(
        "3d-classification",
        {
            "model": "cnn",
            "learning-rate": 0.01,
            "learning-rate-schedule": "constant",
            "local-epochs": 4,
            "batch-size": 64,
            "max-physical-batch": 0,
            "num-server-rounds": 10,
            "augmentation": True,
            "image-size": "",
        },
    ),
    # lung-CT phantom 2D, 3 hospitals, epsilon 8: Dice lung 0.986, nodule 0.847 (batch 96 in
    # physical chunks of 48, cosine decay).
    ("segmentation", 2): Recipe(
        "2d-segmentation",
        {
            "model": "cnn",
            "learning-rate": 0.5,
            "learning-rate-schedule": "cosine",
            "local-epochs": 2,
            "batch-size": 96,
            "max-physical-batch": 48,
            "num-server-rounds": 20,
            "augmentation": False,
            "image-size": "",
        },
    ),
    ("segmentation", 3): Recipe(
        "3d-segmentation",
        {
            "model": "cnn",
            "learning-rate": 0.5,
            "learning-rate-schedule": "cosine",
            "local-epochs": 2,
            "batch-size": 16,
            "max-physical-batch": 8,
            "num-server-rounds": 10,
            "augmentation": False,
            "image-size": "",
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
    for key in AUTO_KEYS:
        if raw.get(key) == AUTO:
            if key == "learning-rate":
                dp = raw.get("dp") is not False
                out[key] = recipe.learning_rate(float(raw.get("target-epsilon", 8.0)), dp)
            else:
                out[key] = recipe.values[key]
    return out
