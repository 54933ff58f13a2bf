"""The deployment rows of `fedvox bench faults` (simulations/benchmarks/faults.py says what each
row measures): real SuperLink and SuperNode processes on 127.0.0.1, ended by PID."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from client.message_log import MESSAGE_LOG_FILE, read_records
from simulations.benchmarks.fault_rows import TARGET_EPSILON, measured, row_of, unused_releases
from simulations.harness.deploy import OPERATOR, PROJECT_DIR, LocalDeployment, RunOutcome
from simulations.harness.local import run_config_arg
from simulations.harness.procs import wait_for
from simulations.phantoms.sites import make_phantom_sites

FAST = [f"hospital-{i}" for i in (1, 2, 3, 4)]
SLOW = "hospital-5"  # 10x the cases: it still trains when the others have replied
ALL = [*FAST, SLOW]


def deployment_rows(root: Path, faults: list[str]) -> list[dict[str, Any]]:
    """One deployment of five hospitals (four of 30 cases, one of 300) for these rows."""
    data = root / "data"
    make_phantom_sites("blobs-2d", data / "fast", 4, cases_per_site=30, holdout_cases=40, seed=1)
    make_phantom_sites("blobs-2d", data / "slow", 1, cases_per_site=300, holdout_cases=4, seed=2)
    sites = {name: data / "fast" / name for name in FAST}
    sites[SLOW] = data / "slow" / "hospital-1"
    rows = []
    with LocalDeployment(root / "deployment") as dep:
        dep.add_hospitals(sites)
        dep.start_nodes()
        holdout = data / "fast" / "holdout"
        scenarios = {
            "round-wall": round_wall_row,
            "node-killed": node_killed_row,
            "superlink-killed": superlink_killed_row,
            "bad-config": bad_config_row,
        }
        for fault in faults:
            rows.append(measured(fault, lambda f=fault: scenarios[f](dep, holdout)))
    return rows


def _config(dep: LocalDeployment, holdout: Path, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "num-server-rounds": 3,
        "holdout-dir": str(holdout),
        "output-dir": str(dep.root / "runs"),
        "run-name": name,
        "batch-size": 16,
        "local-epochs": 1,
        "min-nodes": len(dep.node_configs),
        "target-epsilon": TARGET_EPSILON,
        "round-timeout": 900.0,
        **extra,
    }


def _accounting(dep: LocalDeployment, summary: dict[str, Any] | None) -> tuple[int, float]:
    if not summary:
        return 0, 0.0
    return unused_releases([dep.state_dir(h) for h in dep.node_configs], summary)


def _rounds(summary: dict[str, Any] | None) -> list[int]:
    return [r["round"] for r in (summary or {}).get("rounds", [])]


def round_wall_row(dep: LocalDeployment, holdout: Path) -> dict[str, Any]:
    """A clean 3-round job: each round's wall against the slowest hospital's compute."""
    result = dep.run(_config(dep, holdout, "round-wall"), name="run-round-wall")
    s = result.summary or {}
    checks = []
    for r in s.get("rounds", [])[1:]:
        wall = float(r["wall_s"]) + float(r.get("central_eval_s") or 0.0)
        slowest = max(_hospital_seconds(h) for h in r["hospitals"].values())
        checks.append((r["round"], wall, slowest, wall <= 1.5 * slowest + 10.0))
    lost, eps = _accounting(dep, s)
    ok = result.returncode == 0 and s.get("status") == "finished" and len(checks) == 3
    ok = ok and all(c[3] for c in checks)
    detail = ", ".join(f"r{c[0]} {c[1]:.0f} s vs slowest {c[2]:.0f} s" for c in checks)
    outcome = (
        f"fedvox run exit {result.returncode}, {s.get('status')}; round wall (with server "
        f"evaluation) vs slowest hospital's data+train+eval: {detail or 'no round'}; goal "
        "<= 1.5 x slowest + 10 s"
    )
    return row_of("the 3-round deployment job (round wall)", len(ALL), outcome, ok, lost, eps)


def _hospital_seconds(h: dict[str, Any]) -> float:
    ev = h.get("eval") or {}
    return sum(
        float(x or 0.0)
        for x in (h.get("data_s"), h.get("compute_s"), ev.get("data-s"), ev.get("compute-s"))
    )


def _start_run(dep: LocalDeployment, config: dict[str, Any], name: str):
    argv = [sys.executable, "-m", "simulations.cli", "run", str(PROJECT_DIR), OPERATOR]
    return dep.procs.start(name, [*argv, "-c", run_config_arg(config)], dep.env, cwd=dep.root)


def _summary(dep: LocalDeployment, name: str) -> dict[str, Any] | None:
    import json

    path = dep.root / "runs" / name / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def node_killed_row(dep: LocalDeployment, holdout: Path) -> dict[str, Any]:
    """kill -9 hospital-2's SuperNode when round 2 reaches it, restart it at once."""
    victim = dep.nodes["hospital-2"]
    before = victim.log().count("Receiving: train")
    run = _start_run(dep, _config(dep, holdout, "node-killed"), "run-node-killed")
    wait_for(
        lambda: victim.log().count("Receiving: train") >= before + 2 or run.poll() is not None,
        900,
        "hospital-2 to receive round 2",
    )
    dep.kill_node("hospital-2")
    dep.start_node("hospital-2")
    rc = run.popen.wait(timeout=1800)
    s = _summary(dep, "node-killed") or {}
    rounds = s.get("rounds", [])
    status = [r["hospitals"].get("hospital-2", {}).get("status") for r in rounds[1:]]
    later_ok = all(r["hospitals"].get(h, {}).get("status") == "ok" for r in rounds[3:] for h in ALL)
    named = all(not site.startswith("node-") for r in rounds for site in r["hospitals"])
    lost, eps = _accounting(dep, s)
    ok = rc == 0 and s.get("status") == "finished" and _rounds(s) == [0, 1, 2, 3]
    ok = ok and later_ok and named
    outcome = (
        f"fedvox run exit {rc}, {s.get('status')}, rounds {_rounds(s)}; hospital-2 per round: "
        f"{status} (rejoined by itself: {'yes' if later_ok else 'NO'}); the others trained "
        f"every round; hospitals named by site: {'yes' if named else 'NO'}"
    )
    return row_of("kill -9 a SuperNode mid-round, restart", len(ALL), outcome, ok, lost, eps)


