"""What every row of `fedvox bench faults` records: wall time, peak memory, the outcome, and
the releases a hospital made that the server never used (from the hospitals' ledgers).

Shared by the in-process rows (faults.py) and the deployment rows (faults_deploy.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulations.harness.procs import PeakSampler, descendants

TARGET_EPSILON = 8.0
DELTA = 1e-5  # simulations.harness.deploy.POLICY's delta: the ledgers' epsilon is stated at it


def tree_pss_gb(root_pid: int) -> float:
    """Memory of a process tree: each process's PSS (its resident pages, shared ones divided
    among the processes sharing them), so 20 forked ClientApps are not counted 20 times."""
    total_kb = 0
    for pid in [root_pid, *descendants(root_pid)]:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
                    break
        except (OSError, ValueError):
            continue
    return total_kb / 1024 / 1024


def measured(fault: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`make()`'s row with its wall time and peak memory; a row that crashed is not ok."""
    t0 = time.monotonic()
    with PeakSampler(lambda: tree_pss_gb(os.getpid()), 1.0) as mem:  # this process tree
        try:
            row = make()
        except Exception as exc:  # noqa: BLE001 - the table says what broke
            row = row_of(fault, 0, f"bench error: {exc!r}"[:600], False)
    row["wall_s"] = round(time.monotonic() - t0, 1)
    row["peak_rss_gb"] = round(mem.peak, 2)
    print(f"{row['fault']}: ok={row['ok']} {row['outcome']}", flush=True)
    return row


def row_of(
    fault: str, hospitals: int, outcome: str, ok: bool, lost: int = 0, eps: float = 0.0
) -> dict[str, Any]:
    return {
        "fault": fault,
        "hospitals": hospitals,
        "outcome": outcome,
        "ok": bool(ok and lost == 0),
        "lost_replies": lost,
        "epsilon_charged_unused": round(eps, 4),
    }


def unused_releases(state_dirs: list[Path], summary: dict[str, Any]) -> tuple[int, float]:
    """(releases of this run the server never used, the most epsilon one hospital paid for
    them), from the hospitals' ledgers; updates the server refused on purpose do not count."""
    from client.ledger import RELEASED, PrivacyLedger
    from common.privacy import compute_epsilon

    run_uid = summary.get("run_uid")
    refused = {
        (site, r["round"])
        for r in summary.get("rounds", [])
        for site, h in r.get("hospitals", {}).items()
        if h.get("status") == "rejected"
    }
    lost, worst = 0, 0.0
    for state in state_dirs:
        ledger = PrivacyLedger.open(state, "rdp")
        mine = [e for e in ledger.entries if e["status"] == RELEASED]
        unused = [
            e
            for e in mine
            if e["run_uid"] == run_uid
            and e.get("phase") in ("train", "eval")
            and e.get("use") != "used"
            and (state.name, e["round"]) not in refused
        ]
        if not unused:
            continue
        lost += len(unused)
        keep = [e for e in mine if e not in unused]

        def hist(es: list[dict]) -> list:
            return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in es]

        worst = max(worst, compute_epsilon(hist(mine), DELTA) - compute_epsilon(hist(keep), DELTA))
    return lost, worst
