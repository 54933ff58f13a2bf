"""Privacy budget rules, calibration, the node ledger, and DP-SGD steps under real Opacus."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.validators import ModuleValidator

from client.ledger import LedgerError, PrivacyLedger
from client.train import steps_per_epoch
from common.config import NodePolicy, RunConfig
from common.models import build_model
from common.privacy import (
    PrivacyRefusal,
    calibrate_noise_multiplier,
    compute_epsilon,
    pinned_generators,
    release_noise,
    resolve_budget,
)

SIMULATED = NodePolicy(partition_id=0, num_partitions=1)
DEPLOYED = NodePolicy(accountant="prv", max_epsilon=8.0, delta=1e-5, max_evaluations=3)


def test_the_nodes_policy_decides_and_the_server_may_only_tighten_it():
    b = resolve_budget(RunConfig(target_epsilon=3.0, target_delta=1e-6), DEPLOYED, 1000, 10)
    assert (b.epsilon_run, b.epsilon_lifetime, b.delta) == (3.0, 8.0, 1e-6)
    assert b.accountant == "prv"  # the node's, whatever the run config says
    assert b.max_releases == 3
    with pytest.raises(PrivacyRefusal, match="above this hospital's max-epsilon"):
        resolve_budget(RunConfig(target_epsilon=40.0), DEPLOYED, 1000, 10)
    with pytest.raises(PrivacyRefusal, match="looser than this hospital's delta"):
        resolve_budget(RunConfig(target_delta=1e-4), DEPLOYED, 1000, 10)
    with pytest.raises(PrivacyRefusal, match="missing: max-epsilon"):
        resolve_budget(RunConfig(), NodePolicy(accountant="rdp", delta=1e-5), 1000, 10)
    every = RunConfig(**{"local_evaluation": "every"})
    with pytest.raises(PrivacyRefusal, match="plans 10 validation releases.*allows 3"):
        resolve_budget(every, DEPLOYED, 1000, 10)
    # A simulated hospital without a policy file: the run's values, no lifetime limit.
    sim = resolve_budget(RunConfig(), SIMULATED, 1000, 10)
    assert (sim.epsilon_run, sim.epsilon_lifetime, sim.accountant) == (8.0, math.inf, "rdp")


@pytest.mark.parametrize("n", [10, 100_001])
def test_delta_must_be_below_one_over_n_and_the_refusal_names_no_count(n):
    cfg = RunConfig(target_delta=1e-5 if n > 10 else 0.2)
    with pytest.raises(PrivacyRefusal, match="1/N") as err:
        resolve_budget(cfg, SIMULATED, num_examples=n, total_rounds=10)
    assert f"1/{n}" not in str(err.value) and f" {n} " not in str(err.value)


def test_calibrated_sigma_spends_the_target_epsilon_over_the_whole_run():
    q, steps = 64 / 900, 10 * 15  # 10 rounds x 1 epoch x 15 steps
    sigma = calibrate_noise_multiplier(8.0, 1e-5, q, steps)
    eps = compute_epsilon([(sigma, q, steps)], 1e-5)
    assert 7.9 <= eps <= 8.0
    # One round of that run spends far less: the budget covers the run, not each round.
    assert compute_epsilon([(sigma, q, 15)], 1e-5) < 4.0


def test_compute_epsilon_matches_opacus_accountant_and_merges_history():
    history = [(1.1, 0.05, 40), (1.1, 0.05, 60), (2.0, 0.1, 10)]
    acc = RDPAccountant()
    acc.history = list(history)
    assert compute_epsilon(history, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert compute_epsilon([], 1e-5) == 0.0


def _spend(ledger: PrivacyLedger, run: str, entry: tuple) -> None:
    with ledger.transaction() as lg:
        reserved = lg.reserve(run, 1, "train", entry)
        lg.release(reserved["id"], [entry], "sha")


def test_ledger_survives_a_fresh_process_and_refuses_a_corrupt_file(tmp_path):
    ledger = PrivacyLedger.open(tmp_path)
    with ledger.transaction() as lg:
        lg.plan_run("run-a", noise_multiplier=1.0, sample_rate=0.1)
    _spend(ledger, "run-a", (1.0, 0.1, 10))
    _spend(ledger, "run-b", (1.0, 0.1, 10))
    again = PrivacyLedger.open(tmp_path)  # what a new ClientApp process sees
    assert again.history() == [(1.0, 0.1, 10), (1.0, 0.1, 10)]
    assert again.epsilon(1e-5, "run-a") < again.epsilon(1e-5)
    assert again.epsilon(1e-5) == pytest.approx(compute_epsilon([(1.0, 0.1, 20)], 1e-5))
    # A second plan for the same run keeps the first calibration.
    assert again.plan_run("run-a", noise_multiplier=9.0)["noise_multiplier"] == 1.0
    (tmp_path / "privacy_ledger.json").write_text('{"entries": [')
    with pytest.raises(LedgerError, match="privacy_ledger.json"):
        PrivacyLedger.open(tmp_path)
    (tmp_path / "privacy_ledger.json").write_text(
        json.dumps({"accountant": "prv", "entries": [], "runs": {}})
    )
    with pytest.raises(LedgerError, match="accountant"):
        PrivacyLedger.open(tmp_path, accountant="rdp")


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 8.0, 30.0])
def test_calibration_with_planned_releases_still_ends_at_the_target(epsilon):
    q, steps = 64 / 900, 10 * 15
    noise = release_noise(epsilon, 1)
    fixed = ((noise, 1.0, 1), (3 * noise, 1.0, 1))  # a validation release and the count
    plain = calibrate_noise_multiplier(epsilon, 1e-5, q, steps)
    sigma = calibrate_noise_multiplier(epsilon, 1e-5, q, steps, fixed=fixed)
    assert plain < sigma < 1.02 * plain  # the releases cost under 2 % more noise
    assert epsilon - 0.005 <= compute_epsilon([(sigma, q, steps), *fixed], 1e-5) <= epsilon


@pytest.mark.parametrize("dims,shape", [(2, (1, 28, 28)), (3, (1, 16, 16, 16))])
def test_models_pass_opacus_validation_and_take_dp_steps(dims, shape, sgd):
    torch.manual_seed(0)
    model = build_model(dims, in_channels=1, num_classes=2)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(24, *shape), torch.randint(0, 2, (24,))
    result = sgd(model, x, y)
    assert result.history == [(1.0, 1 / steps_per_epoch(24, 8), 3)]
    after = model.state_dict()
    assert set(after) == set(before)  # plain keys, no "_module." prefix
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_empty_poisson_batches_still_count_as_steps(sgd):
    torch.manual_seed(0)
    model = build_model(2, 1, 2, width=4, depth=1)
    x, y = torch.randn(3, 1, 8, 8), torch.randint(0, 2, (3,))
    # q = 1/3 over 3 samples: many of the 30 Poisson batches are empty.
    result = sgd(model, x, y, epochs=10, batch_size=1)
    assert result.history[0][2] == 30


def test_fedprox_proximal_step_pulls_towards_the_global_model(sgd):
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 2, (64,))

    def distance(mu: float) -> float:
        torch.manual_seed(0)
        model = build_model(2, 1, 2, width=4, depth=1)
        start = [p.detach().clone() for p in model.parameters()]
        with pinned_generators(1):  # the same Poisson batches with and without the term
            sgd(
                model,
                x,
                y,
                noise_multiplier=0.0,
                epochs=3,
                batch_size=16,
                learning_rate=0.5,
                proximal_mu=mu,
            )
        pairs = zip(model.parameters(), start, strict=True)
        return sum(float((p.detach() - s).norm()) for p, s in pairs)

    assert distance(1.0) < 0.8 * distance(0.0)


def test_only_simulated_or_explicitly_allowing_nodes_train_without_dp():
    from common.config import NodePolicy

    def non_dp_allowed(node_config: dict) -> bool:
        return NodePolicy.parse(node_config).may_train_without_dp

    assert non_dp_allowed({"partition-id": 0, "num-partitions": 2})
    assert not non_dp_allowed({"data-dir": "/d", "state-dir": "/s"})  # a real node: DP only
    assert not non_dp_allowed({"data-dir": "/d", "allow-non-dp": "false"})
    assert non_dp_allowed({"data-dir": "/d", "allow-non-dp": True})
