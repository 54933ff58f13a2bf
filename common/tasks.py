"""What differs between learning tasks, in one place: model, loss, metrics, "best".

The client and server apps never branch on the task themselves; they ask
`task_for(spec)` (from the data's `dataset.json`) for a `Task` and use its
methods: classification (a CNN, cross-entropy, AUC) and segmentation (a U-Net,
Dice + cross-entropy, per-class Dice).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from common import metric_registry, model_registry
from common.metrics import (
    batched_logits,
    classification_metrics,
    cross_entropy,
    predict_logits,
    roc_points,
)
from common.schedule import cosine_decay


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides a model's architecture: the data's shape and the run config's
    `model` keys. Server, nodes and the pooled reference build from it, and checkpoints carry
    it (`as_dict`), so a model can be rebuilt without the run config."""

    task: str
    spatial_dims: int
    in_channels: int
    num_classes: int
    image_size: tuple[int, ...]
    arch: str = "cnn"
    width: int | None = None
    depth: int = 3

    @classmethod
    def of(cls, data: Any, options: dict[str, Any]) -> ModelSpec:
        """For loaded site data (`load_site`) and `RunConfig.model_options`."""
        return cls(
            task=data.spec.task,
            spatial_dims=data.spatial_dims,
            in_channels=data.in_channels,
            num_classes=data.num_classes,
            image_size=tuple(int(s) for s in data.images.shape[2:]),
            **options,
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "image_size": list(self.image_size)}


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]  # what summary.json's "central" / a hospital's "eval" holds
    artifacts: dict[str, Any]  # saved beside the summary (e.g. ROC points), never sent
    logits: torch.Tensor | None = None  # classification: (N, K), predicted once
    per_case: np.ndarray | None = None  # segmentation: (N, K-1) Dice, NaN = class absent

    @property
    def probs(self) -> np.ndarray:
        return torch.softmax(self.logits.double(), dim=1).numpy()


