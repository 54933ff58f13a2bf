"""Clinical metrics from predicted class probabilities.

AUC comes from MONAI (`compute_roc_auc`, common/metric_registry.py) and ROC points from
scikit-learn: the numbers clinicians judge fedvox by are library work, not ours. Sensitivity and
specificity are read off a confusion matrix at a decision threshold, which the
caller chooses on validation data (never on the test split).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import combinations

import numpy as np
import torch
from sklearn.metrics import roc_curve

from common import feature_cache, metric_registry


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Every registered classification metric (common/metric_registry.py) that applies:
    AUC and accuracy, and (binary only) sensitivity/specificity of class-1 at `threshold`.

    `probs` is (N, K) softmax output, `labels` (N,) integer classes. Metrics that are
    undefined for the data (e.g. AUC with one class present) are NaN.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    metrics = metric_registry.for_task(metric_registry.CLASSIFICATION, probs.shape[1])
    return {m.name: m.compute(probs, labels, threshold) for m in metrics}


def roc_points(probs: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """ROC curve points for class 1 (binary) — what the server saves per round."""
    labels = np.asarray(labels)
    if probs.shape[1] != 2 or len(np.unique(labels)) < 2:
        return {"fpr": [], "tpr": [], "thresholds": []}
    fpr, tpr, thr = roc_curve(labels, probs[:, 1])
    thr = np.minimum(thr, 1.0)  # sklearn puts +inf first; keep JSON finite
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()}


@torch.no_grad()
def batched_logits(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256, flips: bool = False
) -> Iterator[tuple[slice, torch.Tensor]]:
    """The one batched-inference loop: (rows, logits) per chunk of `images`, eval mode.
    `flips`: each chunk's `mirrored_logits` (segmentation's test-time flips)."""
    model.eval()
    feature_cache.known(images)  # a fixed front end finds its rows' features unhashed
    for start in range(0, len(images), batch_size):
        rows = slice(start, start + batch_size)
        chunk = images[rows]
        feature_cache.rows_of(chunk, images, torch.arange(start, start + len(chunk)))
        yield rows, mirrored_logits(model, chunk) if flips else model(chunk)


def mirrored_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Log of the softmax averaged over `images` and their mirror images along every subset
    of the spatial axes (2D: 4 passes, 3D: 8), each flipped back: nnU-Net's test-time
    mirroring. A model trained under DP noise scatters small false structures that do not
    survive the average (lung-CT phantom, docs/benchmarks.md). Being a log-probability, it
    works as logits: softmax and argmax give the averaged prediction."""
    spatial = range(2, images.dim())
    combos = [list(axes) for n in range(len(spatial) + 1) for axes in combinations(spatial, n)]
    total = None
    for axes in combos:
        out = model(images.flip(axes) if axes else images)
        probs = torch.softmax(out.flip(axes) if axes else out, dim=1)
        total = probs if total is None else total + probs
    # clamped: a probability that underflowed to 0 must not become an infinite loss
    return torch.log((total / len(combos)).clamp_min(torch.finfo(total.dtype).tiny))


def predict_logits(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Logits of `model` on `images` (N, C, ...), all at once (classification)."""
    outs = [logits for _, logits in batched_logits(model, images, batch_size)]
    return torch.cat(outs) if outs else torch.zeros((0, 2))


def cross_entropy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (NaN for no cases)."""
    labels = np.asarray(labels, dtype=np.int64)
    if not len(labels):
        return math.nan
    return float(-np.log(probs[np.arange(len(labels)), labels] + 1e-12).mean())
