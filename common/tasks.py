"""What differs between learning tasks, in one place: model, loss, metrics, "best".

The client and server apps never branch on the task themselves; they ask
`task_for(spec)` (from the data's `dataset.json`) for a `Task` and use its
methods. Classification lives here; segmentation adds a second `Task`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from common.metrics import evaluate_model, roc_points
from common.models import build_model


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]  # what summary.json's "central" / a hospital's "eval" holds
    artifacts: dict[str, Any]  # saved beside the summary (e.g. ROC points), never sent


class ClassificationTask:
    name = "classification"
    best_metric = "auc"  # checkpoints/best.pt is chosen by this held-out metric
    central_keys = ("auc", "accuracy", "sensitivity", "specificity", "loss")

    def build_model(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        width: int | None = None,
        depth: int = 3,
    ) -> nn.Module:
        return build_model(spatial_dims, in_channels, num_classes, width, depth)

    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return nn.CrossEntropyLoss()

    def evaluate(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5
    ) -> Evaluation:
        metrics, probs = evaluate_model(model, images, targets, threshold)
        labels = targets.cpu().numpy()
        return Evaluation(metrics, {"roc": roc_points(probs, labels)})

    def score(self, metrics: dict[str, float]) -> float | None:
        """The number `best` is chosen by (None when undefined, e.g. a one-class holdout)."""
        value = metrics.get(self.best_metric)
        return float(value) if value is not None and np.isfinite(value) else None


TASKS: dict[str, Any] = {"classification": ClassificationTask()}


def task_for(task_name: str) -> ClassificationTask:
    if task_name not in TASKS:
        raise ValueError(f"task {task_name!r} (dataset.json) is not one of {sorted(TASKS)}")
    return TASKS[task_name]
