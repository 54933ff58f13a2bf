"""The node owns its privacy budget (issue 14): policy, refusals, a ledger that can't be raced.

Everything runs through the real ClientApp handlers on real NIfTI phantom sites; the race and
the crash use real processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from node_messages import context, message, node_status

from client.app import evaluate, train
from client.ledger import LEDGER_FILE, PrivacyLedger
from common.models import build_model
from common.privacy import compute_epsilon
from simulations.phantoms.sites import make_phantom_sites

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
]
ROOT = Path(__file__).resolve().parents[1]
FULL_POLICY = {"accountant": "rdp", "max-epsilon": 8.0, "delta": 1e-5, "max-evaluations": 2}


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("policy")
    make_phantom_sites("blobs-2d", root, hospitals=1, cases_per_site=40, holdout_cases=10, seed=4)
    return root


def _run(sites: Path, tmp: Path, **overrides) -> dict:
    return {
        "data-dir": str(sites),
        "state-dir": str(tmp / "state"),
        "batch-size": 16,
        "local-epochs": 1,
        "augmentation": False,
        "model-width": 4,
        "model-depth": 1,
        **overrides,
    }


def _weights() -> dict:
    return build_model(2, 1, 2, width=4, depth=1).state_dict()


def _policy_file(tmp: Path, **policy) -> None:
    state = tmp / "state" / "hospital-1"
    state.mkdir(parents=True, exist_ok=True)
    lines = [f"{k} = {json.dumps(v)}" for k, v in policy.items()]
    (state / "node.toml").write_text("\n".join(lines) + "\n")


def test_a_deployed_node_without_a_full_policy_refuses_and_says_what_is_missing(sites, tmp_path):
    node = {"data-dir": str(sites / "hospital-1"), "state-dir": str(tmp_path / "node")}
    status, reason = node_status(
        train(message(_weights(), 1), context(_run(sites, tmp_path), node))
    )
    assert status == "refused"
    assert "missing: accountant, max-epsilon, delta, max-evaluations" in reason
    node.update({k: str(v) for k, v in FULL_POLICY.items()})  # node config values are strings
    status, _ = node_status(train(message(_weights(), 1), context(_run(sites, tmp_path), node)))
    assert status == "ok"


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"target-epsilon": 40.0}, "target-epsilon 40 is above this hospital's max-epsilon 8"),
        ({"target-delta": 1e-3}, "target-delta 0.001 is looser than this hospital's delta"),
        ({"accountant": "gdp"}, "accountant='gdp': expected one of rdp, prv"),
        ({"accountant": "moments"}, "accountant='moments': expected one of rdp, prv"),
    ],
)
def test_a_proposal_looser_than_the_nodes_policy_is_refused(sites, tmp_path, overrides, needle):
    _policy_file(tmp_path, **FULL_POLICY)
    ctx = context(_run(sites, tmp_path, **overrides))
    status, reason = node_status(train(message(_weights(), 1), ctx))
    assert status == "refused" and needle in reason, reason
    assert not (tmp_path / "state" / "hospital-1" / LEDGER_FILE).exists()  # nothing spent


def test_the_nodes_accountant_wins_over_the_servers(sites, tmp_path):
    _policy_file(tmp_path, accountant="prv")
    reply = train(message(_weights(), 1), context(_run(sites, tmp_path, accountant="rdp")))
    assert node_status(reply)[0] == "ok"
    ledger = json.loads((tmp_path / "state" / "hospital-1" / LEDGER_FILE).read_text())
    assert ledger["accountant"] == "prv"


def test_evaluations_are_bounded_and_a_repeat_costs_nothing(sites, tmp_path):
    _policy_file(tmp_path, **{**FULL_POLICY, "max-evaluations": 2})
    ctx = context(_run(sites, tmp_path, **{"local-evaluation": "every", "num-server-rounds": 2}))
    weights = _weights()
    first = evaluate(message(weights, 1, "evaluate"), ctx)
    again = evaluate(message(weights, 1, "evaluate"), ctx)
    assert node_status(first)[0] == node_status(again)[0] == "ok"
    released = [dict(r.content.metric_records["metrics"]) for r in (first, again)]
    for key in ("val-hist-neg", "val-hist-pos"):
        assert released[0][key] == released[1][key]  # the same release again, not a fresh draw
    assert node_status(evaluate(message(weights, 2, "evaluate"), ctx))[0] == "ok"
    status, reason = node_status(evaluate(message(weights, 7, "evaluate"), ctx))
    assert status == "refused" and "validation releases (2) are spent" in reason
    ledger = json.loads((tmp_path / "state" / "hospital-1" / LEDGER_FILE).read_text())
    assert [e["phase"] for e in ledger["entries"]].count("evaluate") == 2


def test_a_resumed_run_continues_the_same_ledger_whatever_its_output_dir(sites, tmp_path):
    """No state-dir: a simulated node keeps its ledger by the site's content, not the run's
    output folder, so a resume with another output-dir continues the same account."""
    run = _run(sites, tmp_path, **{"num-server-rounds": 2})
    run.pop("state-dir")
    first = train(message(_weights(), 1), context({**run, "output-dir": str(tmp_path / "a")}))
    weights = first.content.array_records["arrays"].to_torch_state_dict()
    second = train(message(weights, 2), context({**run, "output-dir": str(tmp_path / "b")}))
    eps = [r.content.metric_records["metrics"]["epsilon-run"] for r in (first, second)]
    assert 0 < eps[0] < eps[1] <= 8.0 * (1 + 1e-6)


RACE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from node_messages import context, message, node_status
    from client.app import train
    from common.models import build_model
    ctx = context({run!r})
    msg = message(build_model(2, 1, 2, width=4, depth=1).state_dict(), 1, run_uid=sys.argv[1])
    go = Path({go!r})
    while not go.exists():
        time.sleep(0.01)
    print(node_status(train(msg, ctx))[0])
    """
)