class ClassificationTask:
    name = "classification"

    @property
    def best_metric(self) -> str:
        return metric_registry.best_key(self.name)

    @property
    def central_keys(self) -> tuple[str, ...]:
        return (*(m.name for m in metric_registry.for_task(self.name)), "loss")

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return model_registry.build(self.name, spec)

    def loss_fn(
        self, structure_weight: float = 1.0, progress: float = 0.0
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Cross-entropy (the arguments are for segmentation: a class label has no structures)."""
        return nn.CrossEntropyLoss()

    def evaluate(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5
    ) -> Evaluation:
        """Predicts once; metrics at `threshold` (class-1 probability), ROC points, logits."""
        logits = predict_logits(model, images)
        evaluation = Evaluation({}, {}, logits)
        probs, labels = evaluation.probs, targets.cpu().numpy()
        metrics = classification_metrics(probs, labels, threshold)
        metrics["loss"] = cross_entropy(probs, labels)
        return Evaluation(metrics, {"roc": roc_points(probs, labels)}, logits)

    def score(self, metrics: dict[str, float]) -> float | None:
        """The number `best` is chosen by (None when undefined, e.g. a one-class holdout)."""
        return _finite(metrics.get(self.best_metric))


class DiceCrossEntropy(nn.Module):
    """MONAI's Dice loss + torch's cross-entropy, each a mean of PER-CASE terms, with rare
    structures weighted up within each case.

    Opacus clips per-case gradients of a loss that is a mean of per-case terms, so nothing here
    may pool cases: Dice is per case (batch=False), and the weighted cross-entropy is a weighted
    mean over each case's own voxels. (torch's `weight=` normalises by the whole batch's weights,
    which would let one case change another's gradient.)
    Weights, per case: background 1; a structure (class > 0) present in the case weighs
    background voxels / its voxels (balanced), clamped to [1, `structure_weight`]; absent ones 1.
    Why: a small structure (a nodule) is a tiny share of each clipped gradient, which DP noise
    buries; weighting the organ alike (lung) dilutes it again (screen: docs/benchmarks.md).
    `structure_weight=1`: MONAI's DiceCELoss exactly.
    """

    def __init__(self, structure_weight: float = 1.0):
        super().__init__()
        from monai.losses import DiceLoss

        if not structure_weight >= 1:
            raise ValueError(f"structure-weight={structure_weight}: expected a number >= 1")
        self.structure_weight = float(structure_weight)
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, batch=False, reduction="none")
        # "none": one loss per case (Opacus' ghost clipping sets it to get per-sample losses).
        self.reduction = "mean"

    def class_weights(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """(N, K) weights from each case's own label map `labels` (N, ...)."""
        counts = torch.stack([(labels == k).flatten(1).sum(1) for k in range(num_classes)], 1)
        balanced = counts[:, :1].float() / counts.clamp(min=1).float()
        weights = balanced.clamp(1.0, self.structure_weight)
        weights[counts == 0] = 1.0
        weights[:, 0] = 1.0
        return weights

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target[:, 0].long()
        weights = self.class_weights(labels, logits.shape[1])  # (N, K)
        dice = self.dice(logits, target).flatten(1)  # (N, K): one Dice loss per case and class
        dice = (dice * weights).sum(1) / weights.sum(1)
        ce = nn.functional.cross_entropy(logits, labels, reduction="none").flatten(1)
        voxel_weights = weights.gather(1, labels.flatten(1))
        ce = (ce * voxel_weights).sum(1) / voxel_weights.sum(1)
        per_case = dice + ce
        return per_case if self.reduction == "none" else per_case.mean()


class SegmentationTask:
    """Per-voxel classes (0 = background). Metrics are flat numbers, so a hospital's
    MetricRecord and summary.json's "central" can hold them: `dice-<class>` per foreground
    class, `dice-mean` (their mean, what best.pt is chosen by) and `loss`."""

    name = "segmentation"

    @property
    def best_metric(self) -> str:
        return metric_registry.best_key(self.name)

    def __init__(self, class_names: tuple[str, ...] = ()):
        # Without names (task_for("segmentation")), classes are keyed by label value.
        self.class_names = tuple(class_names)

    def _foreground(self, num_classes: int) -> list[str]:
        names = self.class_names if len(self.class_names) == num_classes else ()
        return [names[i] if names else str(i) for i in range(1, num_classes)]

    @property
    def central_keys(self) -> tuple[str, ...]:
        fg = self._foreground(len(self.class_names)) if self.class_names else []
        keys = [(f"{m.name}-mean", *(f"{m.name}-{n}" for n in fg)) for m in self._metrics()]
        return (*(k for group in keys for k in group), "loss")

    def _metrics(self) -> list[Any]:
        return metric_registry.for_task(self.name)

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return model_registry.build(self.name, spec)

    def loss_fn(
        self, structure_weight: float = 1.0, progress: float = 0.0
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Dice + cross-entropy with small structures weighted up to `structure_weight` at the
        start of a run, decaying along the run's cosine (`progress`, common/schedule.py) to 1 —
        MONAI's DiceCELoss exactly — at its end. A constant weight leaves the final model
        predicting the structure where it is unsure (lung phantom: nodule Dice fell from ~0.50
        in round 27 to 0.41 in round 40 with the weight kept at 10)."""
        if not structure_weight >= 1:
            raise ValueError(f"structure-weight={structure_weight}: expected a number >= 1")
        return DiceCrossEntropy(1.0 + (structure_weight - 1.0) * cosine_decay(progress))

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int = 4,
        flips: bool = False,
    ) -> Evaluation:
        """Every registered segmentation metric (Dice) per class, a mean over the cases that
        have the class, their `-mean`, and the loss; `flips`: predicted with test-time
        mirroring (common/metrics.py `mirrored_logits`)."""
        from monai.networks.utils import one_hot

        loss_fn = self.loss_fn()
        per_case: dict[str, list[torch.Tensor]] = {m.name: [] for m in self._metrics()}
        loss_sum, num_classes = 0.0, 0
        for rows, logits in batched_logits(model, images, batch_size, flips):
            y = targets[rows]
            num_classes = logits.shape[1]
            loss_sum += float(loss_fn(logits, y)) * len(y)
            # max(...).indices, not argmax: argmax over the class axis of a volume's logits
            # (not the innermost axis) took ~30x as long on CPU (torch 2.13)
            pred = one_hot(logits.max(1, keepdim=True).indices, num_classes)
            truth = one_hot(y, num_classes)
            for m in self._metrics():
                per_case[m.name].append(m.compute(pred, truth))
        names = self._foreground(num_classes)
        metrics: dict[str, float] = {}
        scores = {}
        for name, parts in per_case.items():
            scores[name] = torch.cat(parts).cpu().numpy()  # (N, foreground), NaN = absent
            metrics.update(_per_class(name, scores[name], names))
        metrics["loss"] = loss_sum / max(1, len(images))
        best = next(m.name for m in self._metrics() if m.best)
        return Evaluation(metrics, {}, per_case=scores[best])

    def score(self, metrics: dict[str, float]) -> float | None:
        """Mean foreground Dice (None when no foreground class is in the holdout)."""
        return _finite(metrics.get(self.best_metric))


def _per_class(name: str, scores: np.ndarray, classes: list[str]) -> dict[str, float]:
    """`<name>-<class>` (nan-mean over cases) and `<name>-mean` (over the finite ones)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN column
        per_class = np.nanmean(scores, axis=0)
    out = {f"{name}-{n}": float(v) for n, v in zip(classes, per_class, strict=True)}
    finite = [v for v in per_class if np.isfinite(v)]
    out[f"{name}-mean"] = float(np.mean(finite)) if finite else float("nan")
    return out


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


class Task(Protocol):
    """What the apps ask of a task (classification or segmentation)."""

    name: str
    best_metric: str  # checkpoints/best.pt is chosen by this held-out metric

    @property
    def central_keys(self) -> tuple[str, ...]: ...  # held-out metrics summary.json keeps

    def build_model(self, spec: ModelSpec) -> nn.Module: ...

    def loss_fn(
        self, structure_weight: float = 1.0, progress: float = 0.0
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]: ...

    def evaluate(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> Evaluation:
        """Predict once; metrics, artifacts and (classification) the logits."""
        ...

    def score(self, metrics: dict[str, float]) -> float | None: ...


TASKS: dict[str, Any] = {
    "classification": ClassificationTask(),
    "segmentation": SegmentationTask(),
}


def task_for(task: Any) -> Task:
    """The Task for a dataset: a DatasetSpec (preferred: segmentation metrics then carry the
    class names, e.g. `dice-lung`) or just the task name from dataset.json."""
    name = getattr(task, "task", task)
    if name not in TASKS:
        raise ValueError(f"task {name!r} (dataset.json) is not one of {sorted(TASKS)}")
    if name == "segmentation" and getattr(task, "class_names", ()):
        return SegmentationTask(tuple(task.class_names))
    return TASKS[name]


def build_task_model(spec: ModelSpec) -> nn.Module:
    """The model `spec` describes (its task's: a classifier or a U-Net)."""
    return task_for(spec.task).build_model(spec)
