"""`fedvox audit node`: a hostile ServerApp against a real deployed node, end to end.

The command starts its own SuperLink and one SuperNode (client/supernode.py, warm SuperExec)
on 127.0.0.1 with the shipped deploy/hospital/node.toml policy on a scratch state dir and a
2D phantom site; it is run here as a real process through simulations/harness/procs.py, so that
everything it started ends by PID even when the test fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from simulations.harness.procs import Procs, flwr_env

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "same-dp-noise-twice",
    "dp-false-evaluate/recipe",
    "dp-false-evaluate/run-config",
    "budget-stretched-mid-run",
    "exact-n-from-epsilon",
    "path-through-failure",
    "paths-in-any-reply",
    "raw-loss-in-metrics",
    "different-run-id-per-message",
    "crafted-weights",
    "evaluate-flood",
    "repeated-finetune",
    "approximate-accountant",
    "missing-policy",
}


def _audit(tmp: Path, *args: str, timeout: float = 1500, name: str = "audit") -> tuple[int, str]:
    argv = [sys.executable, "-m", "simulations.cli", "audit", "node", *args]
    env = flwr_env(tmp / "flwr-home", FEDVOX_HOME=str(tmp / "fedvox-home"))
    with Procs(tmp / "logs") as procs:
        rc, out = procs.run(name, argv, env, cwd=ROOT, timeout=timeout)
        assert procs.alive_pids() == []
    return rc, out


def test_a_hostile_server_gets_nothing_beyond_dp_from_a_deployed_node(tmp_path):
    out = tmp_path / "audit-node.json"
    rc, log = _audit(tmp_path, "--out", str(out), "--workdir", str(tmp_path / "work"))
    assert out.is_file(), log[-6000:]
    result = json.loads(out.read_text())
    assert result["machine"] and result["date"]
    rows = result["rows"]
    assert len(rows) >= 8
    assert EXPECTED <= {r["attack"] for r in rows}, [r["attack"] for r in rows]
    for r in rows:
        assert isinstance(r["leaked"], bool) and r["detail"] and r["outcome"], r
    assert "leaked" in log and "attack" in log  # the table
    leaked = [f"{r['attack']}: {r['detail']}" for r in rows if r["leaked"]]
    assert leaked == [], "\n".join(leaked)
    assert rc == 0, log[-3000:]


def test_audit_node_bad_arguments_exit_2_with_one_line(tmp_path):
    bad = tmp_path / "node.toml"
    bad.write_text('accountant = "gdp"\n')
    cases = [
        (["--node-config", str(tmp_path / "none.toml")], "none.toml: cannot be read"),
        (["--node-config", str(bad)], "accountant='gdp': expected one of rdp, prv"),
        (["--data", str(tmp_path / "no-site")], "--data"),
        (["--out", str(tmp_path / "no" / "such" / "out.json")], "does not exist"),
    ]
    for i, (args, needle) in enumerate(cases):
        argv = [*args] if "--out" in args else [*args, "--out", str(tmp_path / "o.json")]
        rc, log = _audit(tmp_path, *argv, timeout=120, name=f"bad-{i}")
        assert rc == 2 and needle in log and "Traceback" not in log, log
        assert len(log.strip().splitlines()) == 1, log
    assert not (tmp_path / "o.json").exists()