def test_two_runs_at_once_cannot_pass_the_nodes_lifetime_limit(sites, tmp_path):
    """Two real processes train a one-round run each, at the same moment, on one node whose
    lifetime limit fits one run: exactly one trains; the ledger never passes the limit."""
    _policy_file(tmp_path, **FULL_POLICY)
    run = _run(sites, tmp_path, **{"num-server-rounds": 1})
    go = tmp_path / "go"
    script = RACE.format(tests=str(ROOT / "tests"), run=run, go=str(go))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, f"run-{i}"], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    try:
        go.touch()
        outcomes = sorted(p.communicate(timeout=300)[0].split()[-1] for p in procs)
    finally:
        for p in procs:
            p.kill()
    assert outcomes == ["ok", "refused"]
    ledger = PrivacyLedger.open(tmp_path / "state" / "hospital-1", "rdp")
    assert ledger.epsilon(1e-5) <= 8.0 * (1 + 1e-6)


def test_a_reservation_whose_process_died_is_given_back(tmp_path):
    script = textwrap.dedent(
        f"""
        import os
        from client.ledger import PrivacyLedger
        ledger = PrivacyLedger.open({str(tmp_path)!r}, "rdp")
        with ledger.transaction():
            ledger.reserve("run", 1, "train", (1.0, 0.1, 50))
        os._exit(0)  # dies before releasing: nothing left the node
        """
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=120)
    ledger = PrivacyLedger.open(tmp_path, "rdp")
    assert ledger.entries[0]["status"] == "reserved"
    assert ledger.epsilon(1e-5) > 0  # counted while its owner might still send
    with ledger.transaction():
        pass
    assert ledger.entries[0]["status"] == "abandoned"
    assert ledger.epsilon(1e-5) == 0.0
    released = PrivacyLedger.open(tmp_path, "rdp")
    with released.transaction() as lg:
        entry = lg.reserve("run", 2, "train", (1.0, 0.1, 50))
        lg.release(entry["id"], [(1.0, 0.1, 50)], "sha")
    assert released.epsilon(1e-5) == pytest.approx(compute_epsilon([(1.0, 0.1, 50)], 1e-5))
