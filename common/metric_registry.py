"""Every held-out metric fedvox reports, with how it is computed and how people read it.

The holdout evaluation (common/tasks.py), summary.json's "central" keys, the report's plots and
tables (server/report_data.py), the model card's bootstrap intervals (server/model_card.py) and
the benchmark rows read this table; none keeps its own list of names. Adding a metric is one
`register(Metric(...))` (docs/architecture.md, "Extending fedvox").

Classification metrics are functions of (probs (N, K), labels (N,), threshold) -> float, NaN
where undefined. Segmentation metrics map (predicted one-hot, target one-hot), (N, K, ...) each,
to (N, K-1) per-case, per-foreground-class scores (NaN = the case lacks the class); they are
reported as `<name>-<class>` and `<name>-mean`. AUC and Dice are MONAI's, the confusion matrix
scikit-learn's (imported inside the functions: this module is read without them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

CLASSIFICATION, SEGMENTATION = "classification", "segmentation"


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # for people (report, model card)
    task: str
    compute: Callable[..., Any]
    higher_is_better: bool = True
    binary_only: bool = False  # classification: only for two classes
    best: bool = False  # the task's score: checkpoints/best.pt is chosen by it
    # binary classification, for the model card's bootstrap: (p (R, N) class-1 probabilities,
    # y (R, N) labels, threshold) -> (R,) values of R resamples at once; None = `compute` each
    resampled: Callable[[np.ndarray, np.ndarray, float], np.ndarray] | None = None
    # a hospital's local value, computed by the server from its DP release
    # (common/eval_release.py): binary, from the noisy margin histograms (negatives, positives,
    # the bins called positive or None without a threshold; None = not without one); more
    # classes, from the noisy (label, prediction) confusion matrix. None = not released.
    from_histograms: Callable[[np.ndarray, np.ndarray, Any], float | None] | None = None
    from_confusion: Callable[[np.ndarray], float] | None = None

    def applies(self, num_classes: int) -> bool:
        return not self.binary_only or num_classes == 2


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Adds (or replaces) `metric`; the next evaluation reports it."""
    METRICS[metric.name] = metric
    return metric


def unregister(name: str) -> None:
    METRICS.pop(name, None)


def for_task(task: str, num_classes: int | None = None) -> list[Metric]:
    """The metrics of `task` (those that apply to `num_classes` when given), in order."""
    return [
        m
        for m in METRICS.values()
        if m.task == task and (num_classes is None or m.applies(num_classes))
    ]


def best_metric(task: str) -> Metric:
    return next(m for m in for_task(task) if m.best)


def best_key(task: str) -> str:
    """The summary key checkpoints/best.pt is chosen by ("auc", "dice-mean")."""
    best = best_metric(task)
    return f"{best.name}-mean" if task == SEGMENTATION else best.name


def label(key: str) -> str:
    """The people's name of a summary key ("auc" -> "AUC", "dice-mean" -> "Dice")."""
    if key in METRICS:
        return METRICS[key].label
    name, _, part = key.rpartition("-")
    if name not in METRICS:
        return key
    return METRICS[name].label if part == "mean" else f"{METRICS[name].label} {part}"


def segmentation_classes(keys: Iterable[str]) -> dict[str, str]:
    """{summary key: class name} of the best segmentation metric's per-class keys in `keys`
    ("dice-lung": "lung"; not "dice-mean")."""
    best = best_key(SEGMENTATION)
    prefix = best[: -len("mean")]
    return {k: k[len(prefix) :] for k in keys if k.startswith(prefix) and k != best}


def is_metric_key(key: str, task: str | None = None) -> bool:
    """Is `key` a registered metric's summary key (a segmentation one's `<name>-<class>`)?"""
    return any(
        key == m.name if m.task == CLASSIFICATION else key.startswith(f"{m.name}-")
        for m in METRICS.values()
        if task is None or m.task == task
    )


# -- fedvox's own metrics ---------------------------------------------------------------------