def _fast_released(dep: LocalDeployment, start: dict[str, int], round_: int) -> bool:
    return all(
        any(
            r.get("action") == "train" and r.get("round") == round_ and r.get("status") == "ok"
            for r in read_records(dep.state_dir(h) / MESSAGE_LOG_FILE)[start[h] :]
        )
        for h in FAST
    )


def superlink_killed_row(dep: LocalDeployment, holdout: Path) -> dict[str, Any]:
    """kill -9 the SuperLink once the fast hospitals released round 2; restart it on its
    database; `fedvox status`; resume the run."""
    config = _config(dep, holdout, "superlink-killed")
    start = {h: len(read_records(dep.state_dir(h) / MESSAGE_LOG_FILE)) for h in FAST}
    first = _start_run(dep, config, "run-superlink-killed")
    wait_for(lambda: _fast_released(dep, start, 2) or first.poll() is not None, 900, "round 2")
    dep.kill_superlink()
    first_rc = first.popen.wait(timeout=600)
    dep.start_superlink()
    run_dir = dep.root / "runs" / "superlink-killed"
    status = [sys.executable, "-m", "simulations.cli", "status", str(run_dir)]
    wait_for(lambda: dep.procs.run("status", status, dep.env, timeout=300)[0] != 3, 600, "end")
    repaired = (_summary(dep, "superlink-killed") or {}).get("status")
    resumed: RunOutcome = dep.run({**config, "resume-from": str(run_dir)}, timeout=1800)
    s = resumed.summary or {}
    twice = [h for h in ALL if _train_rounds(dep, h, s.get("run_uid")) != [1, 2, 3]]
    lost, eps = _accounting(dep, s)
    ok = first_rc != 0 and resumed.returncode == 0 and s.get("status") == "finished"
    ok = ok and _rounds(s) == [0, 1, 2, 3] and not twice and repaired in ("stopped", "failed")
    outcome = (
        f"killed run: fedvox run exit {first_rc}, status repaired to {repaired!r}; resumed: "
        f"exit {resumed.returncode}, {s.get('status')}, rounds {_rounds(s)}; ledgers with a "
        f"training round charged twice: {twice or 'none'}; round-2 updates the SuperLink lost "
        "sent again from the node's kept copy"
    )
    return row_of("kill -9 the SuperLink mid-round, resume-from", len(ALL), outcome, ok, lost, eps)


