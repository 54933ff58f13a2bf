"""Fast DP-SGD must produce the same clipped+noised updates as Opacus' own `hooks` mode.

Every speed-up in common/fast_dp.py is checked against real Opacus here: per-sample gradient
norms (all three conv kernels, the ghost/book-keeping path, GroupNorm, Linear), the clipped summed
gradient, the noise scale, accountant steps, empty Poisson batches and BatchMemoryManager.
No timing is asserted anywhere.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common import fast_dp, per_sample_grads
from common.models import build_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
    # Opacus' reference GradSampleModule on a model whose input needs no gradient:
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]

torch.set_num_threads(1)  # CI has 2 shared cores; these models are tiny

# (spatial dims, input shape without batch, batch). 2D 28x28 exercises all conv paths: the first
# layer's channels-as-batch conv, the grouped-conv kernel (14x14) and, through make_private, the
# ghost-norm path (7x7). 3D 16^3 exercises the 3D kernels at test speed.
CASES = [(2, (1, 28, 28), 6), (3, (1, 16, 16, 16), 3)]


class Odd(nn.Module):
    """Conv settings the default model does not use: stride, dilation, groups, no bias, 1D."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(8, 16, 2, stride=2)  # 3x3 output: ghost path when allowed
        self.c1d = nn.Conv1d(16, 4, 3, padding=1)
        self.fc = nn.Linear(36, 5)

    def forward(self, x):
        x = self.c3(torch.relu(self.c2(torch.relu(self.gn(self.c1(x))))))
        x = self.c1d(x.flatten(2))
        return self.fc(x.flatten(1))


def _data(shape, n, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _per_sample_norms(params) -> torch.Tensor:
    return torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params], 1).norm(dim=1)


def _opacus_reference(model, x, y, reduction="mean"):
    ref = GradSampleModule(copy.deepcopy(model), loss_reduction=reduction)
    nn.functional.cross_entropy(ref(x), y, reduction=reduction).backward()
    return list(ref._module.parameters())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dims,shape,batch", CASES)
def test_per_sample_gradients_match_opacus_hooks(dims, shape, batch, reduction):
    torch.manual_seed(0)
    model = build_model(dims, 1, 3)
    x, y = _data(shape, batch)
    ref = _opacus_reference(model, x, y, reduction)

    mine = copy.deepcopy(model)
    hooks = fast_dp.FastGradSampleHooks(mine, loss_reduction=reduction)
    nn.functional.cross_entropy(mine(x), y, reduction=reduction).backward()

    kinds = {type(m) for m in mine.modules()}
    assert {nn.GroupNorm, nn.Linear} <= kinds
    for (name, p), q in zip(mine.named_parameters(), ref, strict=True):
        assert p.grad is None, f"{name}: the batch gradient should not be computed"
        assert p.grad_sample.shape == q.grad_sample.shape, name
        torch.testing.assert_close(p.grad_sample, q.grad_sample, rtol=1e-4, atol=1e-6)
        rel = p.grad_sample.flatten(1).norm(dim=1) / q.grad_sample.flatten(1).norm(dim=1) - 1
        assert rel.abs().max() < 1e-5, (name, rel)
    rel = _per_sample_norms(mine.parameters()) / _per_sample_norms(ref) - 1
    assert rel.abs().max() < 1e-5
    hooks.remove_hooks()
    assert "forward" not in mine.features[0].__dict__


def test_unusual_convs_match_opacus_hooks():
    torch.manual_seed(1)
    model = Odd()
    x, y = _data((3, 13, 13), 5, classes=5)
    ref = _opacus_reference(model, x, y)
    mine = copy.deepcopy(model)
    fast_dp.FastGradSampleHooks(mine)
    nn.functional.cross_entropy(mine(x), y).backward()
    for (name, p), q in zip(mine.named_parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad_sample, q.grad_sample, rtol=1e-4, atol=1e-6, msg=name)


