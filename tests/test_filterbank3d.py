"""model="filterbank-3d" (issue 16): fixed 3D filter-bank statistics and a linear head.

Real Opacus DP-SGD (the node's own loop) on real NIfTI organ-phantom files; small volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord
from node_messages import context, message, node_status

from client.app import train
from client.ledger import LEDGER_FILE
from common import feature_cache
from common import filterbank3d as fb
from common.config import ConfigError, RunConfig
from common.models import build_model
from common.privacy import calibrate_noise_multiplier, compute_epsilon, statistics_noise
from common.protocol import NodeReply
from common.site import load_site
from common.tasks import ModelSpec, task_for
from server.checks import UpdateChecker
from simulations.phantoms.sites import make_phantom_sites

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
    # filters never travel; the released feature mean does (set once per run)
    assert set(a.state_dict()) == {"head.weight", "head.bias", "feature_mean"}
    assert len(list(a.buffers())) == 3 * len(a.scales) + 1  # ...but the model has them
    b.load_state_dict(a.state_dict())
    x = _blob()
    assert torch.allclose(a(x), b(x))
    with pytest.raises(ValueError, match='model="filterbank-3d" is for 3D'):
        build_model(2, 1, 2, arch="filterbank-3d", image_size=(16, 16))
    with pytest.raises(ValueError, match="built for"):
        a(torch.rand(1, 1, 8, 8, 8))
    assert (
        RunConfig.parse({"model": "filterbank-3d", "model-width": 0}).model_options["arch"]
        == "filterbank-3d"
    )


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
    feature_cache.clear()
    first = model.features(x)
    assert len(feature_cache._CACHE) == 2
    again = model.features(x.flip(0))  # the same cases in another order: no new entries
    assert len(feature_cache._CACHE) == 2 and torch.equal(again, first.flip(0))
    assert torch.equal(first, model._compute(x))
    other = fb.FilterBank3D((16, 16, 16), 1, 2, scales=(2.0,))  # other filters, other key
    assert not torch.equal(other.features(x), first) and len(feature_cache._CACHE) == 4


def test_persisted_features_are_read_back_by_a_later_process_and_a_damaged_file_is_replaced(
    tmp_path: Path,
):
    model = fb.FilterBank3D((16, 16, 16), 1, 2, scales=(1.0,))
    x = torch.cat([_blob(seed=1), _blob(seed=2)])
    path = tmp_path / "cache" / feature_cache.FEATURES_FILE
    feature_cache.clear()
    with feature_cache.persisted(path):
        first = model.features(x)
    assert path.is_file()
    feature_cache.clear()  # a new process: memory empty, the file stays
    calls = []
    compute = model._compute
    model._compute = lambda batch: calls.append(len(batch)) or compute(batch)
    with feature_cache.persisted(path):
        again = model.features(x)
    assert calls == [] and torch.equal(again, first)  # read back, nothing recomputed
    path.write_bytes(b"not a torch file")
    feature_cache.clear()
    with feature_cache.persisted(path):
        assert torch.equal(model.features(x), first)
    assert calls == [2]  # computed afresh, and the file rewritten with them
    feature_cache.clear()
    with feature_cache.persisted(path):
        model.features(x)
    assert calls == [2]
    feature_cache.clear()


def test_a_changed_case_never_reuses_the_features_of_the_registered_row_it_was():
    """Batches drawn from a registered tensor find their features without hashing; a case
    changed where its fingerprint does not look (a copy, or the tensor itself in place)
    must still get its own features, not the row's it came from."""
    model = fb.FilterBank3D((16, 16, 16), 1, 2, scales=(1.0,))
    cases = torch.cat([_blob(seed=s) for s in range(4)])
    feature_cache.clear()
    feature_cache.known(cases)
    assert torch.equal(model.features(cases[torch.tensor([2, 0])]), model._compute(cases[[2, 0]]))
    assert feature_cache._SOURCES[id(cases)].keys  # found through the registration
    flat = cases[1].reshape(-1)
    sampled = set(((torch.arange(feature_cache.SAMPLES) * 2654435761) % flat.numel()).tolist())
    unseen = next(i for i in range(flat.numel()) if i not in sampled)
    before = model.features(cases[1:2].clone())  # row 1's features memoised under its key
    changed = cases[1:2].clone()
    changed.reshape(-1)[unseen] += 5.0  # same fingerprint as row 1, other bytes
    assert not torch.equal(model._compute(changed), before)
    assert torch.equal(model.features(changed), model._compute(changed))
    cases.reshape(len(cases), -1)[1, unseen] += 5.0  # the registered tensor itself, in place
    assert torch.equal(model.features(cases[1:2].clone()), model._compute(cases[1:2]))
    feature_cache.clear()


