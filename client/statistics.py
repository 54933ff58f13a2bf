"""A node's one release of the data statistic its model needs (filterbank-3d's feature mean).

The model centres its fixed features by the population mean (`common/filterbank3d.py`, why).
That mean is data, so it leaves a node only as a DP release, through the gate like any other:

- released once per run, on the ledger under (run, round 0, "statistics"), and planned into
  the run's epsilon from its first message (`PrivacyGate.plan(statistics=True)`);
- the Gaussian mechanism on the sum of the training cases' feature vectors (each of norm
  exactly `feature_norm`, clipped to it anyway), divided by the count the node already
  released (`num_examples_released`), so nothing unreleased enters it;
- it leaves inside the node's first model update (the `feature_mean` buffer); FedAvg weighs
  the updates by those released counts, so the global buffer becomes sum(noisy sums) /
  sum(released counts), the pooled estimate; after that the node never touches it again.

A request repeated for any round gets the very same release back, never a fresh draw.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch import nn

from client.gate import STATISTICS, PrivacyGate
from common.filterbank3d import STATISTICS_KEY, has_statistics, set_exact_mean, statistics_set
from common.privacy import gaussian_release, statistics_entry


def ensure_statistics(
    gate: PrivacyGate | None, plan: dict[str, Any] | None, model: nn.Module, images: torch.Tensor
) -> None:
    """Set the model's statistic if the global model does not carry one yet.

    `gate` None = training without DP (the exact mean; nothing private is claimed then)."""
    if not has_statistics(model) or statistics_set(model):
        return
    if gate is None:
        set_exact_mean(model, images)
        return
    count = float(plan["num_examples_released"])
    entry = statistics_entry(gate.budget.epsilon_run)

    def compute() -> tuple[dict, list, str]:
        noisy = gaussian_release(model.feature_sum(images), model.feature_norm, entry[0], _rng())
        mean = (noisy / count).float()
        digest = hashlib.sha256(mean.numpy().tobytes()).hexdigest()
        return {"mean": mean.tolist()}, [entry], digest

    spent = gate.spend(0, STATISTICS, entry, compute)
    buffer = getattr(model, STATISTICS_KEY)
    buffer.copy_(torch.tensor(spent.result["mean"], dtype=buffer.dtype))


def _rng() -> np.random.Generator:
    return np.random.default_rng()  # fresh OS entropy: the noise must not be reproducible
