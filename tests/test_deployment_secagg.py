"""Secure aggregation in deployment (issue 18): TLS SuperLink (+ nginx), three SuperNodes with
node auth, real processes on 127.0.0.1 (the harness of tests/test_deployment.py).

One federation, two runs. In each, hospital-3's SuperNode is killed (SIGTERM, then SIGKILL,
with its ClientApp processes) as soon as it receives the masked-vector stage of round 1, i.e.
after the key-sharing stage, while it trains. With secagg-threshold 2 the round completes
with the other two (the server rebuilds hospital-3's masks from their shares); with
secagg-threshold 3 it cannot, and summary.json says why.
"""

from __future__ import annotations

import json
from itertools import count
from pathlib import Path

from procs import wait_for
from test_deployment import OPERATOR, ROOT, _write_sites, federation  # noqa: F401 (fixture)

from client.message_log import MESSAGE_LOG_FILE, read_records

SITES = ("hospital-1", "hospital-2", "hospital-3")
_calls = count()


def _start(fed, site: str, attempt: int):  # noqa: ANN202
    key = fed.root / "keys" / site  # the hospital's key, made and registered once
    if attempt == 0:
        key = fed.node_key(site)
        fed.register(key)
    node_config = {
        "data-dir": str(fed.root / "data" / site),
        "state-dir": str(fed.root / f"state-{site}"),
        "accountant": "rdp",
        "max-epsilon": "50.0",
        "delta": "1e-3",
        "max-evaluations": "4",
        "site-name": site,
    }
    return fed.supernode(f"sn-{site}-{attempt}", key, node_config)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


def _online(fed) -> int:
    # A fresh log name per call: Procs appends to a name's log, and returns all of it.
    rc, out = fed.procs.run(
        f"supernode-list-{next(_calls)}",
        ["flwr", "supernode", "list", OPERATOR, "--format", "json"],
        fed.env,
        cwd=fed.root,
        timeout=60,
    )
    if rc != 0:
        return 0
    listing, _ = json.JSONDecoder().raw_decode(out[out.index("{") :])  # logs may follow
    nodes = listing["nodes"]
    return sum(1 for n in nodes if n.get("status") == "online")


def _run_and_kill(fed, run_name: str, threshold: int, victim) -> dict:  # noqa: ANN001
    """Submit a 1-round SecAgg+ run; kill `victim` once it is in the masked-vector stage."""
    out = fed.root / "outputs"
    overrides = (
        f'num-server-rounds=1 holdout-dir="{fed.root / "data" / "holdout"}" '
        f'output-dir="{out}" run-name="{run_name}" batch-size=16 min-nodes=2 '
        f"target-epsilon=8.0 round-timeout=240.0 secure-aggregation=true "
        f"secagg-threshold={threshold}"
    )
    rc, text = fed.procs.run(
        f"flwr-run-{run_name}", ["flwr", "run", str(ROOT), OPERATOR, "-c", overrides], fed.env,
        cwd=fed.root, timeout=120,
    )  # fmt: skip
    assert rc == 0, text[-4000:]
    # Submitted; the run goes on in the SuperLink's ServerApp while this test watches.
    audit = fed.root / "state-hospital-3" / MESSAGE_LOG_FILE

    def masked_stages() -> int:
        records = read_records(audit) if audit.is_file() else []
        return sum(1 for r in records if r["action"] == "secagg.collect_masked_vectors")

    before = masked_stages()  # the earlier run's, in the same audit log

    stage = "hospital-3 in the masked-vector stage"
    wait_for(lambda: masked_stages() > before, 900, stage, fed.logs)
    fed.procs.stop(victim, grace=0.0)
    gone = [victim.pid, *victim.known]
    wait_for(lambda: not any(_running(pid) for pid in gone), 60, "hospital-3 ended", fed.logs)
    # Ended and checked: the teardown must not signal its PIDs again (this busy machine reuses
    # PIDs within minutes; a late signal could hit someone else's process).
    fed.procs.procs.remove(victim)
    summary_path = out / run_name / "summary.json"

    def ended() -> bool:
        if not summary_path.is_file():
            return False
        return json.loads(summary_path.read_text()).get("status") in ("finished", "failed")

    wait_for(ended, 480, f"run {run_name} to end", fed.logs)
    return json.loads(summary_path.read_text())


def test_secagg_survives_losing_a_hospital_up_to_the_threshold(federation):  # noqa: F811
    fed = federation
    _write_sites(fed.root / "data", {s: 40 for s in SITES} | {"holdout": 30})
    nodes = {site: _start(fed, site, 0) for site in SITES}
    wait_for(lambda: _online(fed) == 3, 120, "three SuperNodes online", fed.logs)

    tolerated = _run_and_kill(fed, "threshold-2", 2, nodes["hospital-3"])
    assert tolerated["status"] == "finished", (tolerated.get("error"), fed.logs())
    hospitals = tolerated["rounds"][1]["hospitals"]
    for site in SITES[:2]:
        assert hospitals[site]["status"] == "ok" and hospitals[site]["epsilon_run"] > 0
        assert hospitals[site]["num_examples"] is None  # only ever masked
    dropped = [h for name, h in hospitals.items() if name not in SITES[:2]]
    assert len(dropped) == 1 and dropped[0]["status"] == "failed", hospitals
    assert "dropped out of the secure aggregation" in dropped[0]["reason"]
    assert tolerated["rounds"][1]["central"]["auc"] is not None
    _ckpt = Path(fed.root / "outputs" / "threshold-2" / "checkpoints" / "round-001.pt")
    assert _ckpt.is_file()

    # The same hospital comes back, then is lost again: with threshold 3 nothing can be rebuilt.
    again = _start(fed, "hospital-3", 1)
    wait_for(lambda: _online(fed) == 3, 180, "hospital-3 back online", fed.logs)
    failed = _run_and_kill(fed, "threshold-3", 3, again)
    assert failed["status"] == "failed", failed
    reason = failed["error"]
    assert "secure aggregation stopped" in reason and "needs 3" in reason, reason
    assert "secagg-threshold" in reason
    assert [r["round"] for r in failed["rounds"]] == [0]  # no round was recorded as done
