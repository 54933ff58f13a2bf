"""`fedvox budget`: runs that fit in a node's max-epsilon, composed by the accountant."""

from __future__ import annotations

import re
from pathlib import Path

from opacus.accountants import RDPAccountant

from client.gate import PrivacyGate
from common.config import NodePolicy, RunConfig
from simulations.budget import runs_that_fit
from simulations.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"target_epsilon": 8.0, "cases": 800, "batch_size": 32, "rounds": 10, "local_epochs": 1}


def test_runs_that_fit_compose_with_opacus_and_match_the_node_plan_and_the_docs(tmp_path):
    fit = runs_that_fit(24.0, 1e-5, "rdp", max_evaluations=2, **SHAPE)

    def lifetime(k: int) -> float:  # Opacus' own accountant, k whole runs
        acc = RDPAccountant()
        acc.history = [entry for _ in range(k) for entry in fit.history]
        return acc.get_epsilon(1e-5)

    assert lifetime(fit.runs) <= 24.0 < lifetime(fit.runs + 1)
    assert abs(lifetime(1) - 8.0) < 0.01 and fit.runs > 3  # not 24 / 8
    # One run is what a node plans for it (client/gate.py), here for a released count whose
    # 25 batches of 32 are those of the 800 cases.
    policy = NodePolicy.parse(
        {"accountant": "rdp", "max-epsilon": 24.0, "delta": 1e-5, "max-evaluations": 2}
    )
    cfg = RunConfig.parse({"target-epsilon": 8.0, "batch-size": 32, "num-server-rounds": 10})
    gate = PrivacyGate.open(tmp_path, "run-1", cfg, policy, 800, 10)
    plan = gate.plan(800, {}, lambda released: (1 / 25, 250))
    assert plan["noise_multiplier"] == fit.noise_multiplier
    # docs/privacy.md states this example's answer.
    said = re.search(r"\*\*(\d+) such runs fit\*\*", (ROOT / "docs" / "privacy.md").read_text())
    assert said and int(said[1]) == fit.runs


def test_budget_command_reads_the_shipped_node_toml_and_names_bad_input(tmp_path, capsys):
    args = ["--cases", "800", "--batch-size", "32", "--rounds", "10"]
    node = str(ROOT / "deploy" / "hospital" / "node.toml")
    assert main(["budget", "--node-config", node, *args]) == 0
    assert re.search(r"\d+ run\(s\) of this shape fit in max-epsilon 24", capsys.readouterr().out)
    missing = tmp_path / "nope.toml"
    assert main(["budget", "--node-config", str(missing), *args]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main(["budget", "--node-config", node, *args[:1], "200000", *args[2:]]) == 2
    assert "1/N" in capsys.readouterr().err