def _train_rounds(dep: LocalDeployment, site: str, run_uid: str | None) -> list[int]:
    from client.ledger import PrivacyLedger

    ledger = PrivacyLedger.open(dep.state_dir(site))
    return sorted(
        e["round"]
        for e in ledger.entries
        if e["run_uid"] == run_uid and e.get("phase") == "train" and e["status"] == "released"
    )


BAD_CONFIGS = {
    "target-epsilon": -1.0,
    "num-server-rounds": 0,
    "data-dir": "/no/such/data",
    "strategy": "fedfoo",
}


def bad_config_row(dep: LocalDeployment, holdout: Path) -> dict[str, Any]:
    """Four bad run configs through `fedvox run`: non-zero exit, a failed summary.json each."""
    results = []
    for key, value in BAD_CONFIGS.items():
        name = f"bad-{key}"
        config = _config(dep, holdout, name, **{key: value})
        if key == "data-dir":
            config.pop("holdout-dir")
        out = dep.run(config, name=f"run-{name}")
        s = out.summary or {}
        named = key in str(s.get("reason")) and "holdout-dir" not in str(s.get("reason"))
        results.append((key, out.returncode, s.get("status"), named))
    ok = all(rc == 1 and st == "failed" and named for _, rc, st, named in results)
    outcome = "; ".join(
        f"{k}={BAD_CONFIGS[k]!r}: exit {rc}, {st}, key named: {'yes' if n else 'NO'}"
        for k, rc, st, n in results
    )
    return row_of("bad run config (4 kinds)", len(ALL), outcome, ok)


# A SuperNode + its warm SuperExec (torch imported) idle, + a ClientApp (docs/benchmarks.md,
# "Figures behind code comments").
GB_PER_HOSPITAL = 0.7
GB_LEFT_TO_OTHERS = 2.0  # a shared host: what the row never takes from everyone else


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024 / 1024
    return float("inf")


def many_nodes_row(root: Path, hospitals: int) -> dict[str, Any]:
    """`hospitals` SuperNodes (30 cases each) x 3 rounds on one TLS SuperLink with node auth
    and --database: every reply arrives."""
    need, have = hospitals * GB_PER_HOSPITAL + GB_LEFT_TO_OTHERS, _available_gb()
    if have < need:  # 20 torch processes on a shared host: never push others into the OOM killer
        outcome = f"not run: {have:.1f} GB available, about {need:.1f} GB needed"
        return row_of(f"{hospitals} SuperNodes x 3 rounds", hospitals, outcome, False)
    data = root / "data"
    make_phantom_sites("blobs-2d", data, hospitals, cases_per_site=30, holdout_cases=40, seed=4)
    sites = {f"hospital-{i}": data / f"hospital-{i}" for i in range(1, hospitals + 1)}
    with LocalDeployment(root / "deployment") as dep:
        dep.add_hospitals(sites)
        dep.start_nodes(timeout=600)
        config = _config(dep, data / "holdout", "many-nodes", **{"round-timeout": 1800.0})
        result = dep.run(config, timeout=3600, name="run-many-nodes")
        s = result.summary or {}
        trained = sum(
            1
            for r in s.get("rounds", [])[1:]
            for h in r["hospitals"].values()
            if h.get("status") == "ok"
        )
        locked = dep.superlink.log().count("database is locked")
        retried = sum(n.log().count("failed (") for n in dep.nodes.values())
        unused, eps = _accounting(dep, s)
        nginx = dep.proxy_port is not None
    lost = max(hospitals * 3 - trained, unused)
    ok = result.returncode == 0 and s.get("status") == "finished" and _rounds(s) == [0, 1, 2, 3]
    outcome = (
        f"TLS + node auth + --database{', nginx in front' if nginx else ''}; "
        f"fedvox run exit {result.returncode}, "
        f"{s.get('status')}; {trained} of {hospitals * 3} training replies used; "
        f"'database is locked' in the SuperLink log: {locked}; node retries: {retried}; "
        f"run wall {result.wall_s:.0f} s"
    )
    return row_of(f"{hospitals} SuperNodes x 3 rounds", hospitals, outcome, ok, lost, eps)
