"""Client-side training options, driven through the real ClientApp functions.

The ClientApp's `train` and `evaluate` are called directly with real Flower `Message`/`Context`
objects on real NIfTI phantom sites (what the SuperNode would hand it), so the options are
checked where they live: FedBN keeps a site's normalisation parameters across rounds, Opacus'
BatchMemoryManager changes memory, not maths, and local fine-tuning after the last round is
planned into the run's epsilon and leaves its model at the node."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import Context
from node_messages import context, message

from client.app import evaluate, finetune, train
from client.node import FEDBN_KEY
from common import privacy
from common.eval_release import local_metrics
from common.models import build_model
from common.weights import norm_parameter_names
from simulations.phantoms.sites import make_phantom_sites

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
]


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("opts")
    make_phantom_sites("blobs-2d", root, hospitals=1, cases_per_site=40, holdout_cases=20, seed=3)
    return root


def _context(sites: Path, tmp: Path, **overrides) -> Context:
    return context(
        {
            "data-dir": str(sites),
            "output-dir": str(tmp / "runs"),
            "state-dir": str(tmp / "state"),
            "batch-size": 16,
            "local-epochs": 1,
            "augmentation": False,
            **overrides,
        }
    )


def _round(context: Context, state_dict: dict, round_: int) -> dict[str, torch.Tensor]:
    reply = train(message(state_dict, round_), context)
    assert reply.content.config_records["node"]["status"] == "ok", reply.content
    return reply.content.array_records["arrays"].to_torch_state_dict()


@pytest.mark.parametrize("fedbn", [True, False])
def test_fedbn_keeps_the_sites_norm_parameters_and_takes_the_rest_global(sites, tmp_path, fedbn):
    torch.manual_seed(0)
    model = build_model(2, 1, 2)
    norm_names = set(norm_parameter_names(model))
    assert norm_names and all("features" in n for n in norm_names)  # GroupNorm weight + bias
    context = _context(sites, tmp_path, fedbn=fedbn)

    trained = _round(context, model.state_dict(), 1)  # round 1 trains every parameter
    assert (FEDBN_KEY in context.state.array_records) is fedbn

    # Round 2: a global model whose norm parameters are a marker value, trained with lr 0 so
    # the reply shows exactly which values the site started from.
    marked = {k: (torch.full_like(v, 7.0) if k in norm_names else v) for k, v in trained.items()}
    context.run_config["learning-rate"] = 0.0
    second = _round(context, marked, 2)
    for name, value in second.items():
        if name in norm_names and fedbn:
            torch.testing.assert_close(value, trained[name])  # the site's own, from round 1
            assert not torch.equal(value, marked[name])
        else:
            torch.testing.assert_close(value, marked[name])  # what the server sent


def test_batch_memory_manager_gives_the_full_batch_update_and_accounting(sgd):
    torch.manual_seed(1)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 2, (64,))
    start = build_model(2, 1, 2).state_dict()
    results = {}
    for physical in (0, 5):  # 0 = one physical batch per logical batch of ~16
        model = build_model(2, 1, 2)
        model.load_state_dict(start)
        # The same Poisson batches in both runs: a node's generators are fresh OS entropy,
        # so only a test can pin them.
        with privacy.pinned_generators(2):
            out = sgd(
                model,
                x,
                y,
                noise_multiplier=0.0,
                epochs=2,
                batch_size=16,
                max_physical_batch=physical,
            )
        results[physical] = (model.state_dict(), out.history)
    (full, full_hist), (split, split_hist) = results[0], results[5]
    assert split_hist == full_hist  # same (sigma, q, steps): chunks are not extra steps
    assert sum(s for _, _, s in full_hist) == 2 * 4
    for name in full:
        torch.testing.assert_close(split[name], full[name], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(full[n], start[n]) for n in full)  # it did train


def test_norm_parameter_names_cover_the_unet_too():
    from common.unet import build_unet  # noqa: PLC0415

    names = norm_parameter_names(build_unet(2, 1, 3))
    assert names and all(n.endswith((".weight", ".bias")) for n in names)


def test_cosine_schedule_starts_at_the_base_rate_and_decays_every_round():
    from client.train import scheduled_learning_rate
    from common.schedule import run_progress

    rates = [scheduled_learning_rate(0.5, "cosine", r, 10) for r in range(1, 11)]
    assert rates[0] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert 0 < rates[-1] < 0.02  # the last round still trains, with a small step
    assert scheduled_learning_rate(0.5, "constant", 7, 10) == 0.5
    # The same progress drives slice-unet's focus share (common/unet.py).
    assert [run_progress(r, 4) for r in (1, 2, 4, 9)] == [0.0, 0.25, 0.75, 1.0]
    assert run_progress(3, 0) == 0.0  # total unknown: as the first round
    with pytest.raises(ValueError, match="learning-rate-schedule"):
        scheduled_learning_rate(0.5, "linear", 1, 10)


def test_an_unknown_schedule_is_refused_with_the_setting_named(sites, tmp_path):
    context = _context(sites, tmp_path, **{"learning-rate-schedule": "linear"})
    reply = train(message(build_model(2, 1, 2).state_dict(), 1), context)
    node = reply.content.config_records["node"]
    assert node["status"] == "refused"  # a run config the node cannot accept
    assert "learning-rate-schedule" in node["reason"] and "cosine" in node["reason"]
    assert "arrays" not in reply.content.array_records  # no weights from a failed round


def test_a_node_builds_the_model_the_run_config_names(sites, tmp_path):
    """model="scatter-cnn": the node trains the server's ScatterCNN weights, key for key; the
    fixed scattering filters are neither expected from the server nor sent back."""
    context = _context(sites, tmp_path, model="scatter-cnn", **{"learning-rate": 0.05})
    torch.manual_seed(0)
    start = build_model(2, 1, 2, arch="scatter-cnn", image_size=(28, 28)).state_dict()
    trained = _round(context, start, 1)
    assert list(trained) == list(start)
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    # A CNN's weights do not fit it: the round fails instead of training something else.
    wrong = train(message(build_model(2, 1, 2).state_dict(), 2), context)
    assert wrong.content.config_records["node"]["status"] == "failed"
    # An unknown model fails the round with the setting named.
    context = _context(sites, tmp_path, model="resnet")
    reply = train(message(start, 1), context)
    node = reply.content.config_records["node"]
    assert node["status"] == "refused" and "model='resnet'" in node["reason"], node


def _ledger(tmp: Path) -> dict:
    """The simulated hospital's privacy ledger file, as written."""
    import json  # noqa: PLC0415

    from client.ledger import LEDGER_FILE  # noqa: PLC0415

    return json.loads((tmp / "state" / "hospital-1" / LEDGER_FILE).read_text())


