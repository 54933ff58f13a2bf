"""Decision threshold and probability calibration, chosen on validation data only.

A classifier's probabilities are neither calibrated nor is 0.5 a good operating point:
with label-skewed hospitals and DP noise the global model often scores every case above
0.5 (accuracy = the pneumonia prevalence). Both are fixed on VALIDATION data, never on
the test split:

- each hospital releases noisy counts of its validation cases per (label, margin bin): a
  differentially private release charged to its ledger (`common.eval_release`);
- the server adds the hospitals' releases and picks the temperature with the lowest
  validation NLL over the bins (temperature scaling, Guo et al. 2017) and the decision
  threshold that maximises Youden's J = sensitivity + specificity - 1 on the pooled histogram
  (`choose_calibration`). Youden's J ignores the class balance, so a threshold chosen
  where 74% of cases are pneumonia still holds on a test split with 62%;
- the server reports held-out accuracy/sensitivity/specificity at that threshold and the
  expected calibration error before and after scaling (`calibrated_metrics`; ECE is
  MONAI's `CalibrationErrorMetric`).

Scores are the class-1 logit margin m = logit_1 - logit_0 (binary tasks): temperature
scaling divides it by T, so a threshold on m is the same decision before and after
scaling, p = sigmoid(m / T). Multi-class models keep argmax decisions and T = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import CalibrationErrorMetric
from sklearn.isotonic import IsotonicRegression

from common.eval_release import HIST_POS, MARGIN_EDGES, RELEASE_NOISE, histograms

# Temperatures tried: 41 log-spaced values 1/8..8.
TEMPERATURES = np.geomspace(0.125, 8.0, 41)


@dataclass(frozen=True)
class Calibration:
    temperature: float
    threshold_margin: float | None  # binary: call class 1 when logit margin >= this
    num_cases: int  # validation cases it was chosen on
    # Youden's J at the chosen threshold on the pooled noisy histograms, and its standard error
    # (sampling + DP noise). When J is not clearly above 0 the releases could not place a
    # threshold: the operating point is then noise, and the report and model card say so.
    youden_j: float | None = None
    youden_se: float | None = None

    @property
    def informative(self) -> bool | None:
        """Is the chosen threshold better than chance on the validation releases (J more
        than two standard errors above 0)? None without a binary threshold."""
        if self.youden_j is None or self.youden_se is None:
            return None
        return self.youden_j - 2.0 * self.youden_se > 0.0

    @property
    def threshold(self) -> float | None:
        """The decision threshold on the (uncalibrated) softmax probability of class 1."""
        if self.threshold_margin is None:
            return None
        return float(1.0 / (1.0 + math.exp(-self.threshold_margin)))


def choose_calibration(releases: list[dict]) -> Calibration | None:
    """Temperature and (binary) threshold from the hospitals' validation releases.

    `releases` are hospitals' evaluate metrics (dicts); those without histograms are
    ignored. None when no hospital released any.
    """
    pair = histograms(releases)
    if pair is None:
        return None
    neg, pos = pair
    num_cases = int(round(float(neg.sum() + pos.sum())))
    if num_cases < 1:  # the noise ate every case: nothing to choose on, and the report says so
        return Calibration(1.0, None, 0, youden_j=0.0, youden_se=1.0)
    nll = histogram_nll(np.clip(neg, 0, None), np.clip(pos, 0, None))
    temperature = float(TEMPERATURES[int(np.argmin(nll))])
    # The noise each hospital added (its reply says: `release-noise`), summed per count.
    noise_var = sum(float(r.get(RELEASE_NOISE, 0.0)) ** 2 for r in releases if HIST_POS in r)
    if neg.sum() < 1 or pos.sum() < 1:  # the noise ate a class: no threshold, J unknown
        return Calibration(temperature, None, num_cases, youden_j=0.0, youden_se=1.0)
    threshold, j, se = youden_operating_point(neg, pos, noise_var)
    return Calibration(temperature, threshold, num_cases, j, se)


def histogram_nll(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Validation NLL at every temperature, each case at its margin bin's centre."""
    centres = (MARGIN_EDGES[:-1] + MARGIN_EDGES[1:]) / 2
    m = centres[None, :] / TEMPERATURES[:, None]
    # -log sigmoid(-m) for negatives, -log sigmoid(m) for positives
    return (np.logaddexp(0, m) * neg).sum(1) + (np.logaddexp(0, -m) * pos).sum(1)