class TwoHeads(nn.Module):
    """Two Linear layers on 2D input whose outputs are added: the second one's bias
    gradient is a view of the output gradient the first one's backward still needs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_outputs_combined_keep_their_per_sample_gradients(reduction):
    torch.manual_seed(2)
    model = TwoHeads()
    x, y = _data((6,), 8)
    ref = _opacus_reference(model, x, y, reduction)
    mine = copy.deepcopy(model)
    fast_dp.FastGradSampleHooks(mine, loss_reduction=reduction)
    nn.functional.cross_entropy(mine(x), y, reduction=reduction).backward()
    for (name, p), q in zip(mine.named_parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad_sample, q.grad_sample, rtol=1e-4, atol=1e-6, msg=name)
    rel = _per_sample_norms(mine.parameters()) / _per_sample_norms(ref) - 1
    assert rel.abs().max() < 1e-5


def test_ghost_norms_match_materialised_norms():
    torch.manual_seed(2)
    conv = nn.Conv2d(64, 128, 3, padding=1)
    x, g = torch.randn(4, 64, 7, 7), torch.randn(4, 128, 7, 7)
    assert per_sample_grads._use_ghost(conv, g.shape)
    full = per_sample_grads.conv_grad_sampler(conv, [x], g)[conv.weight].flatten(1).norm(dim=1)
    ghost = per_sample_grads.conv_weight_norm_sample(conv, x, g)
    assert ((ghost / full - 1).abs() < 1e-5).all()


def _make_private(kind, model, data, batch, sigma, clip, seed=0, **kw):
    """Returns (module, optimizer, loader, engine) through Opacus hooks mode or fast_dp."""
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(data, batch_size=batch)
    engine = PrivacyEngine(accountant="rdp")
    args = dict(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        noise_generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    if kind == "opacus":
        return (*engine.make_private(grad_sample_mode="hooks", **args), engine)
    return (*fast_dp.make_private(engine, **args), engine)


def _dp_update(kind, model, x, y, sigma=0.0, clip=0.05):
    m, opt, _, _ = _make_private(
        kind, copy.deepcopy(model), TensorDataset(x, y), len(x), sigma, clip
    )
    before = [p.detach().clone() for p in m.parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
    return [b - p.detach() for b, p in zip(before, m.parameters(), strict=True)]  # lr = 1


@pytest.mark.parametrize("dims,shape,batch", [*CASES, ("odd", (3, 13, 13), 5)])
def test_clipped_summed_gradient_matches_opacus(dims, shape, batch):
    """Through make_private, so the ghost-norm path (2D 7x7 block, Odd.c3 with stride 2) and
    FastDPOptimizer are what is compared with Opacus."""
    torch.manual_seed(3)
    model = Odd() if dims == "odd" else build_model(dims, 1, 3)
    x, y = _data(shape, batch, classes=5 if dims == "odd" else 3)
    ours, ref = _dp_update("fast", model, x, y), _dp_update("opacus", model, x, y)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # clipping was active (C = 0.05 is far below these gradients' norms) and non-trivial
    assert max(u.abs().max().item() for u in ours) > 0


def test_fast_optimizer_and_ghost_path_are_used():
    model = build_model(2, 1, 3)
    x, y = _data((1, 28, 28), 4)
    m, opt, _, _ = _make_private("fast", model, TensorDataset(x, y), 4, 1.0, 1.0)
    assert isinstance(opt, fast_dp.FastDPOptimizer)
    nn.functional.cross_entropy(m(x), y).backward()
    last = m._module.features[8]  # 64 -> 128 conv on 7x7 maps
    assert last.weight.grad_sample.shape == (4, 1)  # norm stand-in, not per-sample gradients
    assert len(last.weight._fast_dp_ghost) == 1
    opt.step()
    assert not hasattr(last.weight, "_fast_dp_ghost")


def test_model_zero_grad_between_batches_drops_ghost_state():
    """A backward that is zeroed through the model (not the optimizer) must not leak into the
    next step's clipped sum."""
    torch.manual_seed(7)
    model = build_model(2, 1, 3)
    x, y = _data((1, 28, 28), 4)
    want = _dp_update("fast", model, x, y)
    m, opt, _, _ = _make_private("fast", copy.deepcopy(model), TensorDataset(x, y), 4, 0.0, 0.05)
    before = [p.detach().clone() for p in m.parameters()]
    x2, y2 = _data((1, 28, 28), 4, seed=1)
    nn.functional.cross_entropy(m(x2), y2).backward()
    m.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
    got = [b - p.detach() for b, p in zip(before, m.parameters(), strict=True)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_noise_scale_matches_opacus_semantics():
    """std of the added noise on p.grad is sigma * C / expected batch size ("mean" loss)."""
    torch.manual_seed(4)
    model = build_model(2, 1, 3)
    x, y = _data((1, 28, 28), 8)
    sigma, clip = 2.0, 0.5
    clean = _dp_update("fast", model, x, y, 0.0, clip)
    noisy = _dp_update("fast", model, x, y, sigma, clip)
    diff = torch.cat([(a - b).flatten() for a, b in zip(noisy, clean, strict=True)])
    expected = sigma * clip / 8  # expected batch size = 8 samples / 1 batch
    assert diff.numel() > 90_000
    assert abs(diff.std().item() / expected - 1) < 0.02
    assert abs(diff.mean().item()) < 0.02 * expected


def test_accountant_counts_steps_like_opacus():
    torch.manual_seed(5)
    model = build_model(2, 1, 2)
    x, y = _data((1, 12, 12), 40, classes=2)
    hist = {}
    for kind in ("fast", "opacus"):
        m, opt, loader, engine = _make_private(
            kind, copy.deepcopy(model), TensorDataset(x, y), 10, 1.1, 1.0
        )
        for xb, yb in loader:  # Poisson batches, possibly empty
            opt.zero_grad()
            nn.functional.cross_entropy(m(xb), yb).backward()
            opt.step()
        hist[kind] = engine.accountant.history
        assert engine.get_epsilon(1e-5) > 0
    assert hist["fast"] == hist["opacus"] == [(1.1, 0.25, 4)]


@pytest.mark.parametrize("dims,shape", [(2, (1, 28, 28)), (3, (1, 8, 8, 8))])
def test_empty_batch_steps_with_noise_only(dims, shape):
    model = build_model(dims, 1, 3)
    x, y = _data(shape, 4)
    m, opt, _, engine = _make_private("fast", model, TensorDataset(x, y), 4, 1.0, 1.0)
    for _ in range(2):  # twice: a broken state would show on the second step
        before = [p.detach().clone() for p in m.parameters()]
        opt.zero_grad()
        xe, ye = x[:0], y[:0]
        nn.functional.cross_entropy(m(xe), ye, reduction="sum").backward()
        opt.step()
        moved = [
            (p.detach() - b).abs().max().item() for p, b in zip(m.parameters(), before, strict=True)
        ]
        assert all(v > 0 for v in moved)  # noise only
    assert engine.accountant.history[0][2] == 2
    # and a normal batch afterwards still works
    opt.zero_grad()
    nn.functional.cross_entropy(m(x), y).backward()
    opt.step()


def test_batch_memory_manager_matches_one_big_batch():
    """Logical batch of 8 in physical batches of 3 (incl. the ghost path): same clipped sum."""
    torch.manual_seed(6)
    model = build_model(2, 1, 3)
    x, y = _data((1, 28, 28), 8)
    data = TensorDataset(x, y)
    one = _dp_update("fast", model, x, y, 0.0, 0.05)

    m, opt, _, _ = _make_private(
        "fast", copy.deepcopy(model), data, 8, 0.0, 0.05, poisson_sampling=False
    )
    loader = DataLoader(data, batch_size=8)
    before = [p.detach().clone() for p in m.parameters()]
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3, optimizer=opt) as bmm:
        for xb, yb in bmm:
            opt.zero_grad()
            # sum/len(full batch) keeps "mean" semantics across physical batches
            nn.functional.cross_entropy(m(xb), yb).backward()
            opt.step()
    chunks = [b - p.detach() for b, p in zip(before, m.parameters(), strict=True)]
    for a, b in zip(chunks, one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_poisson_accumulation_is_refused_like_opacus():
    model = build_model(2, 1, 3)
    x, y = _data((1, 28, 28), 4)
    m, _, _, _ = _make_private("fast", model, TensorDataset(x, y), 4, 1.0, 1.0)
    nn.functional.cross_entropy(m(x), y).backward()
    with pytest.raises(ValueError, match="grad accumulation"):
        nn.functional.cross_entropy(m(x), y).backward()


def test_close_restores_a_plain_model_that_can_be_made_private_again():
    model = build_model(2, 1, 3)
    x, y = _data((1, 28, 28), 4)
    for _ in range(2):  # a fedvox client makes the same model private every round
        m, opt, _, _ = _make_private("fast", model, TensorDataset(x, y), 4, 1.0, 1.0)
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        m._close()
        assert not any("forward" in layer.__dict__ for layer in model.modules())
    nn.functional.cross_entropy(model(x), y).backward()  # plain training again: ordinary p.grad
    assert all(p.grad is not None for p in model.parameters())


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(NotImplementedError, match="'1'.*BatchNorm2d"):
        fast_dp.FastGradSampleHooks(model)
    with pytest.raises(NotImplementedError, match="padding"):
        fast_dp.FastGradSampleHooks(nn.Sequential(nn.Conv2d(1, 4, 3, padding="same")))


def test_eval_and_no_grad_use_plain_forward():
    model = build_model(2, 1, 3)
    x, _ = _data((1, 28, 28), 3)
    want = model(x)
    fast_dp.FastGradSampleHooks(model)
    torch.testing.assert_close(model(x), want)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), model.train()(x))