@pytest.mark.parametrize("epochs", [0, 2])
def test_finetuning_is_planned_into_epsilon_and_its_model_stays_at_the_node(
    sites, tmp_path, epochs
):
    """After the last round the server sends "train.finetune": each node fine-tunes the final
    model with DP, inside the run's plan; evaluations never fine-tune."""
    overrides = {"finetune-epochs": epochs, "target-epsilon": 4.0, "local-evaluation": "every"}
    context = _context(sites, tmp_path, **overrides)
    torch.manual_seed(0)
    start = build_model(2, 1, 2).state_dict()
    cfg = {"total-rounds": 2}
    first = train(message(start, 1, **cfg), context)
    assert first.content.config_records["node"]["status"] == "ok"
    plan = _ledger(tmp_path)["runs"]["test-run"]
    entries = _ledger(tmp_path)["entries"]
    steps_per_round = next(e["steps"] for e in entries if e["phase"] == "train")
    # The noise of every round is calibrated for the fine-tuning steps and every planned
    # validation release too (2 evaluations + 1 of the fine-tuned model + the count).
    assert plan["planned_steps"] == (2 + epochs) * steps_per_round
    assert plan["planned_releases"] == 2 + (1 if epochs else 0) + 1
    weights = first.content.array_records["arrays"].to_torch_state_dict()

    # An evaluation is an evaluation; a fine-tuning message before the last round is refused.
    early = evaluate(message(weights, 1, "evaluate", **cfg), context).content
    assert early.config_records["node"]["status"] == "ok"
    too_early = finetune(message(weights, 1, "train.finetune", **cfg), context).content
    assert too_early.config_records["node"]["status"] == "refused"

    second = train(message(weights, 2, **cfg), context).content
    final = second.array_records["arrays"].to_torch_state_dict()
    last = evaluate(message(final, 2, "evaluate", **cfg), context).content
    eps_after_rounds = last.metric_records["metrics"]["epsilon-run"]
    reply = finetune(message(final, 2, "train.finetune", **cfg), context).content
    metrics = dict(reply.metric_records["metrics"])
    assert set(reply.array_records) == set()  # the fine-tuned weights never leave
    saved = tmp_path / "state" / "hospital-1" / "personalised"
    if epochs == 0:  # the server sends no such message; a node that gets one refuses it
        assert reply.config_records["node"]["status"] == "refused"
        assert not saved.exists()
        return
    assert reply.config_records["node"]["status"] == "ok"
    # One DP release about the fine-tuned model (the server computes its metrics from it).
    assert {"val-hist-neg", "val-hist-pos"} <= set(metrics) and "auc" in local_metrics(metrics, 0)
    # The fine-tuning steps were spent and recorded, and the run still ends within target.
    assert eps_after_rounds < metrics["epsilon-run"] <= 4.0 * (1 + 1e-6)
    entries = _ledger(tmp_path)["entries"]
    # The run's released training-set count first, then every round's releases.
    phases = ["count", "train", "evaluate", "train", "evaluate", "finetune", "finetune-evaluate"]
    assert [e["phase"] for e in entries] == phases
    assert all(e["status"] == "released" for e in entries)
    assert entries[5]["steps"] == epochs * steps_per_round / context.run_config["local-epochs"]
    personal = torch.load(saved / "test-run-round2.pt", weights_only=True)
    assert any(not torch.equal(personal[k], final[k]) for k in final)  # it did train
    # A re-sent fine-tuning message gets the same release back and spends nothing more.
    again = finetune(message(final, 2, "train.finetune", **cfg), context).content
    assert len(_ledger(tmp_path)["entries"]) == 7
    assert dict(again.metric_records["metrics"])["val-hist-pos"] == metrics["val-hist-pos"]


def test_a_negative_finetune_epochs_is_refused_with_the_setting_named(sites, tmp_path):
    context = _context(sites, tmp_path, **{"finetune-epochs": -1})
    reply = train(message(build_model(2, 1, 2).state_dict(), 1), context)
    node = reply.content.config_records["node"]
    assert node["status"] == "refused" and "finetune-epochs" in node["reason"]