def auc(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    """MONAI's ROC AUC: binary of class 1, else the macro one-vs-rest over present classes."""
    import torch
    from monai.metrics import compute_roc_auc

    present = np.unique(labels)
    if len(present) < 2:
        return math.nan  # AUC is undefined when only one class is present
    if probs.shape[1] == 2:
        return float(compute_roc_auc(torch.as_tensor(probs[:, 1]), torch.as_tensor(labels)))
    onehot = np.eye(probs.shape[1])[labels][:, present]  # one-hot, as MONAI expects
    return float(
        compute_roc_auc(torch.as_tensor(probs[:, present]), torch.as_tensor(onehot), "macro")
    )


def predicted(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Class-1 at `threshold` (binary), else the most probable class."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(1)


def _confusion(probs: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, predicted(probs, threshold), labels=[0, 1]).ravel()


def sensitivity(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    tn, fp, fn, tp = _confusion(probs, labels, threshold)
    return float(tp / (tp + fn)) if tp + fn else math.nan


def specificity(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    tn, fp, fn, tp = _confusion(probs, labels, threshold)
    return float(tn / (tn + fp)) if tn + fp else math.nan


def accuracy(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    return float((predicted(probs, threshold) == labels).mean()) if len(labels) else math.nan


def _auc_resampled(p: np.ndarray, y: np.ndarray, threshold: float) -> np.ndarray:
    """The rank (Mann-Whitney) AUC of every resample at once."""
    from scipy.stats import rankdata

    pos = y.sum(1)
    neg = y.shape[1] - pos
    return ((rankdata(p, axis=1) * y).sum(1) - pos * (pos + 1) / 2) / (pos * neg)


def _sensitivity_resampled(p: np.ndarray, y: np.ndarray, threshold: float) -> np.ndarray:
    return ((p >= threshold) & (y == 1)).sum(1) / y.sum(1)


def _specificity_resampled(p: np.ndarray, y: np.ndarray, threshold: float) -> np.ndarray:
    return (~(p >= threshold) & (y == 0)).sum(1) / (y.shape[1] - y.sum(1))


def _accuracy_resampled(p: np.ndarray, y: np.ndarray, threshold: float) -> np.ndarray:
    return ((p >= threshold) == (y == 1)).mean(1)


def histogram_auc(neg: np.ndarray, pos: np.ndarray, above: Any = None) -> float:
    """AUC of margin histograms (Mann-Whitney; cases in one bin count as ties)."""
    if neg.sum() < 1 or pos.sum() < 1:
        return math.nan
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    value = np.sum(pos * (below + 0.5 * neg)) / (neg.sum() * pos.sum())
    return float(np.clip(value, 0.0, 1.0))


def _rate(x: float, n: float) -> float:
    """A noisy count over a noisy count, clipped to [0, 1] (NaN below one case)."""
    return float(np.clip(x / n, 0.0, 1.0)) if n >= 1 else math.nan


def _histogram_sensitivity(neg: np.ndarray, pos: np.ndarray, above: Any) -> float | None:
    return None if above is None else _rate(pos[above].sum(), pos.sum())


def _histogram_specificity(neg: np.ndarray, pos: np.ndarray, above: Any) -> float | None:
    return None if above is None else _rate(neg.sum() - neg[above].sum(), neg.sum())


def _histogram_accuracy(neg: np.ndarray, pos: np.ndarray, above: Any) -> float | None:
    if above is None:
        return None
    return _rate(pos[above].sum() + neg.sum() - neg[above].sum(), pos.sum() + neg.sum())


def _confusion_accuracy(c: np.ndarray) -> float:
    return float(np.clip(np.trace(c) / c.sum(), 0.0, 1.0)) if c.sum() >= 1 else math.nan


def dice(pred: Any, target: Any) -> Any:
    """MONAI's per-case Dice of each foreground class; NaN where the case lacks the class
    (ignore_empty), so a mean is over the cases that have the structure."""
    from monai.metrics import DiceMetric

    return DiceMetric(include_background=False, reduction="none", ignore_empty=True)(pred, target)


for _metric in (
    Metric(
        "auc",
        "AUC",
        CLASSIFICATION,
        auc,
        best=True,
        resampled=_auc_resampled,
        from_histograms=histogram_auc,
    ),
    Metric(
        "accuracy",
        "accuracy",
        CLASSIFICATION,
        accuracy,
        resampled=_accuracy_resampled,
        from_histograms=_histogram_accuracy,
        from_confusion=_confusion_accuracy,
    ),
    Metric(
        "sensitivity",
        "sensitivity",
        CLASSIFICATION,
        sensitivity,
        binary_only=True,
        resampled=_sensitivity_resampled,
        from_histograms=_histogram_sensitivity,
    ),
    Metric(
        "specificity",
        "specificity",
        CLASSIFICATION,
        specificity,
        binary_only=True,
        resampled=_specificity_resampled,
        from_histograms=_histogram_specificity,
    ),
    Metric("dice", "Dice", SEGMENTATION, dice, best=True),
):
    register(_metric)
