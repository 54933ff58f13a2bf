"""model="mil-3d": fixed local 3D features, a small per-position scorer, soft-maximum pooling.

Real Opacus DP-SGD through the real ClientApp on real NIfTI lesion-phantom files; small volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from node_messages import context, message, node_status

from client.app import train
from client.ledger import LEDGER_FILE
from common import model_registry
from common.config import RunConfig
from common.mil3d import Mil3D
from common.models import build_model
from simulations.phantoms.sites import make_phantom_sites

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
]
SIZE = (16, 16, 16)


def _spot(at: tuple[int, int, int] | None, seed: int = 0) -> torch.Tensor:
    """A textured volume (the same for a seed) with one small bright spot centred at `at`."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * F.avg_pool3d(torch.rand(1, 1, *SIZE, generator=g), 3, 1, 1)
    if at is None:
        return x
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in SIZE], indexing="ij"))
    r2 = ((grid - torch.tensor(at)[:, None, None, None]) ** 2).sum(0)
    return x + 0.5 * torch.exp(-r2 / 2.0)


def test_registry_entry_builds_a_small_model_whose_weights_are_only_the_scorer():
    entry = model_registry.get("mil-3d")
    assert entry.tasks == ("classification",) and entry.spatial_dims == (3,)
    assert not entry.releases_statistic  # each case standardises itself: nothing else leaves
    options = RunConfig.parse({"model": "mil-3d", "model-width": 0}).model_options
    model = build_model(3, 1, 2, arch=options["arch"], image_size=SIZE)
    assert set(model.state_dict()) == {"hidden.weight", "hidden.bias", "score.weight", "score.bias"}
    assert sum(p.numel() for p in model.parameters()) < 5000  # DP noise lands on few weights
    with pytest.raises(ValueError, match='model="mil-3d" is for 3D'):
        build_model(2, 1, 2, arch="mil-3d", image_size=(16, 16))
    with pytest.raises(ValueError, match="built for"):
        model(torch.rand(1, 1, 8, 8, 8))
    assert model(torch.zeros(0, 1, *SIZE)).shape == (0, 2)  # an empty Poisson batch


def test_a_local_finding_scores_the_same_wherever_it_is_and_only_where_it_is():
    torch.manual_seed(0)
    model = Mil3D(SIZE, 1, 2, scales=(1.0,))
    a, b = _spot((6, 6, 6)), _spot((10, 8, 6))  # moved by whole cells, away from the borders
    fa, plain = model._compute(a).float(), model._compute(_spot(None)).float()
    # the features are per position: a spot changes the positions near it most
    change = (fa - plain).abs().amax(2)[0].reshape(8, 8, 8)  # 16^3 in 2^3 cells
    near = torch.zeros_like(change, dtype=torch.bool)
    near[1:5, 1:5, 1:5] = True  # the cells around voxel 6
    assert change[near].max() > 1.0 and change[~near].max() < 0.5 * change[near].max()
    # pooled over positions: where the spot is matters little next to whether it is there.
    # A scorer that reads one map: a bright blob (a negative Laplacian, map 2) scores high.
    with torch.no_grad():
        model.sharpness = 5.0
        model.hidden.weight.zero_(), model.hidden.bias.zero_(), model.score.weight.zero_()
        model.hidden.weight[0, 2], model.score.weight[0, 0] = -1.0, 1.0
        sa, sb, none = model(a)[0, 1], model(b)[0, 1], model(_spot(None))[0, 1]
    assert (sa - sb).abs() < 0.5 * min(sa - none, sb - none), (sa, sb, none)


def test_mil_trains_a_few_dp_steps_through_the_real_node_on_lesion_nifti(tmp_path: Path):
    """The real ClientApp: DP-SGD on lesion-ct-3d files (written at 24^3, trained at 16^3),
    the scorer's weights move, the ledger holds the DP steps and no statistic release."""
    make_phantom_sites(
        "lesion-ct-3d", tmp_path / "sites", hospitals=1, cases_per_site=30, holdout_cases=2,
        seed=4, image_size=(24, 24, 24),
    )  # fmt: skip
    run = {
        "model": "mil-3d", "model-width": 0, "data-dir": str(tmp_path / "sites"),
        "image-size": "16,16,16", "state-dir": str(tmp_path / "state"), "batch-size": 8,
        "local-epochs": 2, "num-server-rounds": 2, "augmentation": False, "learning-rate": 0.5,
    }  # fmt: skip
    torch.manual_seed(0)
    start = build_model(3, 1, 2, arch="mil-3d", image_size=SIZE).state_dict()
    reply = train(message(start, 1), context(run))
    assert node_status(reply)[0] == "ok", node_status(reply)
    sent = reply.content.array_records["arrays"]
    assert set(sent) == set(start)
    moved = max(float(np.abs(sent[k].numpy() - start[k].numpy()).max()) for k in start)
    assert moved > 1e-4 and all(np.isfinite(sent[k].numpy()).all() for k in start)
    ledger = json.loads((tmp_path / "state" / "hospital-1" / LEDGER_FILE).read_text())
    assert not any(e.get("phase") == "statistics" for e in ledger["entries"])
    (plan,) = ledger["runs"].values()
    assert not plan.get("statistics")
    epsilon = float(reply.content.metric_records["metrics"]["epsilon-run"])
    assert 0 < epsilon < 8.0


def test_features_are_standardised_per_case_so_units_do_not_matter():
    """CT windows and MRI scanner units differ: a gain and an offset change nothing."""
    model = Mil3D(SIZE, 1, 2, scales=(1.0, 2.0))
    x = F.avg_pool3d(torch.rand(1, 1, *SIZE), 3, 1, 1)
    f, g = model._compute(x).float(), model._compute(300.0 * x + 1000.0).float()
    # (roots of the Hessian invariants amplify float rounding near 0: a loose maximum)
    assert (f - g).abs().mean() < 0.005 and (f - g).abs().max() < 0.1, (f - g).abs().max()
