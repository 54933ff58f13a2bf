"""Validation releases (common/eval_release.py) and the threshold + temperature chosen from them
(common/calibration.py): a hospital sends noisy counts only; the server computes the rest."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.calibration import (
    Calibration,
    calibrated_metrics,
    choose_calibration,
    expected_calibration_error,
    operating_point_warning,
    scale_probs,
)
from common.eval_release import (
    CONFUSION,
    DICE_COUNT,
    DICE_SUM,
    EVAL_NOISE,
    HIST_NEG,
    HIST_POS,
    MARGIN_EDGES,
    local_metrics,
    release,
)
from common.metrics import classification_metrics, predict_logits
from server import report
from server.model_card import model_card
from server.report_data import RunView


class Scaled(nn.Module):
    """Logits = scale * (x0 - shift) on class 1: a model whose confidence we control."""

    def __init__(self, scale: float, shift: float = 0.0) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.scale * (x.flatten(1)[:, 0] - self.shift)
        return torch.stack([torch.zeros_like(m), m], dim=1)


def _release(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> dict:
    """A hospital's release about `model` on (x, y), as its evaluate reply computes it."""
    return release(predict_logits(model, x), y, rng=np.random.default_rng(seed))


def predict_probs(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    return torch.softmax(predict_logits(model, x), 1).numpy()


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A well-specified problem: P(y=1 | x) = sigmoid(x), x ~ N(0, 2^2).
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(n, 1, 2, 2, generator=g)
    y = (torch.rand(n, generator=g) < torch.sigmoid(x[:, 0, 0, 0])).long()
    return x, y


def test_a_release_is_the_exact_counts_plus_gaussian_noise_of_the_stated_scale():
    model = Scaled(scale=1.0)
    x, y = _data(300, seed=2)
    margins = predict_logits(model, x)[:, 1].numpy()
    exact = {
        key: np.histogram(np.clip(margins[y.numpy() == c], -12, 12), MARGIN_EDGES)[0]
        for key, c in ((HIST_NEG, 0), (HIST_POS, 1))
    }
    noise = np.concatenate(
        [
            np.asarray(_release(model, x, y, seed)[key]) - exact[key]
            for seed in range(200)
            for key in (HIST_NEG, HIST_POS)
        ]
    )
    assert abs(noise.mean()) < 0.1
    assert noise.std() == pytest.approx(EVAL_NOISE, rel=0.03)
    # One case changes exactly one count by one: the sensitivity the noise is scaled to.
    without = {
        key: np.histogram(np.clip(margins[1:][y.numpy()[1:] == c], -12, 12), MARGIN_EDGES)[0]
        for key, c in ((HIST_NEG, 0), (HIST_POS, 1))
    }
    diff = np.concatenate([exact[k] - without[k] for k in (HIST_NEG, HIST_POS)])
    assert sorted(diff)[-1] == 1 and np.abs(diff).sum() == 1


def test_temperature_scaling_from_releases_lowers_ece_of_an_overconfident_model():
    model = Scaled(scale=4.0)  # 4x overconfident: the true temperature is 4
    val, test = _data(8000, seed=0), _data(4000, seed=1)
    calib = choose_calibration([_release(model, *val)])
    assert calib is not None
    assert calib.temperature == pytest.approx(4.0, rel=0.3)
    m = calibrated_metrics(predict_probs(model, test[0]), test[1].numpy(), calib)
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


def test_threshold_comes_from_validation_releases_only():
    # Every case scores above 0.5 (margin 2..6); classes separate at margin 4.
    model = Scaled(scale=1.0)
    x_val = torch.cat([torch.full((500, 1, 1, 1), 3.0), torch.full((500, 1, 1, 1), 5.0)])
    y_val = torch.cat([torch.zeros(500), torch.ones(500)]).long()
    calib = choose_calibration([_release(model, x_val, y_val)])
    assert 3.0 < calib.threshold_margin <= 5.0
    # Swap the validation labels: the threshold moves although the model did not change,
    # so it depends on the validation data (and on nothing else, e.g. a test split).
    flipped = choose_calibration([_release(model, x_val, 1 - y_val)])
    assert flipped.threshold_margin != calib.threshold_margin
    probs = predict_probs(model, x_val)
    assert (probs[:500, 1] >= 0.5).all()
    assert (probs[:500, 1] < calib.threshold).all() and (probs[500:, 1] >= calib.threshold).all()


def test_local_metrics_from_one_release_track_the_exact_ones():
    model = Scaled(scale=1.5, shift=0.3)
    x, y = _data(3000, seed=4)
    probs = predict_probs(model, x)
    exact = classification_metrics(probs, y.numpy(), threshold=0.5)
    local = local_metrics(_release(model, x, y), threshold_margin=0.0)
    assert local["auc"] == pytest.approx(exact["auc"], abs=0.05)
    for key in ("sensitivity", "specificity", "accuracy"):
        assert local[key] == pytest.approx(exact[key], abs=0.1), key


def test_hospitals_releases_pool_into_one_calibration():
    model = Scaled(scale=1.5, shift=0.3)
    a, b = _data(3000, seed=2), _data(2000, seed=3)
    split = choose_calibration([_release(model, *a, seed=1), _release(model, *b, seed=2)])
    assert split.num_cases == pytest.approx(5000, abs=200)
    assert split.threshold_margin is not None


def test_segmentation_and_multiclass_releases():
    dice = np.array([[0.9, np.nan], [0.7, 0.5], [0.8, np.nan]])
    seg = release(None, torch.zeros(3), dice=dice, rng=np.random.default_rng(0))
    assert set(seg) == {DICE_SUM, DICE_COUNT} and len(seg[DICE_SUM]) == 2
    assert 0.0 <= local_metrics(seg, None)["dice-mean"] <= 1.0
    assert choose_calibration([seg, {}]) is None  # no histograms: no threshold to pick
    model = nn.Linear(4, 3)
    x, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    multi = release(predict_logits(model, x), y, rng=np.random.default_rng(0))
    assert set(multi) == {CONFUSION} and len(multi[CONFUSION]) == 9
    assert 0.0 <= local_metrics(multi, None)["accuracy"] <= 1.0
    assert choose_calibration([multi]) is None
    assert isinstance(Calibration(1.0, None, 0).threshold, type(None))


def _hospital_releases(noise: float, seed: int) -> list[dict]:
    """Five hospitals' releases about one model, 100 validation cases each, at `noise`."""
    model, out = Scaled(scale=1.0), []
    for h in range(5):
        x, y = _data(100, seed=100 * seed + h)
        rng = np.random.default_rng(1000 * seed + h)
        out.append(
            {**release(predict_logits(model, x), y, rng=rng, noise=noise), "release-noise": noise}
        )
    return out


@pytest.mark.parametrize("seed", range(5))
def test_an_operating_point_the_releases_cannot_place_is_flagged(seed):
    """At epsilon 8 (noise 4 per count) five hospitals' releases place a threshold; at
    epsilon 1 (noise 32) they cannot, and the report and model card say so."""
    clear = choose_calibration(_hospital_releases(4.0, seed))
    assert clear is not None and clear.informative is True
    lost = choose_calibration(_hospital_releases(32.0, seed))
    assert lost is not None and lost.informative is False
    x, y = _data(400, seed=seed + 50)
    probs = predict_probs(Scaled(scale=1.0), x)
    central = calibrated_metrics(probs, y.numpy(), lost)
    warning = operating_point_warning(central)
    assert warning is not None and "No usable operating point" in warning
    assert operating_point_warning(calibrated_metrics(probs, y.numpy(), clear)) is None

    view = RunView(Path("run"), {"rounds": [{"round": 1, "central": central}]}, None, None)
    assert warning in model_card(view) and html.escape(warning) in report.render(view, {})


def test_releases_whose_noise_ate_every_case_still_flag_the_operating_point():
    """At epsilon 1 the pooled noisy counts can sum below one case (~8 % of runs of the demo):
    no threshold, and the report and model card still say the operating point is noise."""
    releases = _hospital_releases(32.0, 0)
    for r in releases:  # the noise drew every count down
        for key in (HIST_NEG, HIST_POS):
            r[key] = [-5.0] * len(r[key])
    calib = choose_calibration(releases)
    assert calib is not None and calib.threshold is None and calib.informative is False
    x, y = _data(200, seed=7)
    central = calibrated_metrics(predict_probs(Scaled(scale=1.0), x), y.numpy(), calib)
    assert "No usable operating point" in (operating_point_warning(central) or "")
