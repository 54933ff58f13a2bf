"""A hostile server against the real ClientApp handlers: each attack it tried, and the node's
answer. The server may send any message, any recipe, any weights, in any order; the node
checks every message against its own policy with that message's settings, draws every DP
release from fresh OS entropy, and sends nothing that is a function of its exact case count.

The fork-twin test runs the real train handler in ClientApps forked from one warm parent, as
the node's warm SuperExec does (client/warm_exec.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from node_messages import context, message, node_status

from client.app import app, evaluate, train
from client.ledger import PrivacyLedger
from common.models import build_model
from common.privacy import compute_epsilon
from simulations.phantoms.sites import make_phantom_sites

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
]
ROOT = Path(__file__).resolve().parents[1]
POLICY = {"accountant": "rdp", "max-epsilon": 8.0, "delta": 1e-5, "max-evaluations": 2}


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    make_phantom_sites("blobs-2d", root, hospitals=1, cases_per_site=40, holdout_cases=10, seed=7)
    return root


def _run(sites: Path, tmp: Path, **overrides) -> dict:
    return {
        "data-dir": str(sites),
        "state-dir": str(tmp / "state"),
        "batch-size": 8,
        "local-epochs": 1,
        "num-server-rounds": 3,
        "learning-rate": 0.1,
        "augmentation": False,
        "model-width": 4,
        "model-depth": 1,
        **overrides,
    }


def _weights() -> dict:
    return build_model(2, 1, 2, width=4, depth=1).state_dict()


def _with_policy(tmp: Path, **extra) -> None:
    """The simulated hospital's own node.toml: a complete policy, allow-non-dp not set."""
    state = tmp / "state" / "hospital-1"
    state.mkdir(parents=True, exist_ok=True)
    lines = [f"{k} = {json.dumps(v)}" for k, v in {**POLICY, **extra}.items()]
    (state / "node.toml").write_text("\n".join(lines) + "\n")


def _metrics(reply) -> dict:
    return dict(reply.content.metric_records["metrics"])


def _ledger(tmp: Path) -> PrivacyLedger:
    return PrivacyLedger.open(tmp / "state" / "hospital-1")


# -- dp=false --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["run-config", "recipe"])
def test_hostile_dp_false_evaluate_is_refused_by_a_node_with_a_policy(sites, tmp_path, where):
    _with_policy(tmp_path)
    run, config = _run(sites, tmp_path), {}
    if where == "run-config":
        run["dp"] = False
    else:
        config["recipe"] = json.dumps({"dp": False})
    for _ in range(3):  # as often as asked: never an exact count
        reply = evaluate(message(_weights(), 1, "evaluate", **config), context(run))
        status, reason = node_status(reply)
        assert status == "refused", reason
        assert not any(k.startswith("val-") for k in _metrics(reply))
    assert not (tmp_path / "state" / "hospital-1" / "privacy_ledger.json").exists()


def test_hostile_recipe_may_only_set_recipe_keys(sites, tmp_path):
    _with_policy(tmp_path)
    recipe = json.dumps({"target-epsilon": 50.0, "state-dir": "/elsewhere"})
    reply = train(message(_weights(), 1, recipe=recipe), context(_run(sites, tmp_path)))
    status, reason = node_status(reply)
    assert status == "refused" and "not recipe keys" in reason


# -- the budget ------------------------------------------------------------------------------


def test_hostile_budget_cannot_be_stretched_mid_run(sites, tmp_path):
    """Round 1 at batch 1, round 2 asking for batch 64 and 30 epochs in its recipe: refused
    before training, and the ledger never passes max-epsilon."""
    _with_policy(tmp_path)
    run = _run(sites, tmp_path, **{"batch-size": 1})
    first = train(message(_weights(), 1), context(run))
    assert node_status(first)[0] == "ok"
    recipe = json.dumps({"batch-size": 64, "local-epochs": 30})
    stretched = train(message(_weights(), 2, recipe=recipe), context(run))
    status, reason = node_status(stretched)
    assert status == "refused"
    assert "differ from the run's privacy plan" in reason and "local-epochs 30" in reason
    for overrides in ({"local-epochs": 3}, {"num-server-rounds": 40}, {"finetune-epochs": 2}):
        changed = train(message(_weights(), 2), context({**run, **overrides}))
        assert node_status(changed)[0] == "refused", overrides
    ledger = _ledger(tmp_path)
    assert ledger.epsilon(1e-5) <= POLICY["max-epsilon"] * (1 + 1e-6)
    assert [e["phase"] for e in ledger.entries if e["status"] != "abandoned"] == ["count", "train"]


def test_hostile_computation_that_spends_more_than_reserved_never_leaves(sites, tmp_path):
    from client import gate as gate_module
    from client.gate import PrivacyGate
    from common.config import NodePolicy, RunConfig
    from common.privacy import PrivacyRefusal

    cfg = RunConfig.parse({"target-epsilon": 8.0})
    gate = PrivacyGate.open(tmp_path, "run", cfg, NodePolicy(partition_id=0), 100, 3)
    plan = gate.plan(100, {"x": 1}, lambda n: (0.1, 30))
    planned = (float(plan["noise_multiplier"]), 0.1, 10)
    more = [(planned[0], 0.1, 11)]
    with pytest.raises(PrivacyRefusal, match="more than its reservation"):
        gate.spend(1, gate_module.TRAIN, planned, lambda: ({}, more, "h"))
    assert gate.ledger.find("run", 1, gate_module.TRAIN) is None  # given back, not released


# -- the exact count -------------------------------------------------------------------------


