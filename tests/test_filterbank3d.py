"""model="filterbank-3d" (issue 16): fixed 3D filter-bank statistics and a linear head.

Real Opacus DP-SGD (the node's own loop) on real NIfTI organ-phantom files; small volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import filterbank3d as fb
from common.config import RunConfig
from common.models import build_model
from common.privacy import calibrate_noise_multiplier, compute_epsilon
from common.site import load_site
from common.tasks import ModelSpec, task_for
from simulations.phantoms import make_phantom_sites

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
]


def _blob(size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool3d(torch.rand(1, 1, size, size, size, generator=g), 3, 1, 1)


def test_weights_hold_only_the_head_and_load_into_a_fresh_model():
    a = build_model(3, 1, 2, arch="filterbank-3d", image_size=(16, 16, 16))
    b = build_model(3, 1, 2, arch="filterbank-3d", image_size=(16, 16, 16))
    assert set(a.state_dict()) == {"head.weight", "head.bias"}  # filters never travel
    assert len(list(a.buffers())) == 3 * len(a.scales)  # ...but the model has them
    b.load_state_dict(a.state_dict())
    x = _blob()
    assert torch.allclose(a(x), b(x))
    with pytest.raises(ValueError, match='model="filterbank-3d" is for 3D'):
        build_model(2, 1, 2, arch="filterbank-3d", image_size=(16, 16))
    with pytest.raises(ValueError, match="built for"):
        a(torch.rand(1, 1, 8, 8, 8))
    assert RunConfig.parse({"model": "filterbank-3d"}).model_options["arch"] == "filterbank-3d"


def test_features_are_rotation_invariant_and_see_a_local_change():
    model = fb.FilterBank3D((16, 16, 16), 1, 2)
    x = _blob()
    turned = torch.rot90(x, 1, (2, 3)).flip(4)  # a 90 degree turn and a mirror image
    f, g = model._compute(x), model._compute(turned)
    assert torch.allclose(f, g, atol=1e-4), (f - g).abs().max()
    bumped = x.clone()
    bumped[..., 6:9, 6:9, 6:9] += 0.5  # a small local change
    assert (model._compute(bumped) - f).abs().max() > 0.1


def test_bucketed_counts_equal_counting_by_comparison():
    v = torch.randn(5, 3000) * torch.tensor([0.1, 1.0, 3.0, 10.0, 30.0])[:, None]
    out = fb._exceedances(v, fb.STD_THRESHOLDS)
    expected = []
    for t in fb.STD_THRESHOLDS:
        expected += [torch.log1p((v > t).sum(1).float()), torch.log1p((v < -t).sum(1).float())]
    assert torch.equal(torch.stack(out), torch.stack(expected))


def test_features_are_memoised_per_case_and_identical():
    model = fb.FilterBank3D((16, 16, 16), 1, 2, scales=(1.0,))
    x = torch.cat([_blob(seed=1), _blob(seed=2)])
    fb._CACHE.clear()
    first = model.features(x)
    assert len(fb._CACHE) == 2
    again = model.features(x.flip(0))  # the same cases in another order: no new entries
    assert len(fb._CACHE) == 2 and torch.equal(again, first.flip(0))
    assert torch.equal(first, model._compute(x))
    other = fb.FilterBank3D((16, 16, 16), 1, 2, scales=(2.0,))  # other filters, other key
    assert not torch.equal(other.features(x), first) and len(fb._CACHE) == 4


def test_filterbank_trains_under_real_dp_sgd_on_organ_nifti(tmp_path: Path, sgd):
    # Small: 40 organ masks written at 32^3 (2 mm voxels), read back and trained at 16^3.
    make_phantom_sites(
        "organ-3d", tmp_path, hospitals=1, cases_per_site=40, holdout_cases=2, seed=3,
        image_size=(32, 32, 32),
    )  # fmt: skip
    size = (16, 16, 16)
    train = load_site(tmp_path / "hospital-1", split="all", image_size=size, log=lambda m: 0)
    task = task_for(train.spec)
    torch.manual_seed(0)
    model = task.build_model(ModelSpec.of(train, RunConfig(model="filterbank-3d").model_options))
    before = model.head.weight.detach().clone()
    n, batch, epochs = len(train.labels), 16, 3
    sigma = calibrate_noise_multiplier(8.0, 1e-5, batch / n, epochs * -(-n // batch))
    result = sgd(
        model, train.images, train.labels, noise_multiplier=sigma, epochs=epochs,
        batch_size=batch, learning_rate=0.1,
    )  # fmt: skip
    assert 6.0 < compute_epsilon(result.history, 1e-5) <= 8.0 + 1e-6  # a real DP accounting
    assert set(model.state_dict()) == {"head.weight", "head.bias"}  # Opacus hooks removed
    assert not torch.equal(model.head.weight, before) and np.isfinite(result.loss)
