"""Decision threshold and probability calibration, chosen on validation data only.

A classifier's probabilities are neither calibrated nor is 0.5 a good operating point:
with label-skewed hospitals and DP noise the global model often scores every case above
0.5 (accuracy = the pneumonia prevalence). Both are fixed on VALIDATION data, never on
the test split:

- each hospital sums what its local validation part says into aggregates that reveal no
  case: counts of cases per (label, score bin) and the total validation loss at a fixed
  grid of temperatures (`validation_summary`, sent as MetricRecord lists);
- the server adds the hospitals' aggregates and picks the temperature with the lowest
  validation NLL (temperature scaling, Guo et al. 2017) and the decision threshold that
  maximises Youden's J = sensitivity + specificity - 1 on the pooled histogram
  (`choose_calibration`). Youden's J ignores the class balance, so a threshold chosen
  where 74% of cases are pneumonia still holds on a test split with 62%;
- the server reports held-out accuracy/sensitivity/specificity at that threshold and the
  expected calibration error before and after scaling (`calibrated_metrics`; ECE is
  MONAI's `CalibrationErrorMetric`).

Scores are the class-1 logit margin m = logit_1 - logit_0 (binary tasks): temperature
scaling divides it by T, so a threshold on m is the same decision before and after
scaling, p = sigmoid(m / T). Multi-class models get temperature scaling and ECE but keep
argmax decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import CalibrationErrorMetric

# Fixed on both sides so hospitals' aggregates add up: margin bins of width 0.25 over
# [-12, 12] (margins beyond fall into the end bins) and 41 log-spaced temperatures 1/8..8.
MARGIN_EDGES = np.linspace(-12.0, 12.0, 97)
TEMPERATURES = np.geomspace(0.125, 8.0, 41)
# MetricRecord keys a hospital's evaluate reply carries (lists of floats).
HIST_NEG, HIST_POS, NLL_GRID = "val-hist-neg", "val-hist-pos", "val-nll-grid"
SUMMARY_KEYS = (HIST_NEG, HIST_POS, NLL_GRID)


@dataclass(frozen=True)
class Calibration:
    temperature: float
    threshold_margin: float | None  # binary: call class 1 when logit margin >= this
    num_cases: int  # validation cases it was chosen on

    @property
    def threshold(self) -> float | None:
        """The decision threshold on the (uncalibrated) softmax probability of class 1."""
        if self.threshold_margin is None:
            return None
        return float(1.0 / (1.0 + math.exp(-self.threshold_margin)))


def _nll_at_temperatures(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Summed cross-entropy of the cases at every temperature of `TEMPERATURES`."""
    logits, labels = logits.double(), labels.long()
    return np.array(
        [
            float(torch.nn.functional.cross_entropy(logits / t, labels, reduction="sum"))
            for t in TEMPERATURES
        ]
    )


def validation_summary(logits: torch.Tensor | None, labels: torch.Tensor) -> dict[str, list[float]]:
    """What a hospital reports about its validation part for calibration: aggregates only.

    `logits` are the model's (N, K) outputs on the validation cases. Returns {} when there are
    none or the model is not a case-level classifier (segmentation: `logits` is None), so
    callers need not know the task.
    """
    if logits is None or len(logits) == 0 or labels.dim() != 1:
        return {}
    if logits.dim() != 2 or logits.shape[1] < 2:
        return {}
    out = {NLL_GRID: _nll_at_temperatures(logits, labels).tolist()}
    if logits.shape[1] == 2:
        margin = (logits[:, 1] - logits[:, 0]).double().numpy()
        y = labels.numpy()
        for key, cls in ((HIST_NEG, 0), (HIST_POS, 1)):
            counts, _ = np.histogram(np.clip(margin[y == cls], -12.0, 12.0), MARGIN_EDGES)
            out[key] = counts.astype(float).tolist()
    return out


def choose_calibration(summaries: list[dict]) -> Calibration | None:
    """Temperature and (binary) threshold from the hospitals' validation aggregates.

    `summaries` are hospitals' evaluate MetricRecords (dicts); those without the keys are
    ignored. None when no hospital reported any.
    """
    grids = [np.asarray(s[NLL_GRID], float) for s in summaries if NLL_GRID in s]
    grids = [g for g in grids if g.shape == TEMPERATURES.shape and np.isfinite(g).all()]
    if not grids:
        return None
    nll = np.sum(grids, axis=0)
    temperature = float(TEMPERATURES[int(np.argmin(nll))])
    neg = sum(np.asarray(s[HIST_NEG], float) for s in summaries if HIST_NEG in s)
    pos = sum(np.asarray(s[HIST_POS], float) for s in summaries if HIST_POS in s)
    threshold = None
    num_cases = int(round(float(np.sum(neg) + np.sum(pos)))) if np.ndim(neg) else 0
    if np.ndim(neg) and np.ndim(pos) and neg.sum() > 0 and pos.sum() > 0:
        threshold = youden_threshold(neg, pos)
    return Calibration(temperature, threshold, num_cases)


def youden_threshold(hist_neg: np.ndarray, hist_pos: np.ndarray) -> float:
    """The margin bin edge maximising sensitivity + specificity on the histograms.

    Candidates are the inner edges of `MARGIN_EDGES` ("positive when margin >= edge");
    among equally good edges the middle one is taken, so a wide gap between the classes
    gives a threshold in the middle of the gap rather than at its border.
    """
    # Cases at or above edge i+1 (i = 0..len-3) = those in bins i+1..end.
    tp = np.cumsum(hist_pos[::-1])[::-1][1:]
    fp = np.cumsum(hist_neg[::-1])[::-1][1:]
    j = tp / hist_pos.sum() - fp / hist_neg.sum()
    best = np.flatnonzero(np.isclose(j, j.max()))
    return float(MARGIN_EDGES[1:-1][best[len(best) // 2]])


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    """ECE (MONAI, equal-width bins). Binary: of the class-1 probability; K classes: the
    mean over classes of each class's one-vs-rest ECE."""
    probs = torch.as_tensor(np.asarray(probs, dtype=np.float32))
    if len(probs) == 0:
        return math.nan
    k = probs.shape[1]
    onehot = torch.nn.functional.one_hot(torch.as_tensor(labels).long(), k).float()
    # MONAI bins each (batch, channel) over its spatial axis: put the cases there.
    metric = CalibrationErrorMetric(num_bins=num_bins, include_background=k > 2)
    metric(y_pred=probs.T.contiguous()[None], y=onehot.T.contiguous()[None])
    return float(metric.aggregate())


def scale_probs(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled softmax from softmax output: softmax(log p / T) = softmax(z / T)."""
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-300, None)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def calibrated_metrics(
    probs: np.ndarray, labels: np.ndarray, calibration: Calibration
) -> dict[str, float]:
    """Held-out ECE before/after temperature scaling, and the chosen operating point."""
    out = {
        "ece-raw": expected_calibration_error(probs, labels),
        "ece": expected_calibration_error(scale_probs(probs, calibration.temperature), labels),
        "temperature": calibration.temperature,
    }
    if calibration.threshold is not None:
        out["threshold"] = calibration.threshold
    return out
