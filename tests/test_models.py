"""The `model` run-config key: "cnn" and "scatter-cnn" (Kymatio scattering + small CNN).

Real Kymatio filters, real Opacus DP-SGD on real NIfTI phantom files; a full Flower
simulation with model="scatter-cnn" is the benchmark's (README, issue 6)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import RunConfig
from common.models import ScatterCNN, build_model
from common.privacy import calibrate_noise_multiplier, compute_epsilon
from common.site import load_site
from common.tasks import ModelSpec, task_for
from simulations.phantoms.sites import make_phantom_sites

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
]


def test_scatter_cnn_weights_hold_no_filters_and_load_into_a_fresh_model():
    torch.manual_seed(0)
    a = build_model(2, 1, 2, arch="scatter-cnn", image_size=(28, 28))
    torch.manual_seed(1)
    b = build_model(2, 1, 2, arch="scatter-cnn", image_size=(28, 28))
    assert isinstance(a, ScatterCNN)
    # Only trained weights travel: the fixed filters are rebuilt, not sent.
    keys = list(a.state_dict())
    assert keys and not any(k.startswith("scattering") for k in keys)
    assert len(list(a.scattering.buffers())) > 0  # ...but the model does have them
    x = torch.rand(4, 1, 28, 28)
    a.eval(), b.eval()
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict(), strict=True)
    torch.testing.assert_close(a(x), b(x))
    # Two input channels give twice the scattering paths, and non-square images work.
    two = build_model(2, 2, 3, arch="scatter-cnn", image_size=(32, 24))
    assert two(torch.rand(2, 2, 32, 24)).shape == (2, 3)


def test_model_setting_errors_name_the_setting():
    with pytest.raises(ValueError, match='model="scatter-cnn" is for 2D'):
        build_model(3, 1, 2, arch="scatter-cnn", image_size=(16, 16, 16))
    with pytest.raises(ValueError, match="at least 8 pixels"):
        build_model(2, 1, 2, arch="scatter-cnn", image_size=(7, 28))
    assert build_model(2, 1, 2, arch="scatter-cnn", image_size=(8, 8))(
        torch.rand(1, 1, 8, 8)
    ).shape == (1, 2)
    with pytest.raises(ValueError, match="model='resnet': expected one of cnn, scatter-cnn"):
        RunConfig.parse({"model": "resnet"})
    # "unet" is the segmentation network's name; "cnn", its earlier name, still builds it
    # (run configs and checkpoints from before).
    seg = task_for("segmentation")
    unet_spec = ModelSpec("segmentation", 2, 1, 3, (32, 32), arch="unet")
    old_spec = ModelSpec("segmentation", 2, 1, 3, (32, 32), arch="cnn")
    assert seg.build_model(unet_spec).state_dict().keys() == (
        seg.build_model(old_spec).state_dict().keys()
    )
    with pytest.raises(ValueError, match="segmentation uses model=.cnn."):
        spec = ModelSpec("segmentation", 2, 1, 3, (32, 32), arch="scatter-cnn")
        task_for("segmentation").build_model(spec)
    with pytest.raises(ValueError, match='model="slice-unet" is for 3D volumes; these are 2D'):
        spec = ModelSpec("segmentation", 2, 1, 3, (32, 32), arch="slice-unet")
        task_for("segmentation").build_model(spec)
    with pytest.raises(ValueError, match='model="slice-unet" segments 3D volumes'):
        build_model(3, 1, 2, arch="slice-unet", image_size=(16, 16, 16))
    plain = RunConfig().resolved("classification", 2)
    assert plain.model_options == {"arch": "scatter-cnn", "width": None, "depth": 3}
    opts = RunConfig.parse({"model": "scatter-cnn", "model-width": 8, "model-depth": 3})
    assert opts.resolved("classification", 2).model_options["width"] == 8
    with pytest.raises(ValueError, match="resolve it first"):
        _ = RunConfig(model="cnn").model_options


def test_scatter_cnn_learns_a_phantom_under_real_dp_sgd(tmp_path: Path, sgd):
    make_phantom_sites("blobs-2d", tmp_path, hospitals=1, cases_per_site=200, seed=5)
    train = load_site(tmp_path / "hospital-1", split="train", log=lambda m: None)
    holdout = load_site(tmp_path / "holdout", split="all", log=lambda m: None)
    task = task_for(train.spec)
    torch.manual_seed(0)
    model = task.build_model(
        ModelSpec.of(
            train, RunConfig(model="scatter-cnn").resolved("classification", 2).model_options
        )
    )
    before = task.evaluate(model, holdout.images, holdout.labels).metrics["auc"]
    n, batch, epochs = len(train.labels), 32, 8
    steps = epochs * -(-n // batch)
    sigma = calibrate_noise_multiplier(8.0, 1e-5, batch / n, steps)
    result = sgd(
        model,
        train.images,
        train.labels,
        noise_multiplier=sigma,
        epochs=epochs,
        batch_size=batch,
        learning_rate=0.05,
    )
    assert 7.0 < compute_epsilon(result.history, 1e-5) <= 8.0 + 1e-6
    after = task.evaluate(model, holdout.images, holdout.labels).metrics["auc"]
    # The DP draws are fresh OS entropy every run: over 23 runs from these weights (AUC 0.586
    # before) the AUC spread 0.716-0.974 (median ~0.89; a CI run drew 0.728 under the earlier
    # bar of 0.75), so the bar is a clear gain that every draw so far cleared.
    assert after > before + 0.1, (before, after)
