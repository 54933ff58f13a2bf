"""Fixed features found by row (common/feature_cache.py): batches a loader gathered from a
registered tensor get their memoised features by one gather, never another case's."""

from __future__ import annotations

import pytest
import torch

from common import feature_cache
from common.models import build_model
from common.privacy import PoissonLoader

pytestmark = [pytest.mark.filterwarnings("ignore:Secure RNG turned off")]


def _cases(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 2, (n,), generator=g)


def _model() -> torch.nn.Module:
    return build_model(2, 1, 2, arch="scatter-cnn", image_size=(28, 28)).eval()


def _same_as_computed(model: torch.nn.Module, x: torch.Tensor, features: torch.Tensor) -> bool:
    """`features` are `x`'s own (scattering is per case; batches differ only in rounding)."""
    own = model.norm(model.scattering(x.contiguous()).flatten(1, 2))
    return features.shape == own.shape and torch.allclose(features, own, atol=1e-5)


def _no_per_case_lookup(*_args, **_kwargs):
    raise AssertionError("features looked up case by case")


def test_poisson_batches_of_case_rows_get_the_very_features_of_their_cases(monkeypatch):
    images, labels = _cases()
    model = _model()
    feature_cache.clear()
    feature_cache.known(images)
    loader = PoissonLoader(feature_cache.CaseRows(images, labels), steps=4, expected_batch_size=10)
    with torch.no_grad():
        for _ in range(3):  # Poisson batches: a few epochs until every row was drawn
            for x, _y in loader:
                assert _same_as_computed(model, x, model.front(x))
        full = torch.arange(len(images))
        every = images[full]
        feature_cache.rows_of(every, images, full)
        model.front(every)  # any row not drawn yet is computed now
        monkeypatch.setattr(feature_cache, "_keys", _no_per_case_lookup)
        for x, y in loader:  # now one gather a batch, and still each case's own features
            assert _same_as_computed(model, x, model.front(x))
            assert len(x) == len(y)
    feature_cache.clear()


def test_a_changed_batch_or_source_never_gets_the_rows_stale_features():
    images, labels = _cases(seed=1)
    model = _model()
    feature_cache.clear()
    feature_cache.known(images)
    index = torch.tensor([3, 1, 4])
    with torch.no_grad():
        batch = images[index]
        feature_cache.rows_of(batch, images, index)
        model.front(batch)  # rows 3, 1, 4 now in the dense table
        changed = images[index]
        feature_cache.rows_of(changed, images, index)
        changed.add_(0.5)  # the batch changed after it was noted (e.g. augmented in place)
        assert _same_as_computed(model, changed, model.front(changed))
        images[1].mul_(0.5)  # the registered tensor itself, in place
        again = images[index]
        feature_cache.rows_of(again, images, index)
        assert _same_as_computed(model, again, model.front(again))
    feature_cache.clear()


def test_a_dense_table_stays_within_its_budget(monkeypatch):
    images, labels = _cases(n=8, seed=2)
    model = _model()
    feature_cache.clear()
    monkeypatch.setattr(feature_cache, "DENSE_BYTES", 1)  # no table fits: per case it is
    feature_cache.known(images)
    index = torch.arange(8)
    with torch.no_grad():
        batch = images[index]
        feature_cache.rows_of(batch, images, index)
        first = model.front(batch)
        assert not feature_cache._SOURCES[id(images)].dense
        batch = images[index]
        feature_cache.rows_of(batch, images, index)
        assert torch.equal(model.front(batch), first)
    feature_cache.clear()
