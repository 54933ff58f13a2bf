"""What a hospital reveals about its validation part: differentially private releases only.

An evaluation at a hospital used to send its local AUC, accuracy, loss and exact per-bin case
counts. With weights of its choosing, a curious server could read a single patient's presence
out of such numbers. Now a node sends one *release* per evaluated model: counts with Gaussian
noise, each case changing one count by at most 1 (L2 sensitivity 1), so the release is the
Gaussian mechanism with noise multiplier `EVAL_NOISE`, charged to the node's ledger like a
DP-SGD step (`(noise, 1.0, 1)` in the accountant's history; the noise comes from the run's
privacy plan, `common.privacy.release_noise`; EVAL_NOISE is the default):

- binary classification: cases per (class, logit-margin bin), 24 bins of width 1 over
  [-12, 12] (`val-hist-neg`, `val-hist-pos`);
- more classes: the confusion matrix of (label, argmax) counts (`val-confusion`);
- segmentation: per foreground class, the sum of the cases' Dice and the number of cases that
  have the class (`val-dice-sum`, `val-dice-count`; one case moves 2(K-1) numbers by <= 1).

Everything else the server shows about a hospital (local AUC, sensitivity, specificity,
accuracy, Dice; the decision threshold and temperature pooled over hospitals) is computed by
the server from these releases (`local_metrics`, `common.calibration`): post-processing of
DP outputs, so it costs nothing more. Noise makes small counts negative; readers keep them
(clipping each bin at 0 would bias every sum upwards) and clip only the final rates.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from common import metric_registry

EVAL_NOISE = 8.0  # noise std per count: attack AUC on one release <= Phi(1 / (8 sqrt 2)) = 0.535
MARGIN_EDGES = np.linspace(-12.0, 12.0, 25)  # 24 bins of width 1; beyond +-12 in the end bins
HIST_NEG, HIST_POS = "val-hist-neg", "val-hist-pos"
CONFUSION = "val-confusion"
DICE_SUM, DICE_COUNT = "val-dice-sum", "val-dice-count"
RELEASE_NOISE = "release-noise"  # the std the node added per count (public: from its plan)
RELEASE_KEYS = (HIST_NEG, HIST_POS, CONFUSION, DICE_SUM, DICE_COUNT)


def release(
    logits: torch.Tensor | None,
    labels: torch.Tensor,
    dice: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    noise: float = EVAL_NOISE,
) -> dict[str, list[float]]:
    """The noisy counts a hospital sends about its validation cases (see module docstring);
    `noise` is the std per count (a DP run's plan sets it from its epsilon).

    Classification: `logits` (N, K) and `labels` (N,). Segmentation: `dice` (N, K-1), each
    case's Dice per foreground class, NaN where the case lacks the class.
    """
    rng = rng or np.random.default_rng()  # fresh OS entropy: the noise must not be guessable
    noisy = _noisy_counts(rng, noise)
    if dice is not None:
        present = np.isfinite(dice)
        sums, counts = np.where(present, dice, 0.0).sum(0), present.sum(0).astype(float)
        scale = math.sqrt(2 * dice.shape[1])  # L2 sensitivity of (sums, counts)
        return {DICE_SUM: noisy(sums, scale), DICE_COUNT: noisy(counts, scale)}
    if logits is None or logits.dim() != 2 or logits.shape[1] < 2 or labels.dim() != 1:
        return {}
    y = labels.numpy()
    if logits.shape[1] == 2:
        margin = (logits[:, 1] - logits[:, 0]).double().numpy()
        out = {}
        for key, cls in ((HIST_NEG, 0), (HIST_POS, 1)):
            counts, _ = np.histogram(np.clip(margin[y == cls], -12.0, 12.0), MARGIN_EDGES)
            out[key] = noisy(counts.astype(float), 1.0)
        return out
    k = logits.shape[1]
    confusion = np.zeros((k, k))
    np.add.at(confusion, (y, logits.argmax(1).numpy()), 1.0)
    return {CONFUSION: noisy(confusion.ravel(), 1.0)}


def _noisy_counts(rng: np.random.Generator, noise: float):
    def noisy(values: np.ndarray, sensitivity: float) -> list[float]:
        return (values + rng.normal(0.0, noise * sensitivity, values.shape)).tolist()

    return noisy


def histograms(releases: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(negatives, positives) per margin bin, summed over releases (noise kept: unbiased)."""
    neg = [np.asarray(r[HIST_NEG], float) for r in releases if HIST_NEG in r]
    pos = [np.asarray(r[HIST_POS], float) for r in releases if HIST_POS in r]
    ok = [(n, p) for n, p in zip(neg, pos, strict=False) if n.shape == p.shape == (24,)]
    if not ok:
        return None
    return np.sum([n for n, _ in ok], 0), np.sum([p for _, p in ok], 0)


def local_metrics(
    release_: dict[str, Any], threshold_margin: float | None, class_names: tuple[str, ...] = ()
) -> dict[str, float]:
    """A hospital's validation metrics, computed by the server from its release alone
    (`class_names`: segmentation's, background first, to name `dice-<class>`)."""
    if DICE_SUM in release_:
        sums = np.asarray(release_[DICE_SUM], float)
        counts = np.asarray(release_[DICE_COUNT], float)
        with np.errstate(all="ignore"):
            dice = np.clip(np.where(counts >= 1, sums / counts, np.nan), 0.0, 1.0)
        names = class_names[1:] if len(class_names) == len(dice) + 1 else range(1, len(dice) + 1)
        metric = metric_registry.best_metric(metric_registry.SEGMENTATION).name  # the released one
        out = {f"{metric}-{n}": float(v) for n, v in zip(names, dice, strict=True)}
        finite = dice[np.isfinite(dice)]
        out[f"{metric}-mean"] = float(finite.mean()) if len(finite) else math.nan
        return out
    if CONFUSION in release_:
        c = np.asarray(release_[CONFUSION], float)
        k = int(round(math.sqrt(len(c))))
        metrics = metric_registry.for_task(metric_registry.CLASSIFICATION, k)
        return {m.name: m.from_confusion(c.reshape(k, k)) for m in metrics if m.from_confusion}
    pair = histograms([release_])
    if pair is None:
        return {}
    neg, pos = pair
    above = None  # the bins called positive, at the pooled decision threshold
    if threshold_margin is not None:
        above = MARGIN_EDGES[:-1] >= threshold_margin - 1e-9
    values = {
        m.name: m.from_histograms(neg, pos, above)
        for m in metric_registry.for_task(metric_registry.CLASSIFICATION, 2)
        if m.from_histograms
    }
    return {k: v for k, v in values.items() if v is not None}