def test_bench_speed_quick_writes_json(tmp_path):
    from simulations.cli import main

    out = tmp_path / "speed.json"
    # A finished demo-like run: AUC 0.95 first reached in round 2, 10 + 1 + 12 + 1 s in.
    run = tmp_path / "run"
    run.mkdir()
    rounds = [
        {"round": i, "central": {"auc": a}, "wall_s": w, "central_eval_s": 1.0}
        for i, a, w in ((1, 0.9, 10.0), (2, 0.951, 12.0), (3, 0.94, 12.0))
    ]
    model = {"task": "classification", "spatial_dims": 2}
    summary = {"model": model, "rounds": rounds, "started_at": 100.0, "ended_at": 150.0}
    (run / "summary.json").write_text(json.dumps(summary))
    args = ["bench", "speed", "--quick", "--no-federation", "--out", str(out), "--runs", str(run)]
    assert main(args) == 0
    res = json.loads(out.read_text())
    recipes = res["recipes"]
    assert set(recipes) == {"2d-classification", "3d-classification", "3d-segmentation"}
    for name, r in recipes.items():
        assert r["failed"] == {}, name  # every Opacus mode runs every default model
        assert r["dp_step_ratio"] > 0 and all(v > 0 for v in r["opacus_step_ratio"].values())
        assert set(r["opacus_step_ratio"]) == {"hooks", "ew", "ghost"}
    assert recipes["2d-classification"]["model"] == "scatter-cnn"
    assert recipes["3d-segmentation"]["model"] == "slice-unet"
    assert recipes["2d-classification"]["run_wall_s"] == 50.0
    assert recipes["2d-classification"]["time_to_target_s"] == 24.0
    assert recipes["3d-classification"]["run_wall_s"] is None
    assert "--runs" in recipes["3d-classification"]["note"]
    assert set(res["dp_step_ratio"]) == {"2d", "3d"}
    assert set(res["opacus_step_ratio"]) == {"hooks_2d", "ew_2d", "hooks_3d", "ew_3d"}
    for r in [*res["dp_step_ratio"].values(), *res["opacus_step_ratio"].values()]:
        assert r > 0
    for key in ("federation_overhead", "startup_s", "data_share", "scale"):
        assert key in res and res[key] is None
    assert {"cpu", "cores", "torch", "opacus", "flwr"} <= set(res["machine"])
    assert res["date"]


def test_bench_speed_only_secagg_needs_hospital_counts():
    from simulations.cli import main

    with pytest.raises(SystemExit, match="--only-secagg needs --secagg-hospitals"):
        main(["bench", "speed", "--only-secagg", "--secagg-hospitals", ""])
