"""Threshold + temperature chosen on validation aggregates (common/calibration.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.calibration import (
    HIST_NEG,
    HIST_POS,
    NLL_GRID,
    Calibration,
    calibrated_metrics,
    choose_calibration,
    expected_calibration_error,
    scale_probs,
    validation_summary,
)
from common.metrics import predict_logits


class Scaled(nn.Module):
    """Logits = scale * (x0 - 0.5 * bias) on class 1: a model whose confidence we control."""

    def __init__(self, scale: float, shift: float = 0.0) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.scale * (x.flatten(1)[:, 0] - self.shift)
        return torch.stack([torch.zeros_like(m), m], dim=1)


def _summary(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """A hospital's aggregates for `model` on (x, y), as its evaluate reply computes them."""
    return validation_summary(predict_logits(model, x), y)


def predict_probs(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    return torch.softmax(predict_logits(model, x), 1).numpy()


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A well-specified problem: P(y=1 | x) = sigmoid(x), x ~ N(0, 2^2).
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(n, 1, 2, 2, generator=g)
    y = (torch.rand(n, generator=g) < torch.sigmoid(x[:, 0, 0, 0])).long()
    return x, y


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    model = Scaled(scale=4.0)  # 4x overconfident: the true temperature is 4
    val = _data(4000, seed=0)
    test = _data(4000, seed=1)
    calib = choose_calibration([_summary(model, *val)])
    assert calib is not None
    assert calib.temperature == pytest.approx(4.0, rel=0.25)
    probs = predict_probs(model, test[0])
    m = calibrated_metrics(probs, test[1].numpy(), calib)
    assert m["ece"] < 0.5 * m["ece-raw"], m
    assert m["ece-raw"] > 0.05


def test_ece_is_zero_for_perfect_calibration_and_large_for_a_confident_liar():
    labels = np.array([0, 1] * 50)
    perfect = np.stack([1 - labels, labels], 1).astype(float)
    assert expected_calibration_error(perfect, labels) == pytest.approx(0.0, abs=1e-6)
    liar = perfect[:, ::-1].copy()
    assert expected_calibration_error(liar, labels) == pytest.approx(1.0, abs=1e-6)


def test_scale_probs_matches_softmax_of_scaled_logits():
    z = torch.randn(20, 3)
    probs = torch.softmax(z, 1).numpy()
    expected = torch.softmax(z / 2.5, 1).numpy()
    np.testing.assert_allclose(scale_probs(probs, 2.5), expected, atol=1e-6)


def test_threshold_comes_from_validation_data_only():
    # Every case scores above 0.5 (margin 2..6); classes separate at margin 4.
    model = Scaled(scale=1.0)
    x_val = torch.cat([torch.full((50, 1, 1, 1), 3.0), torch.full((50, 1, 1, 1), 5.0)])
    y_val = torch.cat([torch.zeros(50), torch.ones(50)]).long()
    calib = choose_calibration([_summary(model, x_val, y_val)])
    assert 3.0 < calib.threshold_margin <= 5.0
    # Swap the validation labels: the threshold moves although the model did not change,
    # so it depends on the validation data (and on nothing else, e.g. a test split).
    flipped = choose_calibration([_summary(model, x_val, 1 - y_val)])
    assert flipped.threshold_margin != calib.threshold_margin
    # At 0.5 every case would be called positive; at the chosen threshold none of the
    # negatives are.
    probs = predict_probs(model, x_val)
    assert (probs[:50, 1] >= 0.5).all()
    assert (probs[:50, 1] < calib.threshold).all() and (probs[50:, 1] >= calib.threshold).all()


def test_hospital_aggregates_add_up_and_reveal_only_counts():
    model = Scaled(scale=1.5, shift=0.3)
    a, b = _data(300, seed=2), _data(200, seed=3)
    sa, sb = _summary(model, *a), _summary(model, *b)
    pooled = _summary(model, torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
    assert set(sa) == {HIST_NEG, HIST_POS, NLL_GRID}
    for key in (HIST_NEG, HIST_POS):
        np.testing.assert_array_equal(np.add(sa[key], sb[key]), pooled[key])
        assert all(float(c).is_integer() for c in sa[key])  # case counts, not scores
    assert sum(sa[HIST_NEG]) + sum(sa[HIST_POS]) == len(a[1])
    np.testing.assert_allclose(np.add(sa[NLL_GRID], sb[NLL_GRID]), pooled[NLL_GRID], rtol=1e-9)
    split = choose_calibration([sa, sb])
    whole = choose_calibration([pooled])
    assert split == whole
    assert split.num_cases == 500


def test_non_classifiers_and_missing_reports_give_no_calibration():
    seg = nn.Conv2d(1, 2, 1)  # (N, K, H, W) output: not a case-level classifier
    x = torch.randn(4, 1, 5, 5)
    assert _summary(seg, x, torch.zeros(4, 5, 5).long()) == {}
    assert validation_summary(None, torch.zeros(4).long()) == {}  # segmentation: no logits
    assert choose_calibration([{}, {"auc": 0.9}]) is None


def test_multiclass_gets_temperature_but_no_threshold():
    model = nn.Linear(4, 3)
    x, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    calib = choose_calibration([_summary(model, x, y)])
    assert isinstance(calib, Calibration) and calib.threshold is None
    assert calib.temperature > 0