@pytest.mark.parametrize("arch, size", [("filterbank-3d", (16, 16, 16)), ("scatter-cnn", (28, 28))])
def test_an_empty_poisson_batch_passes_through_a_memoised_front_end(arch, size):
    """Poisson sampling draws empty batches on small sites; the model must answer one."""
    model = build_model(len(size), 1, 2, arch=arch, image_size=size)
    out = model(torch.zeros(0, 1, *size))
    assert out.shape == (0, 2)


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
    model = task.build_model(
        ModelSpec.of(
            train, RunConfig(model="filterbank-3d").resolved("classification", 3).model_options
        )
    )
    before = model.head.weight.detach().clone()
    n, batch, epochs = len(train.labels), 16, 3
    sigma = calibrate_noise_multiplier(8.0, 1e-5, batch / n, epochs * -(-n // batch))
    result = sgd(
        model, train.images, train.labels, noise_multiplier=sigma, epochs=epochs,
        batch_size=batch, learning_rate=0.1,
    )  # fmt: skip
    assert 6.0 < compute_epsilon(result.history, 1e-5) <= 8.0 + 1e-6  # a real DP accounting
    assert set(model.state_dict()) == {"head.weight", "head.bias", "feature_mean"}  # no hooks
    assert not torch.equal(model.head.weight, before) and np.isfinite(result.loss)


def _organ_sites(root: Path) -> Path:
    make_phantom_sites(
        "organ-3d", root, hospitals=1, cases_per_site=30, holdout_cases=4, seed=5,
        image_size=(16, 16, 16),
    )  # fmt: skip
    return root


def test_a_node_releases_its_feature_mean_once_on_its_ledger(tmp_path: Path):
    """The real ClientApp: round 1 sets the released mean (noisy, on the ledger, planned into
    the run's epsilon); a repeated round 1 gets the same release; a set mean stays as sent."""
    sites = _organ_sites(tmp_path / "sites")
    run = {
        "model": "filterbank-3d", "model-width": 0, "data-dir": str(sites),
        "state-dir": str(tmp_path / "state"), "batch-size": 8, "local-epochs": 1,
        "num-server-rounds": 2, "augmentation": False, "learning-rate": 0.1,
    }  # fmt: skip
    ctx = context(run)
    start = build_model(3, 1, 2, arch="filterbank-3d", image_size=(16, 16, 16)).state_dict()
    first = train(message(start, 1), ctx)
    assert node_status(first)[0] == "ok", node_status(first)
    mean = first.content.array_records["arrays"]["feature_mean"].numpy()
    again = train(message(start, 1), context(run))  # a lost reply, asked for again
    assert np.array_equal(again.content.array_records["arrays"]["feature_mean"].numpy(), mean)

    data = load_site(sites / "hospital-1", split="train", log=lambda m: 0)
    model = build_model(3, 1, 2, arch="filterbank-3d", image_size=(16, 16, 16))
    ledger = json.loads((tmp_path / "state" / "hospital-1" / LEDGER_FILE).read_text())
    stats = [e for e in ledger["entries"] if e.get("phase") == "statistics"]
    assert len(stats) == 1 and stats[0]["noise_multiplier"] == statistics_noise(8.0) == 3.0
    (plan,) = ledger["runs"].values()
    assert plan["statistics"] is True
    # the Gaussian mechanism's noise, at its scale: z x C per coordinate, / the released count
    d = mean.size
    exact = (model.feature_sum(data.images) / plan["num_examples_released"]).numpy()
    expected = 3.0 * model.feature_norm * np.sqrt(d) / plan["num_examples_released"]
    assert 0.8 < np.linalg.norm(mean - exact) / expected < 1.2
    epsilon = float(first.content.metric_records["metrics"]["epsilon-run"])
    assert 0 < epsilon < 8.0

    sent = {k: torch.as_tensor(v.numpy()) for k, v in first.content.array_records["arrays"].items()}
    second = train(message(sent, 2), context(run))
    assert np.array_equal(second.content.array_records["arrays"]["feature_mean"].numpy(), mean)
    ledger = json.loads((tmp_path / "state" / "hospital-1" / LEDGER_FILE).read_text())
    assert sum(e.get("phase") == "statistics" for e in ledger["entries"]) == 1


def test_the_server_takes_a_released_mean_once_and_refuses_a_changed_or_forged_one():
    cfg = RunConfig.parse({"num-server-rounds": 3, "model": "filterbank-3d"}).resolved(
        "classification", 3
    )
    checker = UpdateChecker(cfg, total_rounds=3)
    sigma = checker.sigma_max / 2
    d = 1008
    zero = {"w": np.zeros((2, d), np.float32), "feature_mean": np.zeros(d, np.float32)}
    honest = {**zero, "feature_mean": np.full(d, 0.8, np.float32)}  # norm 25 < bound
    forged = {**zero, "feature_mean": np.full(d, 1e4, np.float32)}
    replies = [_reply("a", 340.0, sigma, honest), _reply("b", 340.0, sigma, forged)]
    accepted, rejected = checker.check(replies, ArrayRecord({k: Array(v) for k, v in zero.items()}))
    assert [r.site for r in accepted] == ["a"]
    assert "feature_mean (a released mean) has norm" in rejected[0].reason
    moved = {**honest, "feature_mean": honest["feature_mean"] + 0.01}
    replies = [_reply("a", 340.0, sigma, honest), _reply("b", 340.0, sigma, moved)]
    set_ = ArrayRecord({k: Array(v) for k, v in honest.items()})
    accepted, rejected = checker.check(replies, set_)
    assert [r.site for r in accepted] == ["a"] and "may not change it" in rejected[0].reason
    with pytest.raises(ConfigError, match='strategy="fedadam" with model="filterbank-3d"'):
        RunConfig.parse({"model": "filterbank-3d", "strategy": "fedadam"})


def _reply(site: str, count: float, sigma: float, arrays: dict) -> NodeReply:
    msg = message({k: Array(v) for k, v in arrays.items()}, 1)  # a real Flower message
    return NodeReply(site, "ok", "", {"num-examples": count, "noise-multiplier": sigma}, msg)


def test_saliency_of_a_filterbank_model_is_occlusion_on_the_input_grid():
    """No convolutional grid for Grad-CAM: `fedvox predict --saliency` uses MONAI's occlusion."""
    from common.saliency import class_saliency

    torch.manual_seed(0)
    model = fb.FilterBank3D((16, 16, 16), 1, 2, scales=(1.0,))
    x = _blob(seed=4)[0]
    heat, method = class_saliency(model, x, int(model(x[None]).argmax()))
    assert method == "occlusion" and heat.shape == (1, 16, 16, 16)
    assert 0.0 <= float(heat.min()) and float(heat.max()) == 1.0  # something lowers the class