def _site_with(root: Path, cases: int) -> Path:
    make_phantom_sites("blobs-2d", root, hospitals=1, cases_per_site=cases, holdout_cases=4, seed=3)
    return root


def test_hostile_replies_are_functions_of_the_released_count_not_the_exact_one(
    tmp_path, monkeypatch
):
    """Batch size 1 made the sample rate 1/N and epsilon-run named N. Now sigma, steps and
    every epsilon come from the DP-released count: two sites one case apart that happen to
    release the same count answer with the very same numbers."""
    from client import gate

    monkeypatch.setattr(gate, "_noisy_count", lambda n, noise: 60)
    answers = []
    for cases in (34, 35):
        root = _site_with(tmp_path / f"n{cases}", cases)
        run = _run(root, tmp_path / f"n{cases}", **{"batch-size": 1})
        answers.append(_metrics(train(message(_weights(), 1), context(run))))
    keys = ("epsilon-run", "epsilon-lifetime", "noise-multiplier", "num-examples")
    assert [answers[0][k] for k in keys] == [answers[1][k] for k in keys]
    # ...and epsilon-run is what the public settings and the released count give.
    sigma, released = answers[0]["noise-multiplier"], answers[0]["num-examples"]
    steps = int(released)  # batch 1: one step per released case, one epoch
    assert released == 60
    eps = compute_epsilon([(sigma, 1.0 / released, steps)], 1e-5)
    assert eps < answers[0]["epsilon-run"] < 8.0 + 1e-6  # plus the planned releases


def test_hostile_timings_leave_only_coarse(sites, tmp_path):
    m = _metrics(train(message(_weights(), 1), context(_run(sites, tmp_path))))
    for key in ("data-s", "compute-s"):
        assert m[key] == 0 or float(f"{m[key]:.0e}") == m[key]


# -- errors ----------------------------------------------------------------------------------


def test_hostile_a_failing_secagg_stage_sends_no_path(tmp_path):
    """A SecAgg+ stage on a node whose state dir cannot be written: Flower would send the
    exception text (with the node's full path); the node sends its type alone."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    state_dir = blocker / "state"
    node = {"data-dir": str(tmp_path / "site-data"), "state-dir": str(state_dir), **POLICY}
    content = RecordDict(
        {RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SETUP, Key.SHARE_NUMBER: 3})}
    )
    msg = message({}, 1, "train")
    msg.content = content
    ctx = Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={})
    with pytest.raises(Exception) as failure:
        app(msg, ctx)
    text = f"{type(failure.value)}:<'{failure.value}'>"  # what Flower would send
    assert str(tmp_path) not in text and "not-a-dir" not in text
    assert "details in the node's log" in text


# -- fresh noise through forked ClientApps ---------------------------------------------------

TWIN = textwrap.dedent(
    """
    import json, os, sys
    import torch, opacus  # the warm parent's imports: torch's generator state is inherited
    sys.path.insert(0, {tests!r})
    from node_messages import context, message
    out, run = sys.argv[1], json.loads(sys.argv[2])
    weights = torch.load(sys.argv[3], weights_only=True)
    for round_ in (1, 2):  # two rounds from the very same global model, each in a fresh fork
        pid = os.fork()
        if pid == 0:
            from client.app import train
            from common.privacy import PoissonLoader
            reply = train(message(weights, round_), context(run))
            sd = reply.content.array_records["arrays"].to_torch_state_dict()
            data = torch.utils.data.TensorDataset(torch.zeros(64, 1))
            mask = next(iter(PoissonLoader(data, 4, 16).batch_sampler))
            torch.save({{"sd": sd, "mask": mask}}, f"{{out}}-{{round_}}.pt")
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
    """
)


def test_hostile_fork_twins_draw_fresh_and_calibrated_noise(sites, tmp_path):
    """Two ClientApps forked from one warm parent train the same message, data and model: the
    Poisson masks differ, the updates differ, and their difference has the variance the plan
    says, 2 x steps x (lr sigma C / B)^2 per weight (momentum 0; a case's clipped gradient
    is at most C against noise of sigma C per weight, over thousands of weights)."""
    weights = build_model(2, 1, 2, width=16, depth=2).state_dict()
    torch.save(weights, tmp_path / "global.pt")
    settings = {"model-width": 16, "model-depth": 2, "momentum": 0.0}
    run = _run(sites, tmp_path, **settings, **{"learning-rate-schedule": "constant"})
    script = TWIN.format(tests=str(ROOT / "tests"))
    out = tmp_path / "twin"
    subprocess.run(
        [sys.executable, "-c", script, str(out), json.dumps(run), str(tmp_path / "global.pt")],
        cwd=ROOT,
        check=True,
        timeout=600,
    )
    a, b = (torch.load(f"{out}-{r}.pt", weights_only=True) for r in (1, 2))
    first = next(iter(weights))
    assert a["mask"] != b["mask"]
    diff = torch.cat([(a["sd"][k] - b["sd"][k]).flatten() for k in weights])
    assert len(diff) >= 200 and not torch.equal(a["sd"][first], b["sd"][first])
    plan = next(iter(_ledger(tmp_path).runs.values()))
    released, sigma = int(plan["num_examples_released"]), float(plan["noise_multiplier"])
    per_epoch = math.ceil(released / run["batch-size"])
    expected_batch = released / per_epoch
    variance = 2 * per_epoch * (run["learning-rate"] * sigma * 1.0 / expected_batch) ** 2
    measured = float(diff.double().pow(2).mean())
    assert measured == pytest.approx(variance, rel=0.3)