def youden_threshold(hist_neg: np.ndarray, hist_pos: np.ndarray, noise_var: float = 0.0) -> float:
    """The margin bin edge maximising sensitivity + specificity (`youden_operating_point`)."""
    return youden_operating_point(hist_neg, hist_pos, noise_var)[0]


def youden_operating_point(
    hist_neg: np.ndarray, hist_pos: np.ndarray, noise_var: float = 0.0
) -> tuple[float, float, float]:
    """(threshold, J, standard error of J): the margin bin edge maximising sensitivity +
    specificity on (noisy) histograms, and how sure the histograms are of it.

    Candidates are the inner edges of `MARGIN_EDGES` ("positive when margin >= edge"). The
    histograms carry DP noise (`noise_var`: its variance per summed count), so: (1) each
    class's cumulative counts are made monotone again (isotonic regression — a count
    never decreases along the margin; consistency post-processing of DP histograms, Hay et al.
    2010), and (2) every edge whose Youden's J is within one standard error of the best
    (sampling + DP noise) counts as equally good, and the middle one is taken. Validation J
    curves are flat near their top: on the demo, picking the single best noisy edge cost ~3
    points of held-out accuracy, the middle of the plateau ~0.5 (docs/benchmarks.md).
    """
    x = np.arange(len(hist_neg))
    cum_neg = IsotonicRegression(y_min=0).fit_transform(x, np.cumsum(hist_neg))
    cum_pos = IsotonicRegression(y_min=0).fit_transform(x, np.cumsum(hist_pos))
    n, p = max(cum_neg[-1], 1.0), max(cum_pos[-1], 1.0)
    # Positive when margin >= inner edge i: the cases in bins i+1.. (bins above that edge).
    tpr, fpr = (p - cum_pos[:-1]) / p, (n - cum_neg[:-1]) / n
    j = tpr - fpr
    i = int(np.argmax(j))
    bins_above = len(hist_neg) - 1 - i
    se = np.sqrt(
        tpr[i] * (1 - tpr[i]) / p
        + fpr[i] * (1 - fpr[i]) / n
        + noise_var * bins_above * (1 / p**2 + 1 / n**2)
    )
    near = np.flatnonzero(j >= j[i] - se)
    return float(MARGIN_EDGES[1:-1][near[len(near) // 2]]), float(j[i]), float(se)


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
    if calibration.youden_j is not None:
        out["threshold-youden-j"] = calibration.youden_j
        out["threshold-youden-se"] = calibration.youden_se
    return out


def operating_point_warning(central: dict) -> str | None:
    """A sentence for the report and model card when the run's decision threshold could not
    be placed by the hospitals' validation releases (see `Calibration.informative`)."""
    j, se = central.get("threshold-youden-j"), central.get("threshold-youden-se")
    if j is None or se is None or j - 2.0 * se > 0.0:
        return None
    why = (
        f"Youden's J {j:.2f} ± {se:.2f} on them, not clearly above chance"
        if central.get("threshold") is not None
        else "after the noise, a class (or every case) is gone from the pooled counts; the run "
        "falls back to P(positive) >= 0.5"
    )
    return (
        "No usable operating point: at this privacy level the hospitals' noisy validation "
        f"counts cannot place a decision threshold ({why}), so accuracy, sensitivity and "
        "specificity at the run's threshold (and the temperature chosen on the same counts) "
        "describe the noise, not the model. Rank by the probability (AUC), or choose a "
        "threshold on labelled local data before any use."
    )
